"""The ops layer: local SeaweedFS, background processes, backing-service checks, compose file."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from minio import Minio
from minio.error import S3Error

from common.config import QueueSettings, Settings, StorageSettings
from ops.__main__ import local_stack
from ops.__main__ import main as ops_main
from ops.background import BackgroundProcess, Stopped, command_line
from ops.s3server import LocalS3Server, WeedPorts, pick_free_s3_port, port_is_open
from ops.services import (
    DatabaseLogin,
    ServicesUnavailable,
    can_manage_packages,
    ensure_services,
    provision_postgres,
)
from ops.stack import (
    LOCAL_KEYCLOAK_DB_URL,
    LOCAL_KEYCLOAK_URL,
    LocalStack,
    StackError,
    StatePaths,
)
from tests.support import COMPOSE_SECRETS, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
ACCESS_KEY = "ops-test"
SECRET_KEY = "ops-test-secret"


def _server(data_dir: Path) -> LocalS3Server:
    return LocalS3Server(
        data_dir, port=pick_free_s3_port(), access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[LocalS3Server]:
    server = _server(tmp_path / "s3")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _client(server: LocalS3Server, secret_key: str = SECRET_KEY, access_key: str = ACCESS_KEY):
    return Minio(server.endpoint, access_key=access_key, secret_key=secret_key, secure=False)


def _wait_for_text(path: Path, text: str, timeout: float = 10.0) -> str:
    def content() -> str:
        found = path.read_text() if path.exists() else ""
        return found if text in found else ""

    return wait_for(content, timeout, 0.05, what=f"{text!r} in {path}")


# --- LocalS3Server ------------------------------------------------------------------------------


def test_s3_server_stores_objects_and_serves_presigned_get(s3: LocalS3Server) -> None:
    client = _client(s3)
    client.make_bucket("ops-photos")
    client.put_object("ops-photos", "a/b.png", io.BytesIO(b"\x89PNG-bytes"), 10)

    assert client.get_object("ops-photos", "a/b.png").read() == b"\x89PNG-bytes"
    url = client.presigned_get_object("ops-photos", "a/b.png")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG-bytes"


def test_s3_server_rejects_a_wrong_secret_and_an_unknown_key(s3: LocalS3Server) -> None:
    with pytest.raises(S3Error) as wrong_secret:
        _client(s3, secret_key="not-the-secret").list_buckets()
    assert wrong_secret.value.code == "SignatureDoesNotMatch"

    with pytest.raises(S3Error) as unknown_key:
        _client(s3, access_key="stranger").make_bucket("ops-intruder")
    assert unknown_key.value.code == "InvalidAccessKeyId"
    assert "ops-intruder" not in [b.name for b in _client(s3).list_buckets()]


def test_s3_server_start_twice_keeps_the_running_process(s3: LocalS3Server) -> None:
    first = s3.pid()
    again = LocalS3Server(
        s3.data_dir, port=s3.ports.s3, access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )

    again.start()

    assert first is not None
    assert again.pid() == first == s3.pid()


def test_s3_server_stop_leaves_no_process_and_frees_every_port(tmp_path: Path) -> None:
    server = _server(tmp_path / "s3")
    server.start()
    try:
        pid = server.pid()
        assert pid is not None and port_is_open(server.ports.s3)
    finally:
        server.stop()

    assert command_line(pid) is None
    assert not server.is_running()
    assert not any(port_is_open(p) for p in server.ports.all_ports())


def test_s3_server_keeps_objects_across_a_restart(s3: LocalS3Server) -> None:
    _client(s3).make_bucket("ops-durable")
    _client(s3).put_object("ops-durable", "kept", io.BytesIO(b"still here"), 10)

    s3.stop()
    s3.start()

    assert _client(s3).get_object("ops-durable", "kept").read() == b"still here"


def test_two_s3_servers_run_side_by_side_without_sharing_data(
    s3: LocalS3Server, tmp_path: Path
) -> None:
    other = _server(tmp_path / "other")
    other.start()
    try:
        _client(s3).make_bucket("ops-only-in-first")
        assert other.ports.s3 != s3.ports.s3
        assert [b.name for b in _client(other).list_buckets()] == []
    finally:
        other.stop()
    assert s3.is_running()


def test_s3_server_refuses_ports_taken_by_another_process(
    s3: LocalS3Server, tmp_path: Path
) -> None:
    intruder = LocalS3Server(
        tmp_path / "intruder", port=s3.ports.s3, access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )

    with pytest.raises(RuntimeError, match="already in use"):
        intruder.start()
    assert not intruder.is_running()


def test_weed_ports_are_distinct_and_derived_from_the_s3_port() -> None:
    ports = WeedPorts.from_s3_port(8333)

    assert ports.http_ports() == (8333, 8334, 8335, 8336, 8337)
    assert len(set(ports.all_ports())) == 10
    assert "-s3.port.grpc=18333" in ports.flags()


# --- BackgroundProcess --------------------------------------------------------------------------


def _background(tmp_path: Path, code: str, marker: str = "ops-test-marker") -> BackgroundProcess:
    argv = [sys.executable, "-c", code, marker]
    return BackgroundProcess(
        "probe",
        argv,
        pid_path=tmp_path / "run" / "probe.pid",
        log_path=tmp_path / "logs" / "probe.log",
        marker=marker,
    )


def test_background_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = _background(
        tmp_path,
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('ready', flush=True); time.sleep(120)",
    )
    pid = stubborn.start()
    _wait_for_text(stubborn.log_path, "ready")

    assert stubborn.stop(timeout=1.0) is Stopped.KILLED

    assert command_line(pid) is None
    assert not stubborn.pid_path.exists()


def test_background_stop_also_ends_children_left_behind(tmp_path: Path) -> None:
    parent = _background(
        tmp_path,
        "import subprocess, sys, time;"
        "child = subprocess.Popen(['sleep', '120']);"
        "print('child', child.pid, flush=True); time.sleep(120)",
    )
    parent.start()
    child_pid = int(_wait_for_text(parent.log_path, "child ").split()[1])

    assert parent.stop(timeout=5.0) is Stopped.TERMINATED

    wait_for(lambda: command_line(child_pid) is None, 5, 0.05, what="the child to end")


def test_background_ignores_a_pid_file_naming_someone_elses_process(tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "120"])
    try:
        ours = _background(tmp_path, "import time; time.sleep(120)")
        ours.pid_path.parent.mkdir(parents=True)
        ours.pid_path.write_text(f"{stranger.pid}\n")

        assert ours.is_running() is False
        assert ours.stop(timeout=1.0) is Stopped.NOT_RUNNING
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_background_start_twice_keeps_one_process(tmp_path: Path) -> None:
    sleeper = _background(tmp_path, "import time; time.sleep(120)")
    try:
        first = sleeper.start()
        other_view = _background(tmp_path, "import time; time.sleep(120)")
        assert other_view.start() == first
    finally:
        sleeper.stop(timeout=2.0)


# --- backing services ---------------------------------------------------------------------------


def test_ensure_services_accepts_the_running_services(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test session's PostgreSQL, Redis and RabbitMQ each answer their real ping, and
    nothing is installed or started although this machine would allow it."""
    import ops.services

    pinged: list[tuple[str, str]] = []

    def recording(service: ops.services.Service) -> ops.services.Service:
        def ping() -> None:
            service.ping()
            pinged.append((service.name, service.address))

        return dataclasses.replace(service, ping=ping)

    real_services_for = ops.services.services_for
    monkeypatch.setattr(
        ops.services,
        "services_for",
        lambda s, extra=(): [recording(x) for x in real_services_for(s, extra)],
    )
    monkeypatch.setattr(
        ops.services,
        "_install_and_start",
        lambda service: pytest.fail(f"{service.name} was started although it answers"),
    )

    ensure_services(settings)

    def address(url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port}"

    assert sorted(pinged) == [
        ("PostgreSQL", address(settings.postgres_url)),
        ("RabbitMQ", address(settings.queue.url)),
        ("Redis", address(settings.redis_url)),
    ]


