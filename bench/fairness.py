"""Fairness benchmark: interactive uploads and a second bulk owner while one owner's backlog
drains, with lanes on and with lanes off (RABBITMQ_LANES), runs interleaved.

One worker node on isolated services (bench.engine_bench), a fresh node and queues per run. Rows
are preloaded `pending`, pointing at a few stored originals; an image is "uploaded" when the
broker confirmed its job (where the API answers 201) and "completed" at its row's commit
(`updated_at`), both read on the database clock. Each run:

1. idle: single 1080p JPEG uploads, one after another, each on an otherwise idle node;
2. idle: owner B's bulk request alone, from its publish to its last commit;
3. draining: owner A's backlog is published, owner B's bulk request right behind it, then one
   interactive upload every `sample_interval_s` until the backlog is done; the run ends when
   every image is terminal. Throughput is every image of this phase over its duration.

A and B are chosen in different bulk shards (common.jobs.bulk_shard).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg

from bench.engine_bench import (
    IsolatedServices,
    NodeSettings,
    corpus_files,
    isolated_services,
)
from bench.stats import median, percentile, ratio
from common.broker import JobPublisher, ensure_topology, queue_counts
from common.config import Settings
from common.cpu_limit import usable_cores
from common.imageinfo import probe
from common.jobs import BULK, INTERACTIVE, JobMessage, bulk_shard
from common.storage import ObjectStore
from common.waiting import wait_for
from db import image_stats, images
from db.images import NewImage
from ops.worker_process import start_worker, stop_worker

# The targets: interactive p95 while draining within 2x its idle p95; owner B done
# within 3x its idle time; throughput with lanes at least 0.95x of without.
LATENCY_TARGET = 2.0
SECOND_OWNER_TARGET = 3.0
THROUGHPUT_TARGET = 0.95
# For the duration estimate only: small images per second on a 2-core machine (README).
ASSUMED_IMAGES_PER_S = 100.0
PUBLISH_CHUNK = 2000
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class FairnessConfig:
    """One benchmark: the full run's parameters by default."""

    backlog: int = 20_000
    second_owner: int = 200
    idle_samples: int = 20
    samples: int = 60
    sample_interval_s: float = 2.0
    repeats: int = 3
    backlog_class: str = "jpeg-small"
    interactive_class: str = "jpeg-2mp"
    node: NodeSettings = field(default_factory=lambda: NodeSettings(processes=usable_cores()))
    timeout_s: float = 3600.0

    def expected_seconds(self, images_per_s: float = ASSUMED_IMAGES_PER_S) -> float:
        """A rough duration at `images_per_s`: per run, owner B alone, the drain of A and B, the
        idle uploads, and a node's start; lanes on and off `repeats` times each."""
        per_run = (self.backlog + 2 * self.second_owner) / images_per_s + self.idle_samples * 0.5
        return 2 * self.repeats * (per_run + 15.0)


@dataclass(frozen=True)
class Owners:
    """Owner A (the backlog) and owner B (the second bulk request), in different shards."""

    first: str
    second: str

    @classmethod
    def in_different_shards(cls, shards: int) -> Owners:
        first = "bench-owner-a"
        candidates = (f"bench-owner-b{n}" for n in range(10_000))
        second = next(
            o
            for o in candidates
            if shards < 2 or bulk_shard(o, shards) != bulk_shard(first, shards)
        )
        return cls(first, second)


class Originals:
    """A few stored originals per image class, which every row of a run points at."""

    def __init__(self, store: ObjectStore, corpus_dir: Path, classes: Sequence[str]) -> None:
        self.by_class: dict[str, list[NewImage]] = {}
        for name in classes:
            stored = []
            for path in corpus_files(corpus_dir, name):
                payload = path.read_bytes()
                template = _template(payload, f"originals/bench-{uuid.uuid4()}", path.name)
                store.put_original(template.original_key, payload, template.content_type)
                stored.append(template)
            self.by_class[name] = stored

    def rows(
        self, image_class: str, owner: str, lane: str, shard: int, count: int
    ) -> list[NewImage]:
        templates = self.by_class[image_class]
        return [
            replace(
                templates[i % len(templates)], id=uuid.uuid4(), owner=owner, lane=lane, shard=shard
            )
            for i in range(count)
        ]


def _template(payload: bytes, key: str, name: str) -> NewImage:
    header = probe(payload)
    if header is None:
        raise ValueError(f"corpus file {name} is not a JPEG or PNG")
    return NewImage(
        id=uuid.uuid4(),
        owner="",
        filename=name,
        content_type=f"image/{header.format}",
        size_bytes=len(payload),
        sha256="bench",
        source_width=header.width,
        source_height=header.height,
        original_key=key,
    )


