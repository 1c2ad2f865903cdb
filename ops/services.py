"""Backing services for a local run: check PostgreSQL, Redis and RabbitMQ answer, set up if not.

Each service is first probed by TCP, then pinged with its real client. On a Debian machine where
we are root, a closed loopback port is fixed by installing the service (apt-get) and starting it,
and a local PostgreSQL that refuses the URL's login gets the URL's role and database (created
through the server's own `postgres` account). In every other case `ensure_services` raises
`ServicesUnavailable` saying exactly what to start. Every step taken is printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import psycopg
import redis

from common.config import Settings
from db import pool

# The database `make test` provisions and the tests use, unless TEST_POSTGRES_URL names another.
LOCAL_TEST_POSTGRES_URL = "postgresql://pixelmill:pixelmill@127.0.0.1:5432/pixelmill_test"

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# RabbitMQ's first start on a busy two-core machine takes half a minute.
_START_WAIT_SECONDS = 120.0
_COMPOSE_HINT = "docker compose up -d postgres redis rabbitmq minio"
_PING_ERRORS = (psycopg.Error, redis.RedisError, pika.exceptions.AMQPError, OSError)
_POSTGRES_CLUSTERS = Path("/etc/postgresql")


class ServicesUnavailable(RuntimeError):
    """One or more backing services cannot be reached; the message says what to start."""


@dataclass(frozen=True)
class Service:
    """A backing service: where it listens, how to ping it, how to install, start and set it up.

    `provision` makes a running local server accept the URLs' credentials (PostgreSQL's roles and
    databases); services whose defaults already do have none."""

    name: str
    env_var: str
    host: str
    port: int
    ping: Callable[[], None]
    apt_package: str
    installed: Callable[[], bool]
    start_commands: Callable[[], list[list[str]]]
    provision: Callable[[], list[str]] | None = field(default=None)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        return self.host in _LOOPBACK


def services_for(settings: Settings, extra_databases: Sequence[str] = ()) -> list[Service]:
    """The services a pixelmill process needs, addressed as `settings` says.

    `extra_databases` are further PostgreSQL URLs on the same server to check and provision (the
    test suite's database)."""
    postgres = [_postgres(url) for url in (settings.postgres_url, *extra_databases)]
    return [*postgres, _redis(settings.redis_url), _rabbitmq(settings)]


def ensure_services(
    settings: Settings, *, allow_install: bool = True, extra_databases: Sequence[str] = ()
) -> None:
    """Return once every service answers, setting up local ones when allowed; else raise."""
    can_fix = allow_install and can_manage_packages()
    problems = []
    for service in services_for(settings, extra_databases):
        problem = _check(service)
        if problem is not None and can_fix and service.is_local:
            problem = _set_up(service)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise ServicesUnavailable(_explain(problems))


def tcp_open(service: Service, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((service.host, service.port), timeout=timeout):
            return True
    except OSError:
        return False


def _check(service: Service) -> str | None:
    """None if the service answers its ping, else a one-line description of what failed."""
    if not tcp_open(service):
        return f"{service.name} is not listening on {service.address} (set by {service.env_var})"
    try:
        service.ping()
    except _PING_ERRORS as exc:
        return f"{service.name} at {service.address} refused the connection: {exc}"
    return None


def _explain(problems: Sequence[str]) -> str:
    lines = ["Backing services are not available:", *(f"  - {p}" for p in problems)]
    lines += [
        "Start them, for example with:",
        f"  {_COMPOSE_HINT}",
        "or start the system services yourself, or point the variables above at running ones.",
    ]
    return "\n".join(lines)


def can_manage_packages() -> bool:
    """Debian (or derivative) with apt-get, and we are root."""
    return (
        Path("/etc/debian_version").exists()
        and shutil.which("apt-get") is not None
        and os.geteuid() == 0
    )


def _say(service: Service, what: str) -> None:
    print(f"{service.name}: {what}", flush=True)


def _set_up(service: Service) -> str | None:
    """Install, start and provision what a local service lacks; the remaining problem, if any."""
    try:
        if not tcp_open(service):
            _install_and_start(service)
        if not _wait_until_listening(service, _START_WAIT_SECONDS):
            return f"{service.name} did not start listening on {service.address}"
        if service.provision is not None and _check(service) is not None:
            for step in service.provision():
                _say(service, step)
            return _check(service)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"{service.name} could not be installed, started or set up: {exc}"
    return _wait_until_answers(service, _START_WAIT_SECONDS)


def _install_and_start(service: Service) -> None:
    if not service.installed():
        _say(service, f"not installed; installing the Debian package {service.apt_package}")
        apt_install(service.apt_package)
    # A package's own install script may already have started it.
    if tcp_open(service):
        return
    for command in service.start_commands():
        _say(service, f"starting: {' '.join(command)}")
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL)


def apt_install(*packages: str) -> None:
    """Install Debian packages (and update the package lists first), without questions."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdin=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _wait_until_listening(service: Service, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not tcp_open(service):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def _wait_until_answers(service: Service, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    problem = _check(service)
    while problem is not None and time.monotonic() < deadline:
        time.sleep(1.0)
        problem = _check(service)
    return problem


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _postgres(url: str) -> Service:
    host, port = _host_port(url, 5432)

    def ping() -> None:
        with psycopg.connect(url, connect_timeout=5) as conn:
            pool.ping(conn)

    return Service(
        name="PostgreSQL",
        env_var="POSTGRES_URL",
        host=host,
        port=port,
        ping=ping,
        apt_package="postgresql",
        installed=lambda: _postgres_clusters() != [],
        start_commands=lambda: [_pg_start_command()],
        provision=lambda: provision_postgres(url),
    )


def _postgres_clusters() -> list[str]:
    root = _POSTGRES_CLUSTERS
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _pg_start_command() -> list[str]:
    version = _postgres_clusters()[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"]


# Idempotent: each statement is generated only when its object is missing (psql's \gexec).
_PROVISION_SQL = r"""
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'password')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \gexec
"""
_EXISTING_SQL = r"""
SELECT CASE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') THEN 'role' END;
SELECT CASE WHEN EXISTS (SELECT FROM pg_database WHERE datname = :'database') THEN 'database' END;
"""


@dataclass(frozen=True)
class DatabaseLogin:
    """The role, password and database a PostgreSQL URL logs in with."""

    role: str
    password: str
    database: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> DatabaseLogin:
        parts = urlsplit(url)
        role = unquote(parts.username or "")
        database = unquote(parts.path.lstrip("/")) or role
        return cls(role, unquote(parts.password or ""), database, parts.port or 5432)


def provision_postgres(url: str) -> list[str]:
    """Create the URL's role (with its password) and database on the local cluster, if missing.

    Runs psql as the `postgres` OS user over the local socket (peer authentication), so it works
    on a fresh Debian install whose TCP logins all need a password. An existing role keeps its
    password: this never changes credentials someone else set. Returns what it did."""
    login = DatabaseLogin.from_url(url)
    if not login.role or not login.password:
        raise OSError(
            f"POSTGRES_URL {_without_password(url)} names no role and password to create; "
            "give it both (postgresql://ROLE:PASSWORD@host:port/database)"
        )
    existed = _postgres_objects(login)
    _run_as_postgres(login, _PROVISION_SQL)
    done = [f"role {login.role} exists" if "role" in existed else f"created role {login.role}"]
    if "database" in existed:
        done.append(f"database {login.database} exists")
    else:
        done.append(f"created database {login.database} owned by {login.role}")
    return done


def _postgres_objects(login: DatabaseLogin) -> set[str]:
    return set(_run_as_postgres(login, _EXISTING_SQL).split())


def _run_as_postgres(login: DatabaseLogin, sql: str) -> str:
    command = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-At"]
    command += ["-v", "ON_ERROR_STOP=1", "-p", str(login.port), "-d", "postgres"]
    command += ["-v", f"role={login.role}", "-v", f"password={login.password}"]
    command += ["-v", f"database={login.database}"]
    done = subprocess.run(command, input=sql, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"psql as postgres failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _redis(url: str) -> Service:
    host, port = _host_port(url, 6379)

    def ping() -> None:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        finally:
            client.close()

    start = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port)]
    return Service(
        name="Redis",
        env_var="REDIS_URL",
        host=host,
        port=port,
        ping=ping,
        apt_package="redis-server",
        installed=lambda: shutil.which("redis-server") is not None,
        start_commands=lambda: [[*start, "--save", "", "--appendonly", "no"]],
    )


def _rabbitmq(settings: Settings) -> Service:
    url = settings.queue.url
    host, port = _host_port(url, 5671 if url.startswith("amqps") else 5672)

    def ping() -> None:
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.blocked_connection_timeout = 5
        pika.BlockingConnection(params).close()

    return Service(
        name="RabbitMQ",
        env_var="RABBITMQ_URL",
        host=host,
        port=port,
        ping=ping,
        apt_package="rabbitmq-server",
        installed=lambda: shutil.which("rabbitmq-server") is not None,
        start_commands=lambda: [["rabbitmq-server", "-detached"]],
    )