@pytest.mark.skipif(
    not can_manage_packages(), reason="provisioning needs root on Debian with a local PostgreSQL"
)
def test_a_database_url_the_server_refuses_gets_its_role_and_database_once() -> None:
    """What `make test` does on a fresh machine: the URL's login is refused, ensure_services
    creates its role and database through the server's own account, and a second provisioning
    finds both and changes nothing."""
    name = f"pm_prov_{uuid.uuid4().hex[:8]}"
    url = f"postgresql://{name}:secret-{name}@127.0.0.1:5432/{name}"
    settings = Settings(postgres_url=url)
    with pytest.raises(ServicesUnavailable, match=r"PostgreSQL at 127\.0\.0\.1:5432 refused"):
        ensure_services(settings, allow_install=False)
    try:
        ensure_services(settings)

        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == (name, name)
        assert provision_postgres(url) == [f"role {name} exists", f"database {name} exists"]
    finally:
        for statement in (f"DROP DATABASE IF EXISTS {name}", f"DROP ROLE IF EXISTS {name}"):
            subprocess.run(
                ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-c", statement],
                check=True,
                capture_output=True,
            )


def test_a_database_url_without_a_password_is_not_provisioned() -> None:
    with pytest.raises(OSError, match="names no role and password"):
        provision_postgres("postgresql://postgres@127.0.0.1:5432/postgres")


