"""Parameter sweeps: the engine or end-to-end benchmark over a grid of settings, best one named.

Engine sweeps vary the node's processes, prefetch and batch size on one set of isolated services.
End-to-end sweeps can only vary what the client controls (batch size and concurrency); the
running stack's worker settings are whatever it was started with.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.e2e import E2EConfig, e2e_images, e2e_statistics, run_upload
from bench.engine_bench import EngineRunSpec, NodeSettings, run_engine_benchmark
from common.config import Settings


def engine_grid(
    image_class: str,
    count: int,
    processes: Sequence[int],
    prefetch: Sequence[int],
    batch_sizes: Sequence[int],
    memory_mb: int,
) -> list[EngineRunSpec]:
    """One spec per combination, in a stable order."""
    return [
        EngineRunSpec(image_class, count, NodeSettings(p, f, b, memory_mb=memory_mb))
        for p, f, b in itertools.product(processes, prefetch, batch_sizes)
    ]


def best_row(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The row with the highest `metric` among rows without failures (None if every one failed)."""
    clean = [r for r in rows if not r.get("failed") and not r.get("failures")]
    return max(clean, key=lambda r: r[metric], default=None)


def sweep_engine(
    base: Settings, corpus_dir: Path, specs: Sequence[EngineRunSpec], log_dir: Path
) -> dict[str, Any]:
    result = run_engine_benchmark(base, corpus_dir, specs, log_dir)
    rows = result["runs"]
    return {"kind": "sweep", "mode": "engine", "rows": rows, "best": best_row(rows, "images_per_s")}


def sweep_e2e(
    config: E2EConfig, cache_dir: Path, batch_sizes: Sequence[int], concurrency: Sequence[int]
) -> dict[str, Any]:
    paths = e2e_images(cache_dir, config.image_class, config.count, seed=1)
    rows = []
    for batch_size, clients in itertools.product(batch_sizes, concurrency):
        run = E2EConfig(**{**config.__dict__, "batch_size": batch_size, "concurrency": clients})
        stats = e2e_statistics(run_upload(run, paths, single=False))
        rows.append({"batch_size": batch_size, "concurrency": clients, **stats})
    best = best_row(rows, "completed_images_per_s")
    return {"kind": "sweep", "mode": "e2e", "rows": rows, "best": best}
