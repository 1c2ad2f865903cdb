"""The local development stack: SeaweedFS, the local OIDC issuer (or the real Keycloak, given a
`keycloak_db_url`), migrations, the API and a worker.

Each long-running part is a `BackgroundProcess` with `<state>/run/<name>.pid` and
`<state>/logs/<name>.log`; `up` starts what is not running yet and `down` stops exactly those.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from common.config import Settings
from common.storage import ObjectStore
from ops.background import BackgroundProcess, Stopped, log_tail
from ops.keycloak_server import (
    KeycloakDistribution,
    KeycloakOptions,
    KeycloakServer,
)
from ops.s3server import LocalS3Server, ReadOnlyKey
from ops.services import ensure_services

API_BIND = "127.0.0.1:3000"
HEALTH_URL = f"http://{API_BIND}/health"
DEFAULT_S3_PORT = 8333
DEFAULT_ISSUER_PORT = 8180
# The real Keycloak of `make up KEYCLOAK=1`: the port the README's token request names, and its
# own database on the local PostgreSQL (created like pixelmill's, see ops.services).
LOCAL_KEYCLOAK_URL = "http://localhost:8080"
LOCAL_KEYCLOAK_MANAGEMENT_PORT = 9000
LOCAL_KEYCLOAK_DB_URL = "postgresql://keycloak:keycloak@127.0.0.1:5432/keycloak"
LOCAL_KEYCLOAK_ADMIN_PASSWORD = "admin"
_LOOPBACK = ("127.0.0.1", "localhost")
_POLL_SECONDS = 0.25

NEXT_STEPS = """\
pixelmill is up: API http://localhost:3000  (follow logs: make logs; stop: make down)

Console: http://localhost:3000/console/  (sign in as user/password or admin/admin)

Try it:
  TOKEN=$(make -s token)
  curl -X POST http://localhost:3000/api/v1/upload -H "Authorization: Bearer $TOKEN" \\
       -F "image=@test.png"
  # the answer carries the image id; then:
  curl http://localhost:3000/api/v1/images/$ID -H "Authorization: Bearer $TOKEN"
"""

KEYCLOAK_NEXT_STEPS = """\
pixelmill is up with Keycloak: API http://localhost:3000, Keycloak http://localhost:8080
(admin console: admin/admin; follow logs: make logs; stop: make down)

