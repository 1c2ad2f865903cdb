"""One worker node (`python -m engine`) as a child process of the caller, with its output in a
log file: how tests and benchmarks run a node of their own. (`python -m ops up` runs detached
nodes instead; see ops/stack.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_worker(
    env: Mapping[str, str], log_path: Path, *args: str, fresh_log: bool = False
) -> subprocess.Popen[bytes]:
    """Start a node with this process's environment overlaid by `env` and flags `args`; its
    output is appended to `log_path` (emptied first with `fresh_log`)."""
    with log_path.open("wb" if fresh_log else "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_worker(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM (the node drains), SIGKILL if it has not exited after `timeout` seconds; returns
    its exit status (that of its earlier exit, if it was gone already)."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
