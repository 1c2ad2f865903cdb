"""Process measurements from /proc (Linux): CPU seconds of a process tree, memory peaks, and
finding service processes by name. No psutil: a handful of /proc reads is all that is needed."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None if gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def cpu_seconds(pid: int, include_reaped_children: bool = True) -> float:
    """utime + stime of a process, plus cutime + cstime (its children that exited and were
    waited for) when asked; 0 when the process is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    ticks = int(fields[11]) + int(fields[12])
    if include_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def all_pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def descendants(root: int) -> list[int]:
    """root and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        parent = parent_pid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process tree: every live member's own time plus its reaped children.

    A live process's cutime covers only children already gone, so nothing is counted twice."""
    return sum(cpu_seconds(pid) for pid in descendants(root))


def command_name(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def pids_named(predicate: Callable[[str], bool]) -> list[int]:
    """Live processes whose command name (/proc/<pid>/comm) satisfies predicate."""
    return [pid for pid in all_pids() if predicate(command_name(pid))]


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set since start (or since reset_peak_rss)."""
    return _status_kib(pid, "VmHWM") / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages divided among their users, so sums over processes
    sharing memory (the engine's shared-memory arenas) are not inflated."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def reset_peak_rss(pids: Iterable[int]) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs; needs the right to); True if all
    resets succeeded."""
    ok = True
    for pid in pids:
        try:
            (PROC / str(pid) / "clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def cpu_seconds_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """`cpu_seconds` of each process of `pids` that is still alive; gone ones are left out, so
    a difference of two snapshots taken over the same pids never counts a vanished process as
    negative time."""
    snapshot = {}
    for pid in pids:
        if _stat_fields(pid) is not None:
            snapshot[pid] = cpu_seconds(pid)
    return snapshot


@dataclass
class MemorySampler:
    """A thread sampling the summed RSS and PSS of a process tree until stopped; keeps peaks."""

    root: int
    interval_s: float = 0.2
    peak_rss_sum_mib: float = 0.0
    peak_pss_sum_mib: float = 0.0
    peak_single_rss_mib: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        pids = descendants(self.root)
        rss = [rss_mib(pid) for pid in pids]
        self.peak_rss_sum_mib = max(self.peak_rss_sum_mib, sum(rss))
        self.peak_pss_sum_mib = max(self.peak_pss_sum_mib, sum(pss_mib(pid) for pid in pids))
        self.peak_single_rss_mib = max(
            [self.peak_single_rss_mib, *rss, *(peak_rss_mib(pid) for pid in pids)]
        )
