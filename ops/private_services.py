"""Backing services of one caller only, on free ports under a directory of its own: a Redis, a
PostgreSQL cluster and a RabbitMQ node that a test or the chaos benchmark may kill and start
again without touching the shared services other people use.

Each is started as a child of the caller and stopped by the pid it started, never by name.
PostgreSQL refuses to run as root, so as root it is initialised and run as the `postgres` OS user
(`runuser`); RabbitMQ gets its own node name, ports, data and Erlang port mapper.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pika
import pika.exceptions
import psycopg
import redis

from common.waiting import wait_for
from ops.tcp_proxy import lasting_port

_STOP_SECONDS = 60.0


class PrivateServiceError(RuntimeError):
    """A private service could not be found or started; the message says what to install."""


def _wait_exit(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Wait for `process`; SIGKILL it if it has not exited after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _signal(pid: int | None, signum: signal.Signals) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class PrivateRedis:
    """A `redis-server` without persistence that can be killed."""

    def __init__(self, log_path: Path) -> None:
        self.port = lasting_port()
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_at(self.port)

    def url_at(self, port: int) -> str:
        """The URL of this server as reached through `port` (a proxy in front of it)."""
        return f"redis://127.0.0.1:{port}/0"

    def start(self, timeout: float = 10.0) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    "redis-server",
                    *("--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        wait_for(lambda: _pings(client), timeout, what="the private Redis to answer")

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def postgres_bin_dir() -> Path:
    """The directory of `initdb` and `postgres`: Debian's newest /usr/lib/postgresql/*/bin, else
    the one on PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)
    if versions:
        return Path(versions[-1])
    found = shutil.which("initdb")
    if found is None:
        raise PrivateServiceError(
            "PostgreSQL server binaries not found (apt-get install postgresql)"
        )
    return Path(found).resolve().parent


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in Path(path).parent.name.split(".") if p.isdigit())


class PrivatePostgres:
    """A PostgreSQL cluster in `root/data`, trusting local connections, on a free port of
    127.0.0.1. `crash()` is an immediate shutdown (SIGQUIT: no checkpoint, recovery from the WAL
    at the next start), as a machine or container dying would leave it."""

    def __init__(self, root: Path, log_path: Path, database: str = "pixelmill") -> None:
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.log_path = log_path
        self.database = database
        self.port = lasting_port()
        self._bin = postgres_bin_dir()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return self.url_at(self.port)

    def url_at(self, port: int) -> str:
        """The database's URL as reached through `port` (a proxy in front of it)."""
        return f"postgresql://postgres@127.0.0.1:{port}/{self.database}"

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def init(self) -> None:
        """initdb (once), then start it and create the database."""
        for directory in (self.root, self.sockets):
            directory.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(directory, "postgres", "postgres")
        command = [str(self._bin / "initdb"), "-D", str(self.data), "-U", "postgres"]
        with self.log_path.open("ab") as log:
            subprocess.run(
                [*self._as_owner(), *command, "--auth=trust", "--encoding=UTF8", "--no-sync"],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
            )
        self.start()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')

    def start(self, timeout: float = 60.0) -> None:
        settings = [
            "listen_addresses=127.0.0.1",
            "max_connections=300",
            "shared_buffers=64MB",
        ]
        flags = [arg for setting in settings for arg in ("-c", setting)]
        command = [str(self._bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [*self._as_owner(), *command, "-k", str(self.sockets), *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, timeout, 0.2, what="the private PostgreSQL to accept connections")

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise PrivateServiceError(f"PostgreSQL exited; see {self.log_path}")
        try:
            with psycopg.connect(self.admin_url, connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def crash(self) -> None:
        """Immediate shutdown: every backend is told to quit at once."""
        self._stop(signal.SIGQUIT)

    def stop(self) -> None:
        """Fast shutdown: sessions are ended, a checkpoint is written."""
        self._stop(signal.SIGINT)

    def _stop(self, signum: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        _signal(self.postmaster_pid(), signum)
        _wait_exit(self._process, _STOP_SECONDS)


def rabbitmq_server_command() -> str:
    """RabbitMQ's own start script (not Debian's wrapper, which switches to the `rabbitmq` user
    and its shared data directory)."""
    own = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if own.is_file():
        return str(own)
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise PrivateServiceError("rabbitmq-server not found (apt-get install rabbitmq-server)")
    return found


class PrivateRabbitMQ:
    """A RabbitMQ node of its own: node name, AMQP and distribution ports, data, logs, Erlang
    cookie and port mapper (epmd) all under `root`, none of them shared with a system broker.
    Its data survives `restart()`, so durable queues and persistent messages do too."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.log_path = log_path
        self.port = lasting_port()
        self.dist_port = lasting_port()
        self.epmd_port = lasting_port()
        self.nodename = f"pixelmill-{self.port}@localhost"
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_at(self.port)

    def url_at(self, port: int) -> str:
        """The broker's URL as reached through `port` (a proxy in front of it)."""
        return f"amqp://guest:guest@127.0.0.1:{port}/%2F"

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.root),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbitmq.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_LOGS": "-",
        }

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        with self.log_path.open("ab") as log:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.start()

    def start(self, timeout: float = 120.0) -> None:
        with self.log_path.open("ab") as log:
            self._server = subprocess.Popen(
                [rabbitmq_server_command()],
                env=self.environment(),
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, timeout, 0.5, what="the private RabbitMQ to accept connections")

    def _answers(self) -> bool:
        if self._server is not None and self._server.poll() is not None:
            raise PrivateServiceError(f"RabbitMQ exited; see {self.log_path}")
        parameters = pika.URLParameters(self.url)
        parameters.connection_attempts = 1
        parameters.socket_timeout = 2
        try:
            pika.BlockingConnection(parameters).close()
        except (pika.exceptions.AMQPError, OSError):
            return False
        return True

    def _beam_pid(self) -> int | None:
        try:
            return int((self.root / "rabbitmq.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return self._server.pid if self._server is not None else None

    def stop(self) -> None:
        """A clean stop (SIGTERM to the Erlang VM: RabbitMQ shuts its queues down in order)."""
        if self._server is None or self._server.poll() is not None:
            return
        _signal(self._beam_pid(), signal.SIGTERM)
        _wait_exit(self._server, _STOP_SECONDS)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._epmd is not None:
            self._epmd.terminate()
            _wait_exit(self._epmd, 10.0)