class FairnessRun:
    """One run's node and queues, and the helpers that publish and time its images."""

    def __init__(self, settings: Settings, originals: Originals, config: FairnessConfig) -> None:
        self.settings = settings
        self.originals = originals
        self.config = config
        self.owners = Owners.in_different_shards(settings.queue.bulk_shards)
        self.publisher = JobPublisher(settings.queue)

    def insert(self, image_class: str, owner: str, lane: str, count: int) -> list[NewImage]:
        shard = bulk_shard(owner, self.settings.queue.bulk_shards) if lane == BULK else 0
        rows = self.originals.rows(image_class, owner, lane, shard, count)
        with psycopg.connect(self.settings.postgres_url) as conn:
            images.insert_images(conn, rows)
            images.mark_enqueued(conn, [r.id for r in rows])
        return rows

    def publish(self, rows: Sequence[NewImage]) -> float:
        """Publish the jobs of `rows`; returns the database clock just before."""
        started = self.clock()
        for at in range(0, len(rows), PUBLISH_CHUNK):
            chunk = rows[at : at + PUBLISH_CHUNK]
            self.publisher.publish([JobMessage(r.id, "bench", r.lane, r.shard) for r in chunk])
        return started

    def clock(self) -> float:
        with psycopg.connect(self.settings.postgres_url) as conn:
            return image_stats.database_clock(conn)

    def finished(self, rows: Sequence[NewImage]) -> dict[uuid.UUID, float]:
        with psycopg.connect(self.settings.postgres_url) as conn:
            return images.finished_at(conn, [r.id for r in rows])

    def wait_done(self, rows: Sequence[NewImage]) -> dict[uuid.UUID, float]:
        # Rarely for many rows: a tight loop of large queries would take CPU from the node.
        wait_for(
            lambda: len(self.finished(rows)) == len(rows),
            self.config.timeout_s,
            POLL_SECONDS if len(rows) < 1000 else 2.0,
            what=f"{len(rows)} images to finish",
        )
        return self.finished(rows)

    def close(self) -> None:
        self.publisher.close()


def idle_latencies(run: FairnessRun) -> list[float]:
    """Single interactive uploads, one at a time: seconds from publish to commit; after one
    upload per CPU process, not counted, so that no sample pays a process's first render."""
    for _ in range(run.config.node.processes):
        _one_interactive_upload(run)
    return [_one_interactive_upload(run) for _ in range(run.config.idle_samples)]


def _one_interactive_upload(run: FairnessRun) -> float:
    [row] = run.insert(run.config.interactive_class, "bench-interactive", INTERACTIVE, 1)
    published = run.publish([row])
    return run.wait_done([row])[row.id] - published


def bulk_alone(run: FairnessRun) -> float:
    """Owner B's bulk request on an idle node: seconds from publish to its last commit."""
    rows = run.insert(run.config.backlog_class, run.owners.second, BULK, run.config.second_owner)
    published = run.publish(rows)
    return max(run.wait_done(rows).values()) - published


def draining(run: FairnessRun) -> dict[str, Any]:
    """Phase 3 (see the module): what the interactive uploads, owner B and the node did."""
    config = run.config
    backlog = run.insert(config.backlog_class, run.owners.first, BULK, config.backlog)
    second = run.insert(config.backlog_class, run.owners.second, BULK, config.second_owner)
    started = run.publish(backlog)
    second_published = run.publish(second)
    samples: list[tuple[float, NewImage]] = []
    # At least one sample, however fast the backlog drains.
    while len(samples) < config.samples and (
        not samples or len(run.finished(backlog)) < len(backlog)
    ):
        [row] = run.insert(config.interactive_class, "bench-interactive", INTERACTIVE, 1)
        samples.append((run.publish([row]), row))
        time.sleep(config.sample_interval_s)
    everything = [*backlog, *second, *(row for _, row in samples)]
    done = run.wait_done(everything)
    ended = max(done.values())
    return {
        "samples": [
            {"at_s": published - started, "latency_s": done[row.id] - published}
            for published, row in samples
        ],
        "second_owner_s": max(done[r.id] for r in second) - second_published,
        "wall_s": ended - started,
        "images": len(everything),
        "images_per_s": len(everything) / (ended - started),
    }


