"""Background processes owned through a pid file: start detached, recognise, stop, read logs.

A pid file alone is not proof of ownership (pids are reused), so a process counts as ours only
while its command line still contains the `marker` it was started with.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_POLL_SECONDS = 0.1


def command_line(pid: int) -> str | None:
    """The command line of a live process, arguments joined by spaces; None if it is gone.

    A process in the middle of exec briefly has an empty command line; that reads as "".
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if state in ("Z", "X"):
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def settled_command_line(pid: int, patience: float = 1.0) -> str | None:
    """`command_line`, waiting up to `patience` seconds for an exec in progress to finish."""
    deadline = time.monotonic() + patience
    cmdline = command_line(pid)
    while cmdline == "" and time.monotonic() < deadline:
        time.sleep(0.01)
        cmdline = command_line(pid)
    return cmdline


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group `pgid` (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class Stopped(enum.Enum):
    """What `BackgroundProcess.stop` found and did."""

    NOT_RUNNING = "was not running"
    TERMINATED = "stopped"
    KILLED = "killed (did not stop on SIGTERM)"


class BackgroundProcess:
    """One detached command with its pid file and log file.

    The command runs in its own session (so Ctrl-C in the starting terminal does not reach it and
    its whole process group can be stopped together), with stdout and stderr appended to the log.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pid_path: Path,
        log_path: Path,
        marker: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.pid_path = pid_path
        self.log_path = log_path
        self.marker = marker
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._child: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        """The pid of our running process, or None (a stale pid file is ignored, not trusted)."""
        self._reap()
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        cmdline = settled_command_line(pid)
        if cmdline is None or self.marker not in cmdline:
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self) -> int:
        """Start the command unless it is already running; returns its pid."""
        running = self.pid()
        if running is not None:
            return running
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log, open(os.devnull, "rb") as devnull:
            self._child = subprocess.Popen(
                self.argv,
                stdin=devnull,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._child.pid}\n")
        return self._child.pid

    def exited(self) -> int | None:
        """The exit status if this object started the process and it has ended, else None."""
        return self._child.poll() if self._child is not None else None

    def stop(self, timeout: float = 10.0) -> Stopped:
        """SIGTERM the process, SIGKILL its whole group if it is not gone after `timeout`."""
        pid = self.pid()
        outcome = Stopped.NOT_RUNNING
        if pid is not None:
            _signal(pid, signal.SIGTERM)
            outcome = Stopped.TERMINATED
            if not self._wait_group_gone(pid, timeout):
                _signal_group(pid, signal.SIGKILL)
                self._wait_group_gone(pid, timeout)
                outcome = Stopped.KILLED
        self.pid_path.unlink(missing_ok=True)
        return outcome

    def _wait_group_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            leader_gone = command_line(pgid) is None
            if leader_gone and not group_alive(pgid):
                return True
            if leader_gone:
                # The leader left children behind; they belong to us, so they go too.
                _signal_group(pgid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)

    def _reap(self) -> None:
        # A child we started stays a zombie (and looks alive to kill(0)) until waited for.
        if self._child is not None:
            self._child.poll()


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)
