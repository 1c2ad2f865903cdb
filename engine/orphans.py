"""Keeps a node that dies hard (SIGKILL, OOM) from leaving its CPU processes behind.

The CPU processes are children of multiprocessing's fork server, not of the node, so nothing
ends them when the node dies. The node's entry point has the fork server run `guard_fork_server`
at its start (through `engine.forkserver_guard`), which asks the kernel to kill it with its
parent; each CPU process does the same towards the fork server and also watches the node's pid.
Nothing here acts on import.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

NODE_PID_ENV = "PIXELMILL_NODE_PID"
# The module the fork server preloads; importing it runs `guard_fork_server`.
FORK_SERVER_GUARD = "engine.forkserver_guard"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Linux: SIGKILL this process when its parent exits. False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def exit_when_gone(pid: int, interval_seconds: float = 0.5) -> None:
    """Exit this process as soon as process `pid` no longer exists (a watchdog thread)."""

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            threading.Event().wait(interval_seconds)

    threading.Thread(target=watch, name="node-watchdog", daemon=True).start()


def guard_fork_server() -> None:
    """In the fork server, at its start: die with the node whose pid it inherited in
    NODE_PID_ENV. Does nothing in any other process."""
    # Only the fork server is a direct child of the node that exported its pid.
    node_pid = os.environ.get(NODE_PID_ENV)
    if node_pid and node_pid == str(os.getppid()):
        die_with_parent()
        if str(os.getppid()) != node_pid:  # the node died before the request took effect
            os._exit(1)
