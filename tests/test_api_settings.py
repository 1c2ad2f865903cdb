"""How the API process is run is configuration like any other: read once into `Settings`, and
the one process-wide effect (the shared metrics directory) made where the process starts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import falcon.testing
import pytest

from common.config import ConfigError, Settings
from ingest.metrics import MetricsResource
from ingest.serve import parse_args, with_command_line
from tests.support import ROOT

# os.environ.get(...), os.getenv(...), os.environ[...] other than as an assignment's target.
_ENVIRONMENT_READ = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]*\](?!\s*=)")
# A worker process of another API: counts requests into the shared directory and exits.
_WORKER = """
from prometheus_client import Counter
Counter("pixelmill_http_requests", "", ["route", "method", "status"]).labels(
    "/health", "GET", "200"
).inc(7)
"""


def test_server_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "PIXELMILL_ENV": "local",
            "API_BIND": "0.0.0.0:8080",
            "API_WORKERS": "3",
            "API_THREADS": "12",
            "PROMETHEUS_MULTIPROC_DIR": "/run/metrics",
        }
    )
    server = settings.server
    assert (server.bind, server.workers, server.threads) == ("0.0.0.0:8080", 3, 12)
    assert server.metrics_dir == "/run/metrics"


@pytest.mark.parametrize("variable", ["API_WORKERS", "API_THREADS"])
def test_a_malformed_server_setting_stops_start_up_naming_it(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({"PIXELMILL_ENV": "local", variable: "many"})


def test_command_line_wins_over_the_environment_only_where_given() -> None:
    settings = Settings.from_env(
        {"PIXELMILL_ENV": "local", "API_WORKERS": "3", "API_THREADS": "12"}
    )
    server = with_command_line(settings, parse_args(["--threads", "4"])).server
    assert (server.workers, server.threads) == (3, 4)


def test_metrics_resource_merges_the_directory_it_is_given(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", _WORKER],
        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
        check=True,
        timeout=60,
    )
    app = falcon.App()
    app.add_route("/metrics", MetricsResource(str(tmp_path)))
    text = falcon.testing.TestClient(app).simulate_get("/metrics").text
    assert re.search(r'pixelmill_http_requests_total\{[^}]*route="/health"[^}]*\} 7\.0', text), text


def test_only_the_configuration_module_reads_the_environment_in_the_api() -> None:
    readers = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "ingest").rglob("*.py"))
        # The upload client is a program of its own, for users, with its own options.
        if path.name != "client.py" and _ENVIRONMENT_READ.search(path.read_text())
    ]
    assert readers == [], "read settings through common.config instead"


def test_uploads_must_leave_threads_for_health_checks() -> None:
    with pytest.raises(ConfigError, match="API_UPLOAD_THREADS"):
        Settings.from_env({"PIXELMILL_ENV": "local", "API_THREADS": "4", "API_UPLOAD_THREADS": "4"})
    with pytest.raises(ConfigError, match="API_UPLOAD_THREADS"):
        with_command_line(
            Settings.from_env({"PIXELMILL_ENV": "local", "API_UPLOAD_THREADS": "6"}),
            parse_args(["--threads", "4"]),
        )


@pytest.mark.parametrize(("threads", "slots"), [(8, 6), (4, 2), (2, 2), (1, 1)])
def test_uploads_take_all_threads_but_two_by_default(threads: int, slots: int) -> None:
    assert (
        Settings.from_env(
            {"PIXELMILL_ENV": "local", "API_THREADS": str(threads)}
        ).server.upload_slots
        == slots
    )
