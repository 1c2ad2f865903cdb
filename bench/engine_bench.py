"""Engine benchmark: one worker node (`python -m engine`) alone, on services of its own.

Each run gets its own SeaweedFS (on free ports), PostgreSQL schema, RabbitMQ queue and Redis
prefix, like the tests. Originals and `pending` rows are preloaded; the node is started and
waits on an empty queue; then all jobs are published at once, and the run lasts from publishing
to the commit of the last row (its `updated_at`, read on the database's clock). CPU comes from
/proc (bench.procstat): the node and all its descendants, and the SeaweedFS, RabbitMQ
(beam.smp), PostgreSQL and Redis processes.

The node/kernel ratio is given twice. `cpu_ratio_in_node` divides the node's CPU by the CPU its
own CPU processes spent inside the kernel during the same run (the `kernel_cpu` the node logs
per batch): the share of the node's CPU that goes into the kernel, unaffected by the machine's
speed drifting between measurements. `cpu_ratio` divides it by the kernel's CPU measured alone,
in this process, on the same files with one OpenCV thread, after the runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.corpus import read_manifest
from bench.procstat import (
    MemorySampler,
    cpu_seconds_by_pid,
    descendants,
    pids_named,
    tree_cpu_seconds,
)
from bench.stats import median, ratio
from common.batch_timing import BatchTiming
from common.broker import (
    BROKER_ERRORS,
    JobPublisher,
    delete_topology,
    ensure_topology,
    queue_counts,
)
from common.config import QueueSettings, Settings
from common.imageinfo import probe
from common.jobs import JobMessage
from common.renditions import parse_renditions
from common.storage import ObjectStore, original_key
from common.waiting import wait_for
from db import image_stats, images
from db.images import NewImage
from db.migrate import apply_migrations
from db.pool import Database
from db.schemas import create_schema, drop_schema, with_search_path
from ops.s3server import LocalS3Server, pick_free_s3_port
from ops.worker_process import start_worker, stop_worker

# The product's wishes: node CPU within 15 % of the kernel's, and small images batched 16 at a
# time at least 3x as fast as one at a time.
CPU_RATIO_TARGET = 1.15
SMALL_BATCH_SPEEDUP_TARGET = 3.0
DONE_POLL_SECONDS = 0.25
S3_ACCESS_KEY = "pixelmill-bench"
S3_SECRET_KEY = "pixelmill-bench-secret"
BENCH_OWNER = "bench"
SERVICE_PROCESSES = {
    "rabbitmq": lambda name: name == "beam.smp",
    "postgresql": lambda name: name.startswith("postgres"),
    "redis": lambda name: name.startswith("redis-server"),
}


@dataclass(frozen=True)
class NodeSettings:
    """The flags of one node run."""

    processes: int = 2
    prefetch: int = 64
    batch_size: int = 16
    batch_wait_ms: int = 50
    memory_mb: int = 512
    # RENDITIONS for the node (empty: the default single gray rendition); an environment
    # variable, not a flag.
    renditions: str = ""

    def flags(self) -> list[str]:
        return [
            f"--processes={self.processes}",
            f"--prefetch={self.prefetch}",
            f"--batch-size={self.batch_size}",
            f"--batch-wait-ms={self.batch_wait_ms}",
            f"--memory-mb={self.memory_mb}",
        ]


def parse_stage_lines(lines: Iterable[str]) -> list[BatchTiming]:
    """Every batch record (common.batch_timing) in a node log; other lines and records torn by
    a crash are skipped."""
    return [timing for line in lines if (timing := BatchTiming.find_in(line)) is not None]


def stage_medians_ms(batches: Sequence[BatchTiming]) -> dict[str, float]:
    """Per stage: the median over batches of (stage seconds / batch size), in milliseconds."""
    per_image: dict[str, list[float]] = {}
    for batch in batches:
        if batch.size < 1:
            continue
        for stage, seconds in batch.stages.items():
            per_image.setdefault(stage, []).append(seconds / batch.size * 1000)
    return {stage: median(values) for stage, values in per_image.items()}


# ---------------------------------------------------------------------------------------------
# Isolated services


class IsolatedServices:
    """SeaweedFS on free ports plus a schema, Redis prefix and queue names of our own."""

    def __init__(self, base: Settings, work_dir: Path) -> None:
        self.base = base
        self.run_id = uuid.uuid4().hex[:10]
        self.schema = f"pm_bench_{self.run_id}"
        self.s3 = LocalS3Server(
            work_dir / "s3",
            port=pick_free_s3_port(),
            access_key=S3_ACCESS_KEY,
            secret_key=S3_SECRET_KEY,
        )
        self.queues: list[QueueSettings] = []

    def env(self, run_index: int) -> dict[str, str]:
        """The environment of a node for run `run_index` (each run has its own queue)."""
        queue = f"pm-bench-{self.run_id}-{run_index}"
        return {
            "PIXELMILL_ENV": "local",
            "POSTGRES_URL": with_search_path(self.base.postgres_url, self.schema),
            "REDIS_URL": self.base.redis_url,
            "REDIS_PREFIX": f"pmbench:{self.run_id}:",
            "RABBITMQ_URL": self.base.queue.url,
            "RABBITMQ_QUEUE": queue,
            "MINIO_ENDPOINT": self.s3.endpoint,
            "MINIO_ACCESS_KEY": S3_ACCESS_KEY,
            "MINIO_SECRET_KEY": S3_SECRET_KEY,
            "MINIO_RAW_BUCKET": f"raw-{self.run_id}",
            "MINIO_PROCESSED_BUCKET": f"processed-{self.run_id}",
            "LOG_FORMAT": "text",
        }

    def start(self) -> None:
        self.s3.start()
        create_schema(self.base.postgres_url, self.schema)
        settings = Settings.from_env(self.env(0))
        apply_migrations(settings.postgres_url)
        ObjectStore(settings.storage).ensure_buckets()

    def stop(self) -> None:
        with contextlib.suppress(psycopg.Error):
            drop_schema(self.base.postgres_url, self.schema)
        for queue in self.queues:
            with contextlib.suppress(*BROKER_ERRORS):
                delete_topology(queue)
        self.s3.stop()


@contextlib.contextmanager
def isolated_services(base: Settings) -> Iterator[IsolatedServices]:
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-") as work_dir:
        services = IsolatedServices(base, Path(work_dir))
        try:
            services.start()
            yield services
        finally:
            services.stop()


# ---------------------------------------------------------------------------------------------
# One run


def corpus_files(corpus_dir: Path, image_class: str) -> list[Path]:
    files = [corpus_dir / e.file for e in read_manifest(corpus_dir) if e.image_class == image_class]
    if not files:
        raise ValueError(f"the corpus in {corpus_dir} has no {image_class} images")
    return files


def preload(settings: Settings, payloads: Sequence[bytes], count: int) -> list[uuid.UUID]:
    """`count` originals in S3 (cycling through payloads) and `pending` rows marked enqueued."""
    store = ObjectStore(settings.storage)
    rows = [_new_image(payloads[i % len(payloads)], i) for i in range(count)]
    data = [payloads[i % len(payloads)] for i in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda r, d: store.put_original(r.original_key, d, r.content_type), rows, data)
        )
    database = Database(settings.postgres_url, max_size=1)
    try:
        with database.transaction() as conn:
            images.insert_images(conn, rows)
            images.mark_enqueued(conn, [r.id for r in rows])
    finally:
        database.close()
    return [r.id for r in rows]


def _new_image(payload: bytes, index: int) -> NewImage:
    header = probe(payload)
    if header is None:
        raise ValueError("corpus file is not a JPEG or PNG")
    image_id = uuid.uuid4()
    return NewImage(
        id=image_id,
        owner=BENCH_OWNER,
        filename=f"bench-{index:05d}.{header.format}",
        content_type=f"image/{header.format}",
        size_bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        source_width=header.width,
        source_height=header.height,
        original_key=original_key(image_id),
    )


def _terminal_count(conninfo: str, ids: list[uuid.UUID]) -> dict[str, int]:
    with psycopg.connect(conninfo) as conn:
        return image_stats.status_counts_of(conn, ids)


def _service_pids(services: IsolatedServices) -> dict[str, list[int]]:
    pids = {name: pids_named(test) for name, test in SERVICE_PROCESSES.items()}
    weed = services.s3.pid()
    pids["seaweedfs"] = descendants(weed) if weed else []
    return pids


def kernel_cpu_per_image(
    payloads: Sequence[bytes], settings: Settings, min_renders: int = 30
) -> float:
    """Mean CPU seconds of the node's kernel work per image (every configured rendition from
    one decode, engine.renditions.render_renditions), one OpenCV thread.

    Each file is rendered once untimed first (OpenCV and the codecs set up lazily on first use,
    which would otherwise inflate the figure for small images), then the files are cycled until at
    least `min_renders` renders are timed.
    """
    import cv2

    from engine.renditions import render_renditions

    cv2.setNumThreads(1)
    engine = settings.engine

    def render(payload: bytes) -> None:
        render_renditions(payload, engine.renditions, max_pixels=engine.max_pixels)

    for payload in payloads:
        render(payload)
    rounds = max(1, -(-min_renders // len(payloads)))
    started = time.process_time()
    for _ in range(rounds):
        for payload in payloads:
            render(payload)
    return (time.process_time() - started) / (rounds * len(payloads))


def result_bytes_per_image(payloads: Sequence[bytes], settings: Settings) -> float:
    """Mean size of the results the kernel makes of `payloads` (what a node PUTs per image)."""
    from engine.kernel import render_grayscale

    engine = settings.engine
    sizes = [
        len(
            render_grayscale(
                payload,
                target_width=engine.target_width,
                output_format=engine.output_format,
                max_pixels=engine.max_pixels,
            ).data
        )
        for payload in payloads
    ]
    return sum(sizes) / len(sizes)


def original_bytes_per_image(payloads: Sequence[bytes], count: int) -> float:
    """Mean size of the originals of a run of `count` images (`preload` cycles through
    `payloads`)."""
    return sum(len(payloads[i % len(payloads)]) for i in range(count)) / count


@dataclass(frozen=True)
class EngineRunSpec:
    image_class: str
    count: int
    node: NodeSettings
    timeout_s: float = 600.0


def run_engine_once(
    services: IsolatedServices,
    spec: EngineRunSpec,
    payloads: Sequence[bytes],
    run_index: int,
    log_dir: Path,
) -> dict[str, Any]:
    """Preload, start the node, publish everything, time it to the last terminal row."""
    env = services.env(run_index)
    if spec.node.renditions:
        env["RENDITIONS"] = spec.node.renditions
    settings = Settings.from_env(env)
    services.queues.append(settings.queue)
    ids = preload(settings, payloads, spec.count)
    ensure_topology(settings.queue)
    log_path = log_dir / f"node-{run_index}.log"
    # A fresh log per run: an earlier invocation's lines would mix into this run's stages.
    node = start_worker(env, log_path, *spec.node.flags(), fresh_log=True)
    try:
        wait_for(
            lambda: queue_counts(settings.queue).consumers > 0 or node.poll() is not None,
            60,
            0.2,
            what="the node to consume",
        )
        if node.poll() is not None:
            raise RuntimeError(f"the node exited: {log_path.read_text()[-2000:]}")
        return _measure(services, settings, spec, ids, node, log_path)
    finally:
        stop_worker(node)


def _measure(
    services: IsolatedServices,
    settings: Settings,
    spec: EngineRunSpec,
    ids: list[uuid.UUID],
    node: subprocess.Popen[bytes],
    log_path: Path,
) -> dict[str, Any]:
    service_pids = _service_pids(services)
    cpu_before = _cpu_snapshot(node.pid, service_pids)
    sampler = MemorySampler(node.pid).start()
    started = _database_clock(settings.postgres_url)
    publisher = JobPublisher(settings.queue)
    try:
        publisher.publish([JobMessage(image_id, "bench") for image_id in ids])
    finally:
        publisher.close()
    # The end is read from the rows themselves, so the check for it can be infrequent: a tight
    # loop of queries would take CPU from the node it measures.
    wait_for(
        lambda: _done(settings.postgres_url, ids) >= len(ids),
        spec.timeout_s,
        DONE_POLL_SECONDS,
        what=lambda: f"every image to be terminal ({_terminal_count(settings.postgres_url, ids)})",
    )
    wall = _last_update(settings.postgres_url, ids) - started
    cpu_after = _cpu_snapshot(node.pid, service_pids)
    sampler.stop()
    stop_worker(node)
    statuses = _terminal_count(settings.postgres_url, ids)
    batches = parse_stage_lines(log_path.read_text(errors="replace").splitlines())
    return _run_row(spec, wall, statuses, cpu_used(cpu_before, cpu_after), sampler, batches)


def _database_clock(conninfo: str) -> float:
    """PostgreSQL's clock, in seconds: the same clock as the rows' `updated_at`."""
    with psycopg.connect(conninfo) as conn:
        return image_stats.database_clock(conn)


def _last_update(conninfo: str, ids: list[uuid.UUID]) -> float:
    """When the last of `ids` was committed (its `updated_at`), in seconds on the database clock."""
    with psycopg.connect(conninfo) as conn:
        last = image_stats.last_update(conn, ids)
    assert last is not None
    return last


def _done(conninfo: str, ids: list[uuid.UUID]) -> int:
    counts = _terminal_count(conninfo, ids)
    return counts.get("completed", 0) + counts.get("failed", 0)


CpuSnapshot = dict[str, dict[int, float]]


def _cpu_snapshot(node_pid: int, service_pids: Mapping[str, list[int]]) -> CpuSnapshot:
    """CPU seconds so far: the node's whole tree, and each live process of each service."""
    snapshot = {"node": {node_pid: tree_cpu_seconds(node_pid)}}
    snapshot.update({name: cpu_seconds_by_pid(pids) for name, pids in service_pids.items()})
    return snapshot


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each group used between two snapshots, over the processes alive in both (a
    service process that exits mid-run takes its time with it, rather than going negative)."""
    used = {}
    for name, now in after.items():
        earlier = before[name]
        used[name] = sum(seconds - earlier[pid] for pid, seconds in now.items() if pid in earlier)
    return used


def _run_row(
    spec: EngineRunSpec,
    wall: float,
    statuses: dict[str, int],
    cpu_seconds: dict[str, float],
    sampler: MemorySampler,
    batches: list[BatchTiming],
) -> dict[str, Any]:
    completed = statuses.get("completed", 0)
    cpu = {name: seconds / spec.count for name, seconds in cpu_seconds.items()}
    node_kernel_cpu = sum(batch.stages.get("kernel_cpu", 0.0) for batch in batches)
    return {
        "image_class": spec.image_class,
        "count": spec.count,
        **asdict(spec.node),
        "wall_s": wall,
        "completed": completed,
        "failed": statuses.get("failed", 0),
        # Failed images are not throughput.
        "images_per_s": completed / wall,
        "node_cpu_s_per_image": cpu["node"],
        # The kernel's CPU inside the node's own CPU processes, during this very run.
        "node_kernel_cpu_s_per_image": node_kernel_cpu / spec.count,
        "cpu_ratio_in_node": ratio(cpu.pop("node"), node_kernel_cpu / spec.count),
        "services_cpu_s_per_image": cpu,
        "node_peak_pss_mib": sampler.peak_pss_sum_mib,
        "node_peak_rss_sum_mib": sampler.peak_rss_sum_mib,
        "node_peak_single_rss_mib": sampler.peak_single_rss_mib,
        "batches": len(batches),
        "stages_ms": stage_medians_ms(batches),
    }


# ---------------------------------------------------------------------------------------------
# Several runs on one set of services


def run_engine_benchmark(
    base: Settings, corpus_dir: Path, specs: Sequence[EngineRunSpec], log_dir: Path
) -> dict[str, Any]:
    """Every spec, one after another, each with a fresh node and queue; plus the kernel's CPU."""
    log_dir.mkdir(parents=True, exist_ok=True)
    payloads = {
        name: [p.read_bytes() for p in corpus_files(corpus_dir, name)]
        for name in {spec.image_class for spec in specs}
    }
    runs = []
    with isolated_services(base) as services:
        for index, spec in enumerate(specs):
            print(f"engine: {spec.image_class} x{spec.count} {spec.node}", file=sys.stderr)
            row = run_engine_once(services, spec, payloads[spec.image_class], index, log_dir)
            runs.append(row)
    kernel = {
        (spec.image_class, spec.node.renditions): kernel_cpu_per_image(
            payloads[spec.image_class], _with_renditions(base, spec.node.renditions)
        )
        for spec in specs
    }
    results = {name: result_bytes_per_image(data, base) for name, data in payloads.items()}
    for row, spec in zip(runs, specs, strict=True):
        alone = kernel[(spec.image_class, spec.node.renditions)]
        row["kernel_cpu_s_per_image"] = alone
        # What the run moved through S3 per image, for sizing (`python -m ops capacity`).
        row["original_bytes_per_image"] = original_bytes_per_image(
            payloads[row["image_class"]], row["count"]
        )
        row["result_bytes_per_image"] = results[row["image_class"]]
        row["cpu_ratio"] = ratio(row["node_cpu_s_per_image"], alone)
    return {"kind": "engine", "runs": runs, "batch_comparison": batch_comparison(runs)}


def _with_renditions(base: Settings, renditions: str) -> Settings:
    """`base` with the node's RENDITIONS, as a node started with it reads them."""
    if not renditions:
        return base
    engine = dataclasses.replace(base.engine, renditions=parse_renditions(renditions))
    return dataclasses.replace(base, engine=engine)


def batch_comparison(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each class run with batch size 1 and a larger size: the larger's images/s ratio."""
    comparisons = []
    for row in runs:
        if row["batch_size"] == 1:
            continue
        for one in runs:
            same = all(one[k] == row[k] for k in ("image_class", "processes", "prefetch"))
            if one["batch_size"] == 1 and same:
                speedup = ratio(row["images_per_s"], one["images_per_s"])
                comparisons.append(
                    {
                        "image_class": row["image_class"],
                        "batch_size": row["batch_size"],
                        "speedup_vs_batch_1": speedup,
                        "target": SMALL_BATCH_SPEEDUP_TARGET,
                        "meets_target": speedup is not None
                        and speedup >= SMALL_BATCH_SPEEDUP_TARGET,
                    }
                )
    return comparisons
