"""End-to-end benchmark: the running stack driven over HTTP by the upload client, as users would.

Uploads go through `ingest.client.upload_files` (the same code path as `pixelmill-upload`); the
statistics come from its per-file timings. A failed or rejected image counts as a failure and
never as throughput.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.corpus import MANIFEST_NAME, read_manifest, write_corpus
from bench.procstat import descendants, peak_rss_mib, reset_peak_rss, rss_mib
from bench.stats import percentiles, ratio
from ingest.client import UploadOptions, UploadReport, upload_files

ACCEPTED_REQUEST_STATUSES = (200, 201, 207)
# The product's wish: bulk uploads of 640x480 JPEGs at least twice as fast as single ones.
BULK_SPEEDUP_TARGET = 2.0


@dataclass(frozen=True)
class E2EConfig:
    """One end-to-end run against a stack at `url`."""

    url: str
    token: str
    count: int = 200
    concurrency: int = 4
    batch_size: int = 16
    image_class: str = "jpeg-small"
    single: bool = False
    wait_timeout_s: float = 600.0

    def settings(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "count": self.count,
            "concurrency": self.concurrency,
            "batch_size": self.batch_size,
            "image_class": self.image_class,
            "route": "single" if self.single else "bulk",
        }


def _ms(values: Sequence[float]) -> dict[str, float] | None:
    return percentiles([v * 1000 for v in values]) if values else None


def e2e_statistics(report: UploadReport) -> dict[str, Any]:
    """Throughput, latency percentiles and failures of one run; failures are not throughput."""
    files = [f for f in report.files if not f.from_journal]
    accepted = [f for f in files if f.was_accepted]
    completed = [f for f in files if f.outcome == "completed" and f.completed_at is not None]
    upload_window = max(report.uploads_ended_at - report.started_at, 1e-9)
    last_done = max((f.completed_at or 0.0 for f in completed), default=report.started_at)
    completed_window = max(last_done - report.started_at, 1e-9)
    failures = [f for f in files if f.outcome in ("failed", "rejected", "unfinished", "waiting")]
    ok_requests = [r for r in report.requests if r.http_status in ACCEPTED_REQUEST_STATUSES]
    latency = {
        "upload": _ms([r.ended - r.started for r in ok_requests]),
        "completed": _ms(
            [
                f.completed_at - f.request_started
                for f in completed
                if f.completed_at is not None and f.request_started is not None
            ]
        ),
    }
    return {
        "route": report.route,
        "images": len(files),
        "requests": len(report.requests),
        "upload_seconds": upload_window,
        "upload_requests_per_s": len(report.requests) / upload_window,
        "accepted_images_per_s": len(accepted) / upload_window,
        "completed_images_per_s": len(completed) / completed_window if completed else 0.0,
        "completed": len(completed),
        "failed": len(report.with_outcome("failed")),
        "rejected": len(report.with_outcome("rejected")),
        "unfinished": len(report.with_outcome("unfinished")) + len(report.with_outcome("waiting")),
        "failures": len(failures),
        "failure_reasons": dict(Counter(f.reason or "?" for f in failures).most_common(10)),
        "latency_ms": {name: value for name, value in latency.items() if value is not None},
    }


def e2e_images(cache_dir: Path, image_class: str, count: int, seed: int) -> list[Path]:
    """`count` distinct deterministic images of one class, generated once into cache_dir."""
    directory = cache_dir / f"e2e-{image_class}-{count}-{seed}"
    if not (directory / MANIFEST_NAME).exists():
        write_corpus(directory, count, seed, [image_class])
    return [directory / entry.file for entry in read_manifest(directory)]


def run_upload(config: E2EConfig, paths: Sequence[Path], single: bool) -> UploadReport:
    """Upload `paths` through the client with no journal; a fresh key salt per run, so that a
    repeated benchmark creates new images instead of replaying earlier answers."""
    options = UploadOptions(
        url=config.url,
        token=config.token,
        concurrency=config.concurrency,
        batch_size=config.batch_size,
        single=single,
        wait=True,
        wait_timeout_s=config.wait_timeout_s,
        poll_interval_s=0.1,
        progress_stream=sys.stderr,
        key_salt=uuid.uuid4().hex,
    )
    return upload_files(list(paths), options)


def mint_token(python: str, repo_root: Path, user: str, expires_in: int = 3600) -> str:
    """A token from the local issuer via `python -m ops token` (the stack's own command)."""
    completed = subprocess.run(
        [python, "-m", "ops", "token", "--user", user, "--expires-in", str(expires_in)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return completed.stdout.strip().splitlines()[-1]


def api_pids(state_dir: Path) -> list[int]:
    """The gunicorn master from `<state>/run/api.pid` and its worker processes."""
    try:
        master = int((state_dir / "run" / "api.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return descendants(master)


class RssWatcher:
    """Samples VmRSS of the API processes during a run; with VmHWM (reset at the start where
    permitted) it gives each process's peak during the run."""

    def __init__(self, pids: list[int], interval_s: float = 0.2) -> None:
        self.pids = pids
        self.hwm_reset = reset_peak_rss(pids) if pids else False
        self.peaks = {pid: rss_mib(pid) for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._interval_s = interval_s

    def __enter__(self) -> RssWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for pid in self.pids:
            hwm = peak_rss_mib(pid) if self.hwm_reset else 0.0
            self.peaks[pid] = max(self.peaks[pid], hwm, rss_mib(pid))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for pid in self.pids:
                self.peaks[pid] = max(self.peaks[pid], rss_mib(pid))

    def summary(self) -> dict[str, Any]:
        return {
            "processes": len(self.pids),
            "peak_rss_mib_per_process": {str(pid): round(v, 1) for pid, v in self.peaks.items()},
            "peak_rss_mib_max": max(self.peaks.values(), default=None),
            "method": "VmHWM after clear_refs=5, and VmRSS sampled every 0.2 s"
            if self.hwm_reset
            else "VmRSS sampled every 0.2 s (VmHWM could not be reset)",
        }


def compare_single_and_bulk(
    config: E2EConfig, single_paths: Sequence[Path], bulk_paths: Sequence[Path], state_dir: Path
) -> dict[str, Any]:
    """Single route, then bulk route, same concurrency and image class; the accepted-images/s
    ratio and the API workers' peak RSS during the bulk run."""
    single = e2e_statistics(run_upload(config, single_paths, single=True))
    with RssWatcher(api_pids(state_dir)) as watcher:
        bulk = e2e_statistics(run_upload(config, bulk_paths, single=False))
    speedup = ratio(bulk["accepted_images_per_s"], single["accepted_images_per_s"])
    return {
        "single": single,
        "bulk": bulk,
        "bulk_vs_single_accepted": speedup,
        "target": BULK_SPEEDUP_TARGET,
        "meets_target": speedup is not None and speedup >= BULK_SPEEDUP_TARGET,
        "api_memory_during_bulk": watcher.summary(),
    }
