"""`python -m bench soak`: many images through the client into one batch, against the running
stack, to show that nothing degrades with the count.

The images are one small JPEG made unique by a comment segment carrying its number, so 100,000
of them cost a few hundred megabytes, not a corpus of photos. The run measures, idle before it
(after a warm-up of about 1,000 rows) and idle after it: the p99 of `GET` batch, of `GET` image and
of a list page at the deepest cursor, the size of the tables and their indexes, and Redis memory.
During it: completed images per second for each tenth of the images by completion order, the
p99 of those `GET`s sampled over time, and the resident memory of every pixelmill process
(RabbitMQ, PostgreSQL and the S3 server are reported, not judged). Targets:

- among the tenths completed after the uploads ended, the last one's rate >= 0.9x the first's;
- every `GET` p99 after the run <= 1.5x its value before;
- no pixelmill process's memory grows with the count.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psycopg
import redis

from bench.procstat import command_name, descendants, peak_rss_mib, pids_named, rss_mib
from bench.stats import percentile
from common.config import Settings
from ingest.client import (
    ApiConnection,
    UploadOptions,
    UploadReport,
    open_batch_for_run,
    upload_files,
)
from ingest.routes.images import encode_cursor

RATE_TARGET = 0.9
P99_TARGET = 1.5
# A process "grows" when its memory at the end exceeds that at the first tenth by more than this
# share and this many MiB together (allocator noise and caches warming are not growth).
MEMORY_SLACK_SHARE = 0.10
MEMORY_SLACK_MIB = 16.0
IMAGES_PER_FOLDER = 1000
TABLES = ("images", "batches", "webhook_deliveries", "idempotency_keys", "upload_intents")
# What the services' processes are called (/proc/<pid>/comm).
SERVICES = {"postgresql": "postgres", "rabbitmq": "beam.smp", "s3": "weed"}


@dataclass(frozen=True)
class SoakConfig:
    url: str
    token: str
    settings: Settings
    state_dir: Path
    work_dir: Path
    count: int = 100_000
    warmup: int = 1000
    concurrency: int = 4
    batch_size: int = 50
    samples: int = 200
    image_size: tuple[int, int] = (160, 120)
    sample_interval_s: float = 2.0
    settle_s: float = 10.0

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "count": self.count,
            "warmup": self.warmup,
            "concurrency": self.concurrency,
            "batch_size": self.batch_size,
            "get_samples": self.samples,
            "image_size": list(self.image_size),
        }


# --- images ------------------------------------------------------------------------------------


def base_jpeg(width: int, height: int, seed: int = 7) -> bytes:
    """One small photo-like JPEG, the template of every soak image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    image += rng.normal(0, 8, image.shape)
    ok, encoded = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8))
    if not ok:
        raise RuntimeError("OpenCV could not encode the soak template")
    return bytes(encoded.tobytes())


