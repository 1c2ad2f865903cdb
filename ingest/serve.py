"""`pixelmill-api`: gunicorn serving the Falcon app, configured in code so one command runs it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from common.config import ConfigError, Settings
from common.logs import configure_logging
from ingest.protocol_errors import use_json_protocol_errors


class PixelmillGunicorn(BaseApplication):
    """Gunicorn with the app built after fork, in each worker (no connections cross a fork)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from ingest.app import get_app

        return get_app()


def gunicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "bind": args.bind,
        "workers": args.workers,
        "worker_class": "gthread",
        "threads": args.threads,
        # A slow client cannot hold a worker thread longer than this.
        "timeout": 30,
        "graceful_timeout": 20,
        "keepalive": 5,
        # Room for long bearer tokens; a longer header gets 431, in JSON (ingest.protocol_errors).
        "limit_request_field_size": 16384,
        "post_worker_init": use_json_protocol_errors,
        "accesslog": "-" if args.access_log else None,
        "errorlog": "-",
        "proc_name": "pixelmill-api",
        "child_exit": _forget_worker_metrics,
    }


def _forget_worker_metrics(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def prepare_metrics_dir() -> None:
    """Give the workers a fresh shared directory for multiprocess metrics (before they fork)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pixelmill-metrics-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pixelmill-api", description=__doc__)
    parser.add_argument("--bind", default=os.environ.get("API_BIND", "127.0.0.1:3000"))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("API_WORKERS", "2")))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("API_THREADS", "8")))
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    prepare_metrics_dir()
    PixelmillGunicorn(gunicorn_options(args)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
