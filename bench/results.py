"""Benchmark results on disk: one directory per run holding results.json and summary.md.

Every results file carries what is needed to trust or reproduce its numbers: the machine, the
versions of the libraries measured, the settings, the git commit and the time of the run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("command", "timestamp", "git_commit", "machine", "packages", "settings")
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
_DISTRIBUTIONS = {
    "opencv": "opencv-python-headless",
    "numpy": "numpy",
    "pyvips": "pyvips",
    "pillow": "pillow",
    "imagecodecs": "imagecodecs",
    "matplotlib": "matplotlib",
}


def _command_output(command: Sequence[str], cwd: Path | None = None) -> str | None:
    try:
        completed = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def git_commit(repo_root: Path) -> str:
    """The checked-out commit, or "unknown" outside a repository or before the first commit."""
    return _command_output(["git", "rev-parse", "HEAD"], cwd=repo_root) or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and OS of the machine running the benchmark."""
    memory = _memory_bytes()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _libvips_version() -> str | None:
    try:
        import pyvips
    except (ImportError, OSError):
        return None
    return ".".join(str(pyvips.version(part)) for part in range(3))


def package_versions() -> dict[str, str | None]:
    """Versions of the libraries and toolchains under test (None where not installed)."""
    versions: dict[str, str | None] = {}
    for label, distribution in _DISTRIBUTIONS.items():
        try:
            versions[label] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[label] = None
    versions["libvips"] = _libvips_version()
    versions["go"] = _command_output(["go", "version"])
    return versions


def new_run_dir(results_root: Path, command: str, now: datetime | None = None) -> Path:
    """A fresh directory results_root/<UTC timestamp>-<command>/ for one run."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    run_dir = results_root / f"{stamp}-{command}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = results_root / f"{stamp}-{command}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def build_document(
    command: str, settings: dict[str, Any], payload: dict[str, Any], repo_root: Path
) -> dict[str, Any]:
    """The results document: provenance keys (REQUIRED_KEYS) followed by the payload."""
    return {
        "command": command,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(repo_root),
        "machine": machine_info(),
        "packages": package_versions(),
        "settings": settings,
        **payload,
    }


def write_results(run_dir: Path, document: dict[str, Any], summary_markdown: str) -> Path:
    """Write results.json and summary.md into run_dir; return the JSON path."""
    missing = [key for key in REQUIRED_KEYS if key not in document]
    if missing:
        raise ValueError(f"results document lacks {', '.join(missing)}")
    path = run_dir / RESULTS_FILE
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (run_dir / SUMMARY_FILE).write_text(summary_markdown, encoding="utf-8")
    return path


def read_results(path: Path) -> dict[str, Any]:
    """A results document written by write_results."""
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats are shown with three significant figures."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