Try it (the demo users are user/password and admin/admin):
  TOKEN=$(curl -s -X POST \\
    http://localhost:8080/realms/ImageProcessor/protocol/openid-connect/token \\
    -d grant_type=password -d client_id=api-gateway-client -d username=user -d password=password \\
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -X POST http://localhost:3000/api/v1/upload -H "Authorization: Bearer $TOKEN" \\
       -F "image=@test.png"
  # or TOKEN=$(make -s token), the same request
"""


class StackError(RuntimeError):
    """A part of the local stack did not start; the message carries the tail of its log."""


def project_root() -> Path:
    """The directory holding pyproject.toml above this file (the source checkout)."""
    for directory in Path(__file__).resolve().parents:
        if (directory / "pyproject.toml").is_file():
            return directory
    return Path.cwd()


@dataclass(frozen=True)
class StatePaths:
    """Where the local stack keeps data, pid files and logs."""

    root: Path

    @property
    def s3_data(self) -> Path:
        return self.root / "s3"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def keycloak(self) -> Path:
        """The Keycloak distribution (downloaded once) and the local server's instance."""
        return self.root / "keycloak"

    def pid_file(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def is_loopback(host: str | None) -> bool:
    return host in _LOOPBACK


class LocalStack:
    """Starts, stops and reports the local processes; `settings` says where everything lives."""

    def __init__(
        self,
        settings: Settings,
        state: StatePaths,
        child_env: Mapping[str, str],
        python: str = sys.executable,
        *,
        keycloak_db_url: str | None = None,
    ) -> None:
        """`keycloak_db_url` given: run the real Keycloak, on that database, where
        `settings.auth.keycloak_url` says, instead of the local issuer."""
        self.settings = settings
        self.state = state
        self.child_env = dict(child_env)
        self.python = python
        self.cwd = project_root()
        self.keycloak_db_url = keycloak_db_url

    def storage(self) -> LocalS3Server | None:
        """SeaweedFS for a loopback MINIO_ENDPOINT; None when storage lives elsewhere."""
        storage = self.settings.storage
        host, _, port = storage.endpoint.rpartition(":")
        if not is_loopback(host) or storage.secure:
            return None
        return self._s3_server(int(port))

    def issuer(self) -> BackgroundProcess | None:
        """The local issuer for a loopback KEYCLOAK_URL; None when a real Keycloak is used."""
        url = urlsplit(self.settings.auth.keycloak_url)
        if self.keycloak_db_url is not None or not is_loopback(url.hostname) or url.port is None:
            return None
        return self._issuer_process(url.port)

    def keycloak(self) -> KeycloakServer | None:
        """The real Keycloak when the stack runs one; None with the local issuer."""
        if self.keycloak_db_url is None:
            return None
        url = urlsplit(self.settings.auth.keycloak_url)
        if not is_loopback(url.hostname) or url.port is None:
            raise StackError(
                f"KEYCLOAK_URL={self.settings.auth.keycloak_url} is not a loopback URL with a "
                "port: the local Keycloak cannot listen there"
            )
        return self._keycloak_server(self.keycloak_db_url)

    def api(self) -> BackgroundProcess:
        script = Path(self.python).parent / "pixelmill-api"
        if script.is_file():
            argv = [str(script), "--bind", API_BIND]
            return self._process("api", argv, marker=f"pixelmill-api --bind {API_BIND}")
        return self._python_process("api", ["-m", "ingest.serve", "--bind", API_BIND])

    def worker(self) -> BackgroundProcess:
        return self._python_process("worker", ["-m", "engine"])

    def app_processes(self) -> list[BackgroundProcess]:
        """The pixelmill processes in start order (stopped in reverse)."""
        issuer = self.issuer()
        keycloak = self.keycloak()
        identity = [issuer] if issuer else [keycloak.background_process()] if keycloak else []
        return [*identity, self.api(), self.worker()]

    def up(self, timeout: float = 60.0) -> None:
        """Start everything that is not running yet and wait until the API is healthy."""
        self._refuse_switching_to_keycloak()
        extra = [self.keycloak_db_url] if self.keycloak_db_url is not None else []
        ensure_services(self.settings, extra_databases=extra)
        storage = self.storage()
        if storage is not None:
            already = storage.is_running()
            storage.start()
            _report("s3", storage.pid(), storage.log_path, started=not already)
        ObjectStore(self.settings.storage).ensure_buckets()
        issuer = self.issuer()
        if issuer is not None:
            self._start(issuer)
            self._wait_issuer(issuer, timeout)
        keycloak = self.keycloak()
        if keycloak is not None:
            self._start_keycloak(keycloak)
        self._migrate()
        api, worker = self.api(), self.worker()
        self._start(api)
        self._start(worker)
        self._wait_healthy(api, timeout)
        if not worker.is_running():
            raise StackError(_died("worker", worker))

    def down(self, timeout: float = 10.0) -> None:
        """Stop what `up` started (found by pid file, whatever the settings say now)."""
        for process in reversed(self._every_app_process()):
            _report_stop(process.name, process.stop(timeout))
        _report_stop("s3", self._s3_server().stop(timeout))

    def status(self) -> list[tuple[str, int | None, Path]]:
        """(name, pid or None, log file) for every part of the stack."""
        s3 = self._s3_server()
        rows = [("s3", s3.pid(), s3.log_path)]
        return rows + [(p.name, p.pid(), p.log_path) for p in self._every_app_process()]

    def log_files(self) -> list[Path]:
        known = [self.state.log_file(name) for name, _, _ in self.status()]
        others = sorted(set(self.state.logs.glob("*.log")) - set(known))
        return known + others

    def keycloak_running(self) -> bool:
        """Whether a Keycloak that `up` started runs (found by pid file, like `down` finds it)."""
        return self._keycloak_server(LOCAL_KEYCLOAK_DB_URL).is_running()

    def _every_app_process(self) -> list[BackgroundProcess]:
        return [
            self.issuer() or self._issuer_process(DEFAULT_ISSUER_PORT),
            self._keycloak_server(LOCAL_KEYCLOAK_DB_URL).background_process(),
            self.api(),
            self.worker(),
        ]

    def _keycloak_server(self, database_url: str) -> KeycloakServer:
        # Ownership is recognised by the instance directory, whatever the options say now.
        options = KeycloakOptions(
            url=self.settings.auth.keycloak_url,
            management_port=LOCAL_KEYCLOAK_MANAGEMENT_PORT,
            database_url=database_url,
            admin_password=LOCAL_KEYCLOAK_ADMIN_PASSWORD,
        )
        return KeycloakServer(
            KeycloakDistribution(self.state.keycloak),
            self.state.keycloak / "server",
            options,
            base_env=self.child_env,
            log_path=self.state.log_file("keycloak"),
            pid_path=self.state.pid_file("keycloak"),
        )

    def _s3_server(self, port: int = DEFAULT_S3_PORT) -> LocalS3Server:
        # Ownership is recognised by the data directory, so any port finds a running server.
        storage = self.settings.storage
        reader = None
        if storage.presign_access_key != storage.access_key:
            # Configured like production: download URLs signed by a key that only reads results.
            reader = ReadOnlyKey(
                storage.presign_access_key, storage.presign_secret_key, storage.processed_bucket
            )
        return LocalS3Server(
            self.state.s3_data,
            port=port,
            access_key=storage.access_key,
            secret_key=storage.secret_key,
            log_path=self.state.log_file("s3"),
            pid_path=self.state.pid_file("s3"),
            reader=reader,
        )

    def _issuer_process(self, port: int) -> BackgroundProcess:
        args = ["--host", "127.0.0.1", "--port", str(port), "--state-dir", str(self.state.root)]
        return self._process(
            "issuer", [self.python, "-m", "ops", "issuer", *args], marker="-m ops issuer"
        )

    def _python_process(self, name: str, args: list[str]) -> BackgroundProcess:
        return self._process(name, [self.python, *args], marker=" ".join(args))

    def _process(self, name: str, argv: list[str], marker: str) -> BackgroundProcess:
        return BackgroundProcess(
            name,
            argv,
            pid_path=self.state.pid_file(name),
            log_path=self.state.log_file(name),
            marker=marker,
            env={**self.child_env, "PYTHONUNBUFFERED": "1"},
            cwd=self.cwd,
        )

    def _start(self, process: BackgroundProcess) -> None:
        already = process.pid()
        pid = already if already is not None else process.start()
        _report(process.name, pid, process.log_path, started=already is None)

    def _refuse_switching_to_keycloak(self) -> None:
        # The running API and worker would keep trusting the issuer they were started with.
        if self.keycloak_db_url is not None and self._issuer_process(DEFAULT_ISSUER_PORT).pid():
            raise StackError(
                "the stack is running with the local issuer; stop it first (make down), then "
                "make up KEYCLOAK=1"
            )

    def _start_keycloak(self, keycloak: KeycloakServer) -> None:
        already = keycloak.pid()
        if already is None:
            print(f"keycloak starting on {keycloak.url} (the first start takes a minute)")
        keycloak.start()
        _report("keycloak", keycloak.pid(), keycloak.log_path, started=already is None)
        keycloak.add_demo_users(self.child_env)

    def _migrate(self) -> None:
        command = [self.python, "-m", "db.migrate"]
        result = subprocess.run(command, env=self.child_env, cwd=self.cwd, check=False)
        if result.returncode != 0:
            raise StackError(f"migrations failed (exit {result.returncode}); see the output above")

    def _wait_issuer(self, issuer: BackgroundProcess, timeout: float) -> None:
        url = self.settings.auth.discovery_url
        if not wait_for_http(url, issuer, timeout):
            raise StackError(f"the local issuer did not answer {url}\n{_died('issuer', issuer)}")

    def _wait_healthy(self, api: BackgroundProcess, timeout: float) -> None:
        if not wait_for_http(HEALTH_URL, api, timeout):
            raise StackError(f"the API did not answer {HEALTH_URL}\n{_died('api', api)}")


def wait_for_http(url: str, process: BackgroundProcess, timeout: float) -> bool:
    """Poll `url` until it answers 200; False on timeout or as soon as `process` is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return True
        if not process.is_running():
            return False
        time.sleep(_POLL_SECONDS)
    return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _died(name: str, process: BackgroundProcess) -> str:
    state = "is still running" if process.is_running() else "is not running"
    return f"{name} {state}; last lines of {process.log_path}:\n{log_tail(process.log_path)}"


def _report(name: str, pid: int | None, log: Path, *, started: bool = True) -> None:
    verb = "started" if started else "already running"
    print(f"{name:<8} {verb} (pid {pid}, log {log})", flush=True)


def _report_stop(name: str, outcome: Stopped) -> None:
    print(f"{name:<8} {outcome.value}", flush=True)
