"""What worker nodes and operator tools share in Redis: the desired process count and heartbeats.

Operators write `{prefix}engine:processes` (a decimal string) and every node resizes its CPU
pool to it; while the key is absent, each node runs its own start-up count. Who set the count is
recorded beside it (`ScalingSource`): an operator's count stays until `ops scale --reset`, the
autoscaler's is a lease that lapses unless renewed, so it ends when the autoscaler stops.

Each node writes a heartbeat hash under `{prefix}engine:nodes:{host}:{pid}` every
CONTROL_INTERVAL_SECONDS; it expires HEARTBEAT_TTL_SECONDS after the last beat, so a node that
died drops out of `ops status` on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

CONTROL_INTERVAL_SECONDS = 2.0
HEARTBEAT_TTL_SECONDS = 10


def desired_processes_key(prefix: str) -> str:
    """Desired CPU processes per worker node (decimal string); nodes resize to it."""
    return f"{prefix}engine:processes"


def scaling_source_key(prefix: str) -> str:
    """Who set the desired count and when (a hash of `ScalingSource` fields); written together
    with the count and expiring with it."""
    return f"{prefix}engine:processes:source"


SetBy = Literal["operator", "autoscaler"]


@dataclass(frozen=True)
class ScalingSource:
    """Who set the desired process count, when (epoch seconds), and for how long: `lease_seconds`
    0 means until reset."""

    set_by: SetBy
    set_at: float
    lease_seconds: float = 0.0

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> ScalingSource | None:
        """None for a missing hash; a count written without one (by hand) reads as an
        operator's."""
        if not fields:
            return None
        set_by: SetBy = "autoscaler" if fields.get("set_by") == "autoscaler" else "operator"
        return cls(
            set_by=set_by,
            set_at=float(fields.get("set_at", 0) or 0),
            lease_seconds=float(fields.get("lease_seconds", 0) or 0),
        )


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
    # The cores this node may use (its CPU limit in a container) and the process count it
    # started with, which it returns to when no desired count is set; 0 when not reported.
    cores: int = 0
    start_processes: int = 0
    # While the node holds its work because a dependency does not answer: its name ("object
    # storage", "database") and since when; "" and 0 while it works.
    paused_dependency: str = ""
    paused_since: float = 0.0

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
            cores=int(fields.get("cores", 0) or 0),
            start_processes=int(fields.get("start_processes", 0) or 0),
            paused_dependency=fields.get("paused_dependency", ""),
            paused_since=float(fields.get("paused_since", 0) or 0),
        )