def test_database_login_reads_role_password_and_database_from_the_url() -> None:
    login = DatabaseLogin.from_url("postgresql://pm%40x:p%3Ass@127.0.0.1:6543/db_1?sslmode=off")
    assert login == DatabaseLogin(role="pm@x", password="p:ss", database="db_1", port=6543)
    assert DatabaseLogin.from_url("postgresql://alice:pw@localhost").database == "alice"


def test_ensure_services_names_the_missing_service_and_how_to_start_it() -> None:
    port = free_port()
    settings = Settings(postgres_url=f"postgresql://postgres@127.0.0.1:{port}/postgres")

    with pytest.raises(ServicesUnavailable) as missing:
        ensure_services(settings, allow_install=False)

    message = str(missing.value)
    assert f"PostgreSQL is not listening on 127.0.0.1:{port}" in message
    assert "POSTGRES_URL" in message
    assert "docker compose up -d postgres redis rabbitmq minio" in message
    assert "Redis" not in message and "RabbitMQ" not in message


def test_ensure_services_reports_a_service_that_refuses_the_credentials() -> None:
    queue = QueueSettings(url="amqp://guest:wrong-password@127.0.0.1:5672/%2F")

    with pytest.raises(ServicesUnavailable, match=r"RabbitMQ at 127\.0\.0\.1:5672 refused"):
        ensure_services(Settings(queue=queue), allow_install=False)


def test_services_command_exits_1_with_the_message(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PIXELMILL_ENV", "local")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")

    assert ops_main(["services", "--check-only"]) == 1
    assert "Redis is not listening" in capsys.readouterr().err


# --- stack and CLI ------------------------------------------------------------------------------


def test_stack_leaves_remote_storage_and_keycloak_alone(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "PIXELMILL_ENV": "local",
            "MINIO_ENDPOINT": "minio:9000",
            "KEYCLOAK_URL": "http://keycloak:8080",
        }
    )
    stack = LocalStack(settings, StatePaths(tmp_path), child_env={})

    assert stack.storage() is None
    assert stack.issuer() is None
    assert [p.name for p in stack.app_processes()] == ["api", "worker"]


def test_stack_runs_local_storage_and_issuer_on_the_configured_ports(tmp_path: Path) -> None:
    settings = Settings(storage=StorageSettings(endpoint="127.0.0.1:18444"))
    stack = LocalStack(settings, StatePaths(tmp_path), child_env={})

    storage, issuer = stack.storage(), stack.issuer()

    assert storage is not None and storage.endpoint == "127.0.0.1:18444"
    assert issuer is not None and "--port 8180" in " ".join(issuer.argv)
    assert storage.data_dir == (tmp_path / "s3").resolve()


def test_the_keycloak_stack_runs_keycloak_where_keycloak_url_says_and_no_issuer(
    tmp_path: Path,
) -> None:
    environ = {"PIXELMILL_ENV": "local", "KEYCLOAK_URL": "http://localhost:18080"}
    stack = LocalStack(
        Settings.from_env(environ),
        StatePaths(tmp_path),
        child_env=environ,
        keycloak_db_url=LOCAL_KEYCLOAK_DB_URL,
    )

    keycloak = stack.keycloak()

    assert stack.issuer() is None
    assert keycloak is not None and keycloak.url == "http://localhost:18080"
    assert keycloak.options.environment()["KC_HTTP_PORT"] == "18080"
    assert keycloak.options.environment()["KC_DB_URL"] == (
        "jdbc:postgresql://127.0.0.1:5432/keycloak"
    )
    assert [p.name for p in stack.app_processes()] == ["keycloak", "api", "worker"]


