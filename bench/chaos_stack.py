"""The chaos run's stack, every part of it its own: PostgreSQL, RabbitMQ, Redis and SeaweedFS on
free ports under one temporary directory (ops.private_services, ops.s3server), a local token
issuer, the API under real gunicorn and two worker nodes. Each node reaches every service
through a TcpProxy of its own, so that one node's network can be cut while the other carries on.

Only what this module started is ever signalled, by the pid it started: the shared services on
the machine are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procstat import descendants
from common.config import Settings
from common.storage import ObjectStore
from common.waiting import wait_for
from db.migrate import apply_migrations
from ops.issuer import LocalIssuer, running
from ops.private_services import PrivatePostgres, PrivateRabbitMQ, PrivateRedis
from ops.s3server import LocalS3Server, pick_free_s3_port
from ops.stack import http_ok
from ops.tcp_proxy import TcpProxy, lasting_port
from ops.worker_process import ROOT, start_worker

S3_ACCESS_KEY = "pixelmill-chaos"
S3_SECRET_KEY = "pixelmill-chaos-secret"
# The services a node reaches through its proxies (the names of the network cuts).
LINKS = ("postgres", "rabbitmq", "redis", "s3")
NODES = 2


@dataclass(frozen=True)
class StackOptions:
    """How big the stack is: API workers, CPU processes per node."""

    api_workers: int = 2
    node_processes: int = 1
    node_batch_size: int = 16


@dataclass
class Services:
    postgres: PrivatePostgres
    rabbitmq: PrivateRabbitMQ
    redis: PrivateRedis
    s3: LocalS3Server
    issuer: LocalIssuer


@dataclass
class ChaosStack:
    """The running stack and the handles the fault injector needs."""

    work: Path
    logs: Path
    services: Services
    options: StackOptions
    api_port: int = field(default_factory=lasting_port)
    proxies: list[dict[str, TcpProxy]] = field(default_factory=list)
    nodes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    api: subprocess.Popen[bytes] | None = None
    unplanned_exits: list[str] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        """The environment of the API (services reached directly)."""
        s = self.services
        return {
            "PIXELMILL_ENV": "local",
            "LOG_FORMAT": "text",
            "POSTGRES_URL": s.postgres.url,
            "REDIS_URL": s.redis.url,
            "REDIS_PREFIX": "pmchaos:",
            "RABBITMQ_URL": s.rabbitmq.url,
            "RABBITMQ_QUEUE": "pm-chaos",
            "MINIO_ENDPOINT": s.s3.endpoint,
            "MINIO_ACCESS_KEY": S3_ACCESS_KEY,
            "MINIO_SECRET_KEY": S3_SECRET_KEY,
            "MINIO_RAW_BUCKET": "chaos-raw",
            "MINIO_PROCESSED_BUCKET": "chaos-processed",
            "KEYCLOAK_URL": s.issuer.base_url,
            "API_WORKERS": str(self.options.api_workers),
            "UPLOADS_PER_MINUTE": "1000000",
            "BATCHES_PER_MINUTE": "0",
            "MAX_UPLOADS_PER_USER": "16",
            "METRICS_PORT": "0",
            "WORKER_PROCESSES": str(self.options.node_processes),
            "WORKER_BATCH_SIZE": str(self.options.node_batch_size),
            "WORKER_MEMORY_MB": "256",
            # The receiver is on 127.0.0.1; retries and sweeps fast enough to settle in minutes.
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "WEBHOOK_SWEEP_SECONDS": "0.5",
            "ABANDONED_UPLOAD_SWEEP_SECONDS": "5",
            "ABANDONED_UPLOAD_AGE_SECONDS": "30",
        }

    def node_env(self, index: int) -> dict[str, str]:
        """A node's environment: every service through that node's proxies."""
        links = {name: proxy.port for name, proxy in self.proxies[index].items()}
        s = self.services
        return {
            **self.env(),
            "POSTGRES_URL": s.postgres.url_at(links["postgres"]),
            "RABBITMQ_URL": s.rabbitmq.url_at(links["rabbitmq"]),
            "REDIS_URL": s.redis.url_at(links["redis"]),
            "MINIO_ENDPOINT": f"127.0.0.1:{links['s3']}",
        }

    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    # -- the API ---------------------------------------------------------------------------

    def start_api(self, timeout: float = 90.0) -> None:
        with self.log("api").open("ab") as log:
            self.api = subprocess.Popen(
                [sys.executable, "-m", "ingest.serve", "--bind", f"127.0.0.1:{self.api_port}"],
                cwd=ROOT,
                env={**os.environ, **self.env()},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._api_answers, timeout, 0.25, what="the API to answer /health")

    def _api_answers(self) -> bool:
        if self.api is not None and self.api.poll() is not None:
            raise RuntimeError(f"the API exited; see {self.log('api')}")
        return http_ok(f"{self.api_url}/health")

    def api_workers(self) -> list[int]:
        if self.api is None or self.api.poll() is not None:
            return []
        return [pid for pid in descendants(self.api.pid) if _parent(pid) == self.api.pid]

    # -- worker nodes ----------------------------------------------------------------------

    def start_node(self, index: int) -> None:
        flags = [f"--processes={self.options.node_processes}"]
        self.nodes[index] = start_worker(self.node_env(index), self.log(f"node-{index}"), *flags)

    def kill_node(self, index: int) -> None:
        """SIGKILL the node alone: its CPU processes must notice and end by themselves."""
        node = self.nodes[index]
        if node is not None and node.poll() is None:
            node.kill()
            node.wait()
        self.nodes[index] = None

    def cpu_processes(self, index: int) -> list[int]:
        """The pool's processes of node `index`: the children of its fork server."""
        node = self.nodes[index]
        if node is None or node.poll() is not None:
            return []
        for pid in descendants(node.pid):
            with contextlib.suppress(OSError):
                if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
                    return [int(c) for c in children.split()]
        return []

    # -- supervision -----------------------------------------------------------------------

    def revive(self) -> list[str]:
        """Restart what exited without being told to (what an orchestrator would do), and say
        which: a node or the API leaving on its own is a finding, not a fault we injected."""
        revived = []
        for index, node in enumerate(self.nodes):
            if node is not None and node.poll() is not None:
                revived.append(f"node-{index} (exit {node.returncode})")
                self.start_node(index)
        if self.api is not None and self.api.poll() is not None:
            revived.append(f"api (exit {self.api.returncode})")
            with contextlib.suppress(RuntimeError, TimeoutError):
                self.start_api()
        self.unplanned_exits.extend(revived)
        return revived

    def close(self) -> None:
        for index in range(len(self.nodes)):
            _terminate(self.nodes[index], 60.0)
        _terminate(self.api, 30.0)
        for links in self.proxies:
            for proxy in links.values():
                proxy.close()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def chaos_stack(work: Path, logs: Path, options: StackOptions) -> Iterator[ChaosStack]:
    """Start everything (services, schema, buckets, API, nodes) under `work`, their logs in
    `logs`, and stop it all afterwards."""
    logs.mkdir(parents=True, exist_ok=True)
    work.mkdir(mode=0o755, parents=True, exist_ok=True)  # PostgreSQL runs as its own user below
    postgres = PrivatePostgres(work / "postgres", logs / "postgres.log")
    rabbitmq = PrivateRabbitMQ(work / "rabbitmq", logs / "rabbitmq.log")
    redis_server = PrivateRedis(logs / "redis.log")
    s3 = LocalS3Server(
        work / "s3",
        port=pick_free_s3_port(),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        log_path=logs / "s3.log",
    )
    with contextlib.ExitStack() as cleanup:
        postgres.init()
        cleanup.callback(postgres.stop)
        rabbitmq.init()
        cleanup.callback(rabbitmq.close)
        redis_server.start()
        cleanup.callback(redis_server.kill)
        s3.start()
        cleanup.callback(s3.stop)
        issuer = cleanup.enter_context(running(work / "issuer"))
        stack = ChaosStack(
            work, logs, Services(postgres, rabbitmq, redis_server, s3, issuer), options
        )
        settings = stack.settings()
        apply_migrations(settings.postgres_url)
        ObjectStore(settings.storage).ensure_buckets()
        cleanup.callback(stack.close)
        stack.proxies = [_proxies(stack) for _ in range(NODES)]
        stack.start_api()
        stack.nodes = [None] * NODES
        for index in range(NODES):
            stack.start_node(index)
        yield stack


def _proxies(stack: ChaosStack) -> dict[str, TcpProxy]:
    s = stack.services
    ports = {
        "postgres": s.postgres.port,
        "rabbitmq": s.rabbitmq.port,
        "redis": s.redis.port,
        "s3": s.s3.ports.s3,
    }
    proxies = {name: TcpProxy(port) for name, port in ports.items()}
    for proxy in proxies.values():
        proxy.start()
    return proxies
