"""`pixelmill-api`: gunicorn serving the Falcon app, configured in code so one command runs it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from common.config import ConfigError, ServerSettings, Settings
from common.logs import configure_logging
from ingest.connection_close import CloseRefusedConnections, expose_close
from ingest.protocol_errors import use_json_protocol_errors

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class PixelmillGunicorn(BaseApplication):
    """Gunicorn with the app built after fork, in each worker (no connections cross a fork)."""

    def __init__(self, options: dict[str, Any], settings: Settings) -> None:
        self._options = options
        self._settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from ingest.app import Dependencies, create_app

        return CloseRefusedConnections(
            create_app(self._settings, Dependencies.connect(self._settings))
        )


def gunicorn_options(server: ServerSettings, access_log: bool) -> dict[str, Any]:
    metrics_dir = server.metrics_dir

    def forget_worker_metrics(arbiter: Any, worker: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, metrics_dir)

    return {
        "bind": server.bind,
        "workers": server.workers,
        "worker_class": "gthread",
        "threads": server.threads,
        # How long a worker may go without telling the arbiter it is alive (a hung process).
        "timeout": 30,
        "graceful_timeout": 20,
        "keepalive": 5,
        # Room for long bearer tokens; a longer header gets 431, in JSON (ingest.protocol_errors).
        "limit_request_field_size": 16384,
        "post_worker_init": use_json_protocol_errors,
        # A refused upload's answer says `Connection: close` (ingest.connection_close).
        "pre_request": expose_close,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "proc_name": "pixelmill-api",
        "child_exit": forget_worker_metrics,
    }


def share_metrics_dir(server: ServerSettings) -> ServerSettings:
    """Point every worker's prometheus_client at one directory, made fresh unless configured.

    prometheus_client reads the directory from the environment of each process, so this writes
    the process's environment: before gunicorn forks, for the workers to inherit.
    """
    metrics_dir = server.metrics_dir or tempfile.mkdtemp(prefix="pixelmill-metrics-")
    os.environ[METRICS_DIR_VARIABLE] = metrics_dir
    return dataclasses.replace(server, metrics_dir=metrics_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pixelmill-api", description=__doc__)
    parser.add_argument("--bind", help="listen address (default: API_BIND, 127.0.0.1:3000)")
    parser.add_argument("--workers", type=int, help="processes (default: API_WORKERS, 2)")
    parser.add_argument("--threads", type=int, help="threads per process (default: API_THREADS, 8)")
    parser.add_argument("--access-log", action="store_true")
    return parser.parse_args(argv)


def with_command_line(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings with what the command line gives instead of the environment."""
    given = {k: v for k in ("bind", "workers", "threads") if (v := getattr(args, k)) is not None}
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server, **given))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = with_command_line(Settings.from_env(), args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    settings = dataclasses.replace(settings, server=share_metrics_dir(settings.server))
    PixelmillGunicorn(gunicorn_options(settings.server, args.access_log), settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
