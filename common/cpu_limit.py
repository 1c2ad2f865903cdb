"""How many cores this process may use: the CPU affinity mask, further limited by a cgroup CPU
quota (a container's CPU limit), which `os.cpu_count()` ignores. Worker nodes size their pool
by it, and the autoscaler never asks a node for more processes than it reports."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The smaller of the affinity mask and the cgroup quota (rounded up); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """Cores' worth of CPU time the cgroup allows per period; None when unlimited or unknown.

    cgroup v2 writes `cpu.max` as "QUOTA PERIOD" ("max PERIOD" when unlimited); v1 has
    `cpu.cfs_quota_us` (-1 when unlimited) and `cpu.cfs_period_us`.
    """
    v2 = _read(cgroup_root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return _ratio(quota, period)
    v1_quota = _read(cgroup_root / "cpu" / "cpu.cfs_quota_us")
    v1_period = _read(cgroup_root / "cpu" / "cpu.cfs_period_us")
    if v1_quota is not None and v1_period is not None:
        return _ratio(v1_quota, v1_period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    if q <= 0 or p <= 0:
        return None
    return q / p


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
