"""Backing services for a local run: check PostgreSQL, Redis and RabbitMQ answer, start them if not.

Each service is first probed by TCP, then pinged with its real client. A closed local port on a
Debian machine where we are root is fixed by installing (apt-get) and starting the service; in every
other case `ensure_services` raises `ServicesUnavailable` saying exactly what to start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pika.exceptions
import psycopg
import redis

from common.config import Settings
from db import pool

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_START_WAIT_SECONDS = 60.0
_COMPOSE_HINT = "docker compose up -d postgres redis rabbitmq minio"
_PING_ERRORS = (psycopg.Error, redis.RedisError, pika.exceptions.AMQPError, OSError)


class ServicesUnavailable(RuntimeError):
    """One or more backing services cannot be reached; the message says what to start."""


@dataclass(frozen=True)
class Service:
    """A backing service: where it listens, how to ping it, how to install and start it locally."""

    name: str
    env_var: str
    host: str
    port: int
    ping: Callable[[], None]
    apt_package: str
    installed: Callable[[], bool]
    start_commands: Callable[[], list[list[str]]]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        return self.host in _LOOPBACK


def services_for(settings: Settings) -> list[Service]:
    """The services a pixelmill process needs, addressed as `settings` says."""
    return [_postgres(settings.postgres_url), _redis(settings.redis_url), _rabbitmq(settings)]


def ensure_services(settings: Settings, *, allow_install: bool = True) -> None:
    """Return once every service answers, starting local ones when allowed; else raise."""
    can_fix = allow_install and _can_manage_packages()
    problems = []
    for service in services_for(settings):
        problem = _check(service)
        if problem is not None and can_fix and service.is_local and not tcp_open(service):
            problem = _install_and_start(service)
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


def _can_manage_packages() -> bool:
    """Debian (or derivative) with apt-get, and we are root."""
    return (
        Path("/etc/debian_version").exists()
        and shutil.which("apt-get") is not None
        and os.geteuid() == 0
    )


def _install_and_start(service: Service) -> str | None:
    print(f"{service.name} is not running on {service.address}; starting it", flush=True)
    try:
        if not service.installed():
            _apt_install(service.apt_package)
        for command in service.start_commands():
            subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"{service.name} could not be installed or started: {exc}"
    return _wait_until_answers(service, _START_WAIT_SECONDS)


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdin=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
        check=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )


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
    )


def _postgres_clusters() -> list[str]:
    root = Path("/etc/postgresql")
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _pg_start_command() -> list[str]:
    version = _postgres_clusters()[-1]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"]


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