def run_once(
    services: IsolatedServices,
    originals: Originals,
    config: FairnessConfig,
    lanes: bool,
    index: int,
    log_dir: Path,
) -> dict[str, Any]:
    env = {**services.env(index), "RABBITMQ_LANES": "true" if lanes else "false"}
    settings = Settings.from_env(env)
    services.queues.append(settings.queue)
    ensure_topology(settings.queue)
    node = start_worker(
        env, log_dir / f"fairness-{index}.log", *config.node.flags(), fresh_log=True
    )
    run = FairnessRun(settings, originals, config)
    try:
        wait_for(
            lambda: queue_counts(settings.queue).consumers > 0 or node.poll() is not None, 60, 0.2
        )
        if node.poll() is not None:
            raise RuntimeError(f"the node exited; see {log_dir}")
        idle = idle_latencies(run)
        second_alone = bulk_alone(run)
        drain = draining(run)
    finally:
        run.close()
        stop_worker(node)
    latencies = [s["latency_s"] for s in drain["samples"]]
    return {
        "lanes": lanes,
        "idle_latency_ms": _p50_p95(idle),
        "idle_samples_ms": [seconds * 1000 for seconds in idle],
        "draining_latency_ms": _p50_p95(latencies),
        "second_owner_alone_s": second_alone,
        **drain,
    }


def _p50_p95(seconds: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(seconds, 50) * 1000, "p95": percentile(seconds, 95) * 1000}


def run_fairness_benchmark(
    base: Settings, corpus_dir: Path, config: FairnessConfig, log_dir: Path
) -> dict[str, Any]:
    """`repeats` runs with lanes on and as many off, interleaved (on, off, on, off, ...)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    minutes = config.expected_seconds() / 60
    print(
        f"fairness: {2 * config.repeats} runs of a {config.backlog}-image backlog; expected about "
        f"{minutes:.0f} min at {ASSUMED_IMAGES_PER_S:.0f} images/s",
        file=sys.stderr,
    )
    runs: list[dict[str, Any]] = []
    with isolated_services(base) as services:
        store = ObjectStore(Settings.from_env(services.env(0)).storage)
        originals = Originals(store, corpus_dir, [config.backlog_class, config.interactive_class])
        for _ in range(config.repeats):
            for lanes in (True, False):
                index = len(runs)
                print(
                    f"fairness: run {index + 1}, lanes {'on' if lanes else 'off'}", file=sys.stderr
                )
                runs.append(run_once(services, originals, config, lanes, index, log_dir))
    return {
        "kind": "fairness",
        "config": _config_dict(config),
        "runs": runs,
        "summary": summarize(runs),
    }


def _config_dict(config: FairnessConfig) -> dict[str, Any]:
    return {**asdict(config), "node": asdict(config.node)}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: medians over its runs (throughput with its spread); and the targets."""
    modes = {}
    for lanes, name in ((True, "lanes_on"), (False, "lanes_off")):
        mine = [r for r in runs if r["lanes"] is lanes]
        if not mine:
            continue
        throughput = [r["images_per_s"] for r in mine]
        idle_p95 = median(r["idle_latency_ms"]["p95"] for r in mine)
        draining_p95 = median(r["draining_latency_ms"]["p95"] for r in mine)
        alone = median(r["second_owner_alone_s"] for r in mine)
        behind = median(r["second_owner_s"] for r in mine)
        modes[name] = {
            "idle_p50_ms": median(r["idle_latency_ms"]["p50"] for r in mine),
            "idle_p95_ms": idle_p95,
            "draining_p50_ms": median(r["draining_latency_ms"]["p50"] for r in mine),
            "draining_p95_ms": draining_p95,
            "latency_ratio": ratio(draining_p95, idle_p95),
            "second_owner_alone_s": alone,
            "second_owner_behind_s": behind,
            "second_owner_ratio": ratio(behind, alone),
            "images_per_s_median": median(throughput),
            "images_per_s_min": min(throughput),
            "images_per_s_max": max(throughput),
        }
    on, off = modes.get("lanes_on"), modes.get("lanes_off")
    throughput_ratio = (
        ratio(on["images_per_s_median"], off["images_per_s_median"]) if on and off else None
    )
    targets = {
        "latency_ratio": LATENCY_TARGET,
        "second_owner_ratio": SECOND_OWNER_TARGET,
        "throughput_ratio": THROUGHPUT_TARGET,
    }
    met = {
        "latency": on is not None and _at_most(on["latency_ratio"], LATENCY_TARGET),
        "second_owner": on is not None and _at_most(on["second_owner_ratio"], SECOND_OWNER_TARGET),
        "throughput": throughput_ratio is not None and throughput_ratio >= THROUGHPUT_TARGET,
    }
    return {**modes, "throughput_ratio": throughput_ratio, "targets": targets, "meets_target": met}


def _at_most(value: float | None, target: float) -> bool:
    return value is not None and value <= target
