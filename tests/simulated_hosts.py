"""Several hosts on one machine, for tests: a worker node in Linux namespaces of its own (UTS:
its hostname; PID: the node is PID 1; mount: a directory of the host's bound on `/dev/shm`), that
reaches the services over the machine's loopback like a container with host networking.

The host's `/dev/shm` directory outlives the node, as a Kubernetes `emptyDir` memory volume
outlives a container, so a node started again on the same host finds what a killed one left.
Needs root and util-linux `unshare`; `namespaces_unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from common.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
_UNSHARE = ["unshare", "--uts", "--pid", "--fork", "--mount", "--mount-proc", "--kill-child"]
# Runs inside the namespaces as their PID 1, then becomes the node: "$1" hostname, "$2" shm dir.
_ENTER_HOST = 'hostname "$1" && mount --bind "$2" /dev/shm && shift 2 && exec "$@"'


def namespaces_unavailable() -> str | None:
    """Why simulated hosts cannot be made here (a reason for a skip), or None when they can."""
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    if os.geteuid() != 0:
        return "PID, UTS and mount namespaces need root (CI runs as root)"
    trial = subprocess.run(
        [*_UNSHARE, "sh", "-c", "hostname trial-host"], capture_output=True, text=True, timeout=30
    )
    if trial.returncode != 0:
        return f"unshare refused to make namespaces: {trial.stderr.strip()}"
    return None


class SimulatedHost:
    """One host: a hostname, a `/dev/shm` directory and a log file that survive its node, and at
    most one running node (`python -m engine` as PID 1 of a PID namespace of its own)."""

    def __init__(self, hostname: str, root: Path) -> None:
        self.hostname = hostname
        self.shm_dir = root / hostname / "shm"
        self.shm_dir.mkdir(parents=True)
        self.log_path = root / hostname / "node.log"
        self._launcher: subprocess.Popen[bytes] | None = None
        self._node_pid: int | None = None
        self._namespace: str | None = None

    def start_node(self, env: Mapping[str, str], *args: str) -> None:
        """Start the host's node with this process's environment overlaid by `env`; its output
        is appended to the host's log."""
        assert not self.running, f"{self.hostname} already runs a node"
        enter = ["sh", "-c", _ENTER_HOST, "sh", self.hostname, str(self.shm_dir)]
        with self.log_path.open("ab") as log:
            self._launcher = subprocess.Popen(
                [*_UNSHARE, *enter, sys.executable, "-m", "engine", *args],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        launcher = self._launcher
        wait_for(lambda: launcher.poll() is not None or bool(_children(launcher.pid)), 30)
        if launcher.poll() is not None:
            raise AssertionError(f"{self.hostname}: the namespaces were not made:\n{self.log()}")
        self._node_pid = _children(launcher.pid)[0]
        self._namespace = os.readlink(f"/proc/{self._node_pid}/ns/pid")

    @property
    def running(self) -> bool:
        return self._launcher is not None and self._launcher.poll() is None

    @property
    def node_pid(self) -> int:
        """The node's pid as this machine sees it (inside its namespace it is 1)."""
        assert self._node_pid is not None, f"{self.hostname} has not started a node"
        return self._node_pid

    def pid_in_namespace(self) -> int:
        """The node's pid in its own PID namespace, from the kernel's NSpid line."""
        for line in Path(f"/proc/{self.node_pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise AssertionError("this kernel does not report NSpid")

    def namespace_processes(self) -> list[int]:
        """Every process of the node's PID namespace (the node, its fork server, its CPU
        processes...), by their pids on this machine; empty once the namespace is gone."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "pid") == self._namespace:
                    found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL the node from outside, as an OOM killer or a node failure would, and wait
        until its whole PID namespace is gone."""
        os.kill(self.node_pid, signal.SIGKILL)
        self._wait_launcher(30)
        wait_for(lambda: not self.namespace_processes(), 30)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the node (it drains) and return its exit status; SIGKILL after `timeout`."""
        if not self.running:
            return self._wait_launcher(0)
        os.kill(self.node_pid, signal.SIGTERM)
        try:
            return self._wait_launcher(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self._wait_launcher(0)

    def segments(self) -> set[str]:
        """The shared-memory files in the host's `/dev/shm` (segments and their lock files)."""
        return {path.name for path in self.shm_dir.iterdir()}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_launcher(self, timeout: float) -> int:
        assert self._launcher is not None
        return self._launcher.wait(timeout)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