def unique_jpeg(template: bytes, number: int) -> bytes:
    """`template` with a comment segment (FF FE) right after SOI naming `number`: the same
    picture, other bytes, so every upload is a new image."""
    if template[:2] != b"\xff\xd8":
        raise ValueError("the template is not a JPEG")
    comment = f"pixelmill soak image {number}".encode()
    return template[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + template[2:]


def write_images(directory: Path, first: int, count: int, template: bytes) -> list[Path]:
    """`count` unique images numbered from `first`, in folders of IMAGES_PER_FOLDER."""
    paths = []
    for number in range(first, first + count):
        folder = directory / f"{number // IMAGES_PER_FOLDER:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"soak-{number:07d}.jpg"
        path.write_bytes(unique_jpeg(template, number))
        paths.append(path)
    return paths


# --- per-tenth throughput ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tenth:
    index: int
    images: int
    started: float  # epoch seconds: the previous tenth's last completion (or the run's start)
    ended: float
    after_uploads: bool

    @property
    def per_second(self) -> float:
        return self.images / max(self.ended - self.started, 1e-9)


def tenths(done_at: Sequence[float], run_started: float, uploads_ended: float) -> list[Tenth]:
    """Ten slices of the images by completion order (sorted epoch times), each with its rate."""
    times = sorted(done_at)
    result: list[Tenth] = []
    previous = run_started
    for index in range(10):
        lo, hi = len(times) * index // 10, len(times) * (index + 1) // 10
        if hi <= lo:
            continue
        ended = times[hi - 1]
        result.append(Tenth(index + 1, hi - lo, previous, ended, previous >= uploads_ended))
        previous = ended
    return result


def rate_verdict(slices: Sequence[Tenth]) -> dict[str, Any]:
    after = [t for t in slices if t.after_uploads]
    if len(after) < 2:
        return {"ratio": None, "meets_target": None, "why": "fewer than two tenths after uploads"}
    ratio = after[-1].per_second / after[0].per_second
    return {"ratio": round(ratio, 3), "meets_target": ratio >= RATE_TARGET}


# --- idle readings -----------------------------------------------------------------------------


def p99_ms(request: Callable[[], int], samples: int) -> float:
    """The p99 of `samples` sequential requests' latency; a non-200 answer is an error."""
    latencies = []
    for _ in range(samples):
        started = time.perf_counter()
        status = request()
        latencies.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise RuntimeError(f"a measured GET answered {status}")
    return round(percentile(latencies, 99), 2)


def deepest_cursor(settings: Settings, owner: str, page: int = 100) -> str | None:
    """The cursor whose page is the owner's oldest `page` images (the last page of the list)."""
    with psycopg.connect(settings.postgres_url) as conn:
        row = conn.execute(
            """SELECT created_at, id FROM images WHERE owner = %s
                ORDER BY created_at, id OFFSET %s LIMIT 1""",
            (owner, page),
        ).fetchone()
    return None if row is None else encode_cursor(row[0], row[1])


def get_p99s(config: SoakConfig, batch_id: str, image_id: str, owner: str) -> dict[str, float]:
    connection = ApiConnection(config.url, config.token, 30.0)
    cursor = deepest_cursor(config.settings, owner)
    listing = "/api/v1/images?limit=100" + (f"&cursor={cursor}" if cursor else "")
    try:
        return {
            "get_batch": p99_ms(
                lambda: connection.request("GET", f"/api/v1/batches/{batch_id}").status,
                config.samples,
            ),
            "get_image": p99_ms(
                lambda: connection.request("GET", f"/api/v1/images/{image_id}").status,
                config.samples,
            ),
            "list_deepest_page": p99_ms(
                lambda: connection.request("GET", listing).status, config.samples
            ),
        }
    finally:
        connection.close()


def table_sizes(settings: Settings) -> dict[str, dict[str, int]]:
    with psycopg.connect(settings.postgres_url) as conn:
        return {
            table: {
                "table_bytes": int(row[0]),
                "index_bytes": int(row[1]),
            }
            for table in TABLES
            if (
                row := conn.execute(
                    "SELECT pg_table_size(%s::regclass), pg_indexes_size(%s::regclass)",
                    (table, table),
                ).fetchone()
            )
            is not None
        }


def redis_memory_bytes(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def idle_readings(config: SoakConfig, batch_id: str, image_id: str, owner: str) -> dict[str, Any]:
    return {
        "p99_ms": get_p99s(config, batch_id, image_id, owner),
        "tables": table_sizes(config.settings),
        "redis_used_memory_bytes": redis_memory_bytes(config.settings),
    }


# --- processes ---------------------------------------------------------------------------------


def pixelmill_processes(state_dir: Path) -> dict[int, str]:
    """pid -> role of the local stack's API (gunicorn master and workers) and worker node (the
    node, its fork server and CPU processes), from `<state>/run/*.pid`."""
    found: dict[int, str] = {}
    for role in ("api", "worker"):
        try:
            root = int((state_dir / "run" / f"{role}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        for pid in descendants(root):
            found[pid] = f"{role}:{command_name(pid)}"
    return found


@dataclass
class MemoryTimeline:
    """RSS of the pixelmill processes sampled over the run, and the services' peaks."""

    pids: dict[int, str]
    samples: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    service_peaks: dict[str, float] = field(default_factory=dict)

    def sample(self, now: float) -> None:
        for pid in self.pids:
            rss = rss_mib(pid)
            if rss:
                self.samples.setdefault(pid, []).append((now, rss))
        for service, comm in SERVICES.items():
            total = sum(rss_mib(pid) for pid in pids_named(comm.__eq__))
            self.service_peaks[service] = max(self.service_peaks.get(service, 0.0), total)

    def verdict(self, first_tenth_ended: float | None) -> dict[str, Any]:
        """Per process: peak, RSS when the first tenth had completed and at the end; whether it
        grew by more than the slack."""
        rows: dict[str, dict[str, Any]] = {}
        for pid, series in self.samples.items():
            later = [rss for t, rss in series if first_tenth_ended and t >= first_tenth_ended]
            at_first = later[0] if later else None
            end = series[-1][1]
            grew = (
                at_first is not None
                and end > at_first * (1 + MEMORY_SLACK_SHARE) + MEMORY_SLACK_MIB
            )
            rows[str(pid)] = {
                "role": self.pids[pid],
                "peak_rss_mib": round(max([rss for _, rss in series] + [peak_rss_mib(pid)]), 1),
                "rss_at_first_tenth_mib": None if at_first is None else round(at_first, 1),
                "rss_at_end_mib": round(end, 1),
                "grew": grew,
            }
        return {
            "processes": rows,
            "meets_target": not any(row["grew"] for row in rows.values()) if rows else None,
            "services_peak_rss_mib": {k: round(v, 1) for k, v in self.service_peaks.items()},
        }


# --- during the run ----------------------------------------------------------------------------


class RunSampler:
    """Every `interval_s`: the batch's completed count, one `GET` batch and one `GET` image
    latency, and the processes' memory; the timeline of the throughput and p99 plot."""

    def __init__(self, config: SoakConfig, batch_id: str, image_id: str, memory: MemoryTimeline):
        self._config = config
        self._batch_path = f"/api/v1/batches/{batch_id}"
        self._image_path = f"/api/v1/images/{image_id}"
        self._memory = memory
        self.points: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def __enter__(self) -> RunSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        connection = ApiConnection(self._config.url, self._config.token, 30.0)
        try:
            while not self._stop.wait(self._config.sample_interval_s):
                self._sample(connection)
        finally:
            connection.close()

    def _sample(self, connection: ApiConnection) -> None:
        try:
            started = time.perf_counter()
            batch = connection.request("GET", self._batch_path)
            batch_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            connection.request("GET", self._image_path)
            image_ms = (time.perf_counter() - started) * 1000
        except Exception:  # a sample lost to a hiccup is not a reason to end the run
            return
        now = time.time()
        document = batch.json() or {}
        counts = document.get("counts", {})
        self.points.append(
            {
                "t": now,
                "done": counts.get("completed", 0) + counts.get("failed", 0),
                "get_batch_ms": round(batch_ms, 2),
                "get_image_ms": round(image_ms, 2),
            }
        )
        self._memory.sample(now)


def p99_by_tenth(
    points: Sequence[dict[str, float]], slices: Sequence[Tenth]
) -> list[dict[str, Any]]:
    rows = []
    for t in slices:
        inside = [p for p in points if t.started <= p["t"] <= t.ended]
        rows.append(
            {
                "tenth": t.index,
                "get_batch_p99_ms": round(percentile([p["get_batch_ms"] for p in inside], 99), 2)
                if inside
                else None,
                "get_image_p99_ms": round(percentile([p["get_image_ms"] for p in inside], 99), 2)
                if inside
                else None,
            }
        )
    return rows


# --- the run -----------------------------------------------------------------------------------


def client_options(config: SoakConfig, name: str, count: int) -> UploadOptions:
    """The client as `pixelmill-upload` runs it: a batch of its own, no journal, a fresh key
    salt (a repeated soak makes new images rather than replaying answers)."""
    return UploadOptions(
        url=config.url,
        token=config.token,
        concurrency=config.concurrency,
        batch_size=config.batch_size,
        wait=True,
        wait_timeout_s=600.0 + count / 5,
        poll_interval_s=1.0,
        progress_stream=sys.stderr,
        key_salt=uuid.uuid4().hex,
        use_batch=True,
        batch_name=name,
    )


def upload_into_new_batch(
    config: SoakConfig, paths: list[Path], name: str, sampler: Callable[[str], Any] | None = None
) -> tuple[str, UploadReport, Any]:
    """Upload `paths` through the client into a new batch, with `sampler(batch_id)` (a context
    manager) running meanwhile; (batch id, the client's report, the sampler)."""
    options = client_options(config, name, len(paths))
    batch_id = open_batch_for_run(options)
    watching = sampler(batch_id) if sampler is not None else contextlib.nullcontext()
    with watching:
        report = upload_files(paths, replace(options, batch_id=batch_id))
    return batch_id, report, watching


def completion_times(settings: Settings, batch_id: str) -> list[float]:
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute(
            """SELECT extract(epoch FROM updated_at)::float8 FROM images
                WHERE batch_id = %s AND status IN ('completed', 'failed')""",
            (batch_id,),
        ).fetchall()
    return [float(r[0]) for r in rows]


def run_soak(config: SoakConfig) -> dict[str, Any]:
    """The whole soak: warm-up, idle readings, the run, idle readings, verdicts."""
    template = base_jpeg(*config.image_size)
    images_dir = config.work_dir / f"soak-{uuid.uuid4().hex[:8]}"
    try:
        warm_paths = write_images(images_dir / "warmup", 0, config.warmup, template)
        started = time.time()
        warm_batch, warm_report, _ = upload_into_new_batch(config, warm_paths, "soak warm-up")
        # From the first upload to the last completion, not to when the client noticed it.
        warm_done = completion_times(config.settings, warm_batch)
        warm_rate = len(warm_done) / max(max(warm_done, default=started) - started, 1e-9)
        expected = config.count / warm_rate
        print(
            f"soak: warm-up {config.warmup} images at {warm_rate:.1f} images/s; the run of "
            f"{config.count} should take about {expected / 60:.0f} min",
            file=sys.stderr,
        )
        probe_image = next(f.image_id for f in warm_report.files if f.image_id)
        owner = _owner(config, warm_batch)
        before = idle_readings(config, warm_batch, str(probe_image), owner)

        paths = write_images(images_dir / "run", config.warmup, config.count, template)
        memory = MemoryTimeline(pixelmill_processes(config.state_dir))
        run_started = time.time()
        memory.sample(run_started)
        batch_id, report, sampler = upload_into_new_batch(
            config,
            paths,
            "soak",
            lambda batch: RunSampler(config, batch, str(probe_image), memory),
        )
        memory.sample(time.time())
        # Let autovacuum and the last cache writes settle, as "idle after" means.
        time.sleep(config.settle_s)
        memory.sample(time.time())
        after = idle_readings(config, batch_id, str(probe_image), owner)
    finally:
        shutil.rmtree(images_dir, ignore_errors=True)

    slices = tenths(
        completion_times(config.settings, batch_id), run_started, report.uploads_ended_at
    )
    p99_ratios = {
        name: round(after["p99_ms"][name] / before["p99_ms"][name], 3) for name in before["p99_ms"]
    }
    counts = report.counts()
    return {
        "kind": "soak",
        "batch_id": batch_id,
        "warmup_images_per_s": round(warm_rate, 2),
        "expected_seconds": round(expected, 1),
        "run_seconds": round(report.finished_at - run_started, 1),
        "uploads_ended_after_s": round(report.uploads_ended_at - run_started, 1),
        "completed": counts["completed"],
        "failed": counts["failed"],
        "rejected": counts["rejected"],
        "unfinished": counts["unfinished"] + counts["accepted"],
        "tenths": [{**asdict(t), "per_second": round(t.per_second, 2)} for t in slices],
        "rate": rate_verdict(slices),
        "idle_before": before,
        "idle_after": after,
        "p99_after_vs_before": p99_ratios,
        "p99_meets_target": all(r <= P99_TARGET for r in p99_ratios.values()),
        "p99_by_tenth": p99_by_tenth(sampler.points, slices),
        "memory": memory.verdict(slices[0].ended if slices else None),
        "timeline": sampler.points,
    }


def _owner(config: SoakConfig, batch_id: str) -> str:
    connection = ApiConnection(config.url, config.token, 30.0)
    try:
        return str(connection.request("GET", f"/api/v1/batches/{batch_id}").json()["owner"])
    finally:
        connection.close()
