"""What worker nodes and operator tools share in Redis: the desired process count and heartbeats.

Operators write `{prefix}engine:processes` (a decimal string) and every node resizes its CPU
pool to it. Each node writes a heartbeat hash under `{prefix}engine:nodes:{host}:{pid}` every
CONTROL_INTERVAL_SECONDS; it expires HEARTBEAT_TTL_SECONDS after the last beat, so a node that
died drops out of `ops status` on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

CONTROL_INTERVAL_SECONDS = 2.0
HEARTBEAT_TTL_SECONDS = 10


def desired_processes_key(prefix: str) -> str:
    """Desired CPU processes per worker node (decimal string); nodes resize to it."""
    return f"{prefix}engine:processes"


def heartbeat_key(prefix: str, host: str, pid: int) -> str:
    """Heartbeat hash of one worker node."""
    return f"{prefix}engine:nodes:{host}:{pid}"


def heartbeat_key_pattern(prefix: str, host: str = "*") -> str:
    """A SCAN pattern for the heartbeat keys of every node on `host` (default: any host)."""
    return f"{prefix}engine:nodes:{host}:*"


def node_of_heartbeat_key(key: str) -> tuple[str, int]:
    """(host, pid) named by a heartbeat key."""
    rest, _, pid = key.rpartition(":")
    return rest.rpartition(":")[2], int(pid)


@dataclass(frozen=True)
class Heartbeat:
    """The fields of a heartbeat hash; times are epoch seconds, counters count since start."""

    processes: int
    completed: int
    failed: int
    batches: int
    started_at: float
    heartbeat: float
    queue: str

    def to_hash(self) -> dict[str, int | float | str]:
        return asdict(self)

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> Heartbeat:
        """Read a hash as Redis returns it (strings); a missing or empty field reads as zero."""
        return cls(
            processes=int(fields.get("processes", 0) or 0),
            completed=int(fields.get("completed", 0) or 0),
            failed=int(fields.get("failed", 0) or 0),
            batches=int(fields.get("batches", 0) or 0),
            started_at=float(fields.get("started_at", 0) or 0),
            heartbeat=float(fields.get("heartbeat", 0) or 0),
            queue=fields.get("queue", ""),
        )