def test_a_keycloak_that_up_started_makes_token_and_ps_use_it_until_down_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("PIXELMILL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("KEYCLOAK_URL", raising=False)
    state = StatePaths(tmp_path)
    # Stands in for Keycloak: recognised, like the real one, by its instance's kc.sh.
    kc = state.keycloak / "server" / "bin" / "kc.sh"
    kc.parent.mkdir(parents=True)
    kc.write_text("trap 'exit 0' TERM\nsleep 300 & wait\n")
    standin = BackgroundProcess(
        "keycloak", [], pid_path=state.pid_file("keycloak"), log_path=tmp_path, marker=str(kc)
    )
    assert local_stack().keycloak_db_url is None
    # Started as `up` leaves it: in a session of its own, no longer a child of this process.
    pid_file = state.pid_file("keycloak")
    pid_file.parent.mkdir(parents=True)
    subprocess.run(
        ["bash", "-c", f"setsid /bin/sh {kc} >/dev/null 2>&1 & echo $! > {pid_file}"], check=True
    )
    wait_for(standin.is_running, timeout=10)

    stack = local_stack()
    assert stack.keycloak_db_url == LOCAL_KEYCLOAK_DB_URL
    assert stack.settings.auth.keycloak_url == LOCAL_KEYCLOAK_URL
    assert ops_main(["ps"]) == 0
    assert f"keycloak running, pid {standin.pid()}" in capsys.readouterr().out

    assert ops_main(["down"]) == 0
    assert "keycloak stopped" in capsys.readouterr().out
    assert not standin.is_running()
    assert local_stack().keycloak_db_url is None


def test_up_with_keycloak_refuses_while_the_stack_runs_with_the_local_issuer(
    tmp_path: Path,
) -> None:
    state = StatePaths(tmp_path)
    issuer = BackgroundProcess(
        "issuer",
        [sys.executable, "-c", "import time; time.sleep(300)", "-m", "ops", "issuer"],
        pid_path=state.pid_file("issuer"),
        log_path=state.log_file("issuer"),
        marker="-m ops issuer",
    )
    issuer.start()
    # Were it not refused, up would stop at a database nobody runs (192.0.2.0/24 is unroutable).
    environ = {
        "PIXELMILL_ENV": "local",
        "KEYCLOAK_URL": LOCAL_KEYCLOAK_URL,
        "POSTGRES_URL": "postgresql://nobody:nothing@192.0.2.1:5432/none",
        "MINIO_ENDPOINT": "minio:9000",
    }
    stack = LocalStack(
        Settings.from_env(environ), state, child_env=environ, keycloak_db_url=LOCAL_KEYCLOAK_DB_URL
    )
    try:
        with pytest.raises(StackError, match="make down"):
            stack.up()
    finally:
        issuer.stop()


def test_unknown_command_prints_usage_and_fails(capsys) -> None:
    assert ops_main(["no-such-command"]) == 2
    assert "usage: python -m ops" in capsys.readouterr().err


# --- compose ------------------------------------------------------------------------------------

COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed")
def test_compose_file_is_valid_and_defines_every_service() -> None:
    assert COMPOSE is not None
    command = [COMPOSE, "-f", str(ROOT / "compose.yaml")]
    result = subprocess.run(
        [*command, "config", "--services"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **COMPOSE_SECRETS},
    )

    assert result.returncode == 0, result.stderr
    expected = {"postgres", "redis", "minio", "rabbitmq", "keycloak", "migrate", "api", "worker"}
    assert expected <= set(result.stdout.split())


def _service_block(config: str, name: str) -> str:
    """The lines of one service in `docker-compose config` output (services indented by two)."""
    lines = config.splitlines()
    start = lines.index(f"  {name}:") + 1
    end = start
    while end < len(lines) and (lines[end].startswith("   ") or not lines[end].strip()):
        end += 1
    return "\n".join(lines[start:end])


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed")
def test_compose_worker_publishes_no_ports_so_it_can_scale() -> None:
    assert COMPOSE is not None
    result = subprocess.run(
        [COMPOSE, "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **COMPOSE_SECRETS},
    )
    worker = _service_block(result.stdout, "worker")
    api = _service_block(result.stdout, "api")

    assert "pixelmill-worker" in worker and "ports:" not in worker
    assert "container_name" not in worker
    assert "published: 3000" in api
    for block in (worker, api):
        assert "condition: service_completed_successfully" in block
        assert "condition: service_healthy" in block
        assert "healthcheck:" in block


def test_test_tools_names_each_missing_program_with_its_package_and_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ops.test_tools

    absent = ops.test_tools.Tool("pm-no-such-program", "pm-no-such-package", "proving this")
    monkeypatch.setattr(ops.test_tools, "TEST_TOOLS", (absent,))
    monkeypatch.setattr(ops.test_tools, "can_manage_packages", lambda: False)

    assert ops.test_tools.install_test_tools() == [
        "pm-no-such-program (Debian package pm-no-such-package): proving this"
    ]


def test_every_program_the_tests_call_is_installed_where_make_test_may_install_it() -> None:
    """On Debian as root (CI), `make test` installed every tool, so no such test skips there."""
    from ops.test_tools import missing_tools

    if not can_manage_packages():
        pytest.skip("only Debian as root installs the tools")
    assert missing_tools() == []
