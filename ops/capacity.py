"""`python -m ops capacity`: a deployment sized on paper from what the benchmarks measured.

It owns the arithmetic from images a day to worker cores, API processes, S3 requests and
bandwidth, PostgreSQL, RabbitMQ and Redis load, and which shared service saturates first. The
costs per image come from the newest `python -m bench engine` (and `bench e2e`) results for the
image class, or from a reference profile of the development VM when there are none. Per-request
and per-batch counts follow the code paths (README, "Capacity model").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.archive import ROW_PASSES as ARCHIVE_ROW_PASSES
from ingest.archive import ROWS_PER_PAGE as ARCHIVE_ROWS_PER_PAGE
from ops.stack import project_root

SECONDS_PER_DAY = 86_400
RESULTS_FILE = "results.json"


class CapacityError(Exception):
    """The figures for a plan are missing or unreadable; the message says what to run."""


# --- what one image costs ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImageCosts:
    """Measured costs of one image of a class: CPU seconds per image of the worker node (with
    its CPU processes) and of each service while the node worked, the mean original and result
    sizes, the batch size measured, and what one API process accepts."""

    image_class: str
    node_cpu_s: float
    s3_cpu_s: float
    postgres_cpu_s: float
    rabbitmq_cpu_s: float
    original_bytes: float
    result_bytes: float
    batch_size: int
    api_images_per_s: float  # per API process, for this class
    source: str
    api_source: str


# The development VM (2-core AMD EPYC), medians of three `make bench` runs as quoted in the
# README's Performance section: engine runs with 2 CPU processes and batch 16; API from
# `python -m bench e2e --compare-single --count 200 --concurrency 4 --batch-size 16
# --class jpeg-small` (bulk route, 214 images/s on `make up`'s 2 API processes). Bytes: the
# corpus images of seed 20240601 (bench/corpus.py) and their 800 px grayscale PNGs.
_DEV_VM = "reference profile: the development VM (README, Performance; `make bench`)"
_SMALL_API_PER_PROCESS = 214 / 2
_SMALL_ORIGINAL_BYTES = 92_523
REFERENCE_COSTS: dict[str, ImageCosts] = {
    "jpeg-12mp": ImageCosts(
        image_class="jpeg-12mp",
        node_cpu_s=0.0684,
        s3_cpu_s=0.0119,
        postgres_cpu_s=0.0019,
        rabbitmq_cpu_s=0.0006,
        original_bytes=3_296_792,
        result_bytes=257_331,
        batch_size=16,
        api_images_per_s=_SMALL_API_PER_PROCESS * _SMALL_ORIGINAL_BYTES / 3_296_792,
        source=_DEV_VM,
        api_source="bench e2e on jpeg-small, scaled by bytes (an API process taken as byte-bound)",
    ),
    "jpeg-small": ImageCosts(
        image_class="jpeg-small",
        node_cpu_s=0.0087,
        s3_cpu_s=0.0057,
        postgres_cpu_s=0.0004,
        rabbitmq_cpu_s=0.0002,
        original_bytes=_SMALL_ORIGINAL_BYTES,
        result_bytes=192_883,
        batch_size=16,
        api_images_per_s=_SMALL_API_PER_PROCESS,
        source=_DEV_VM,
        api_source="bench e2e, bulk route",
    ),
}


# --- the deployment's givens ------------------------------------------------------------------


_MAY_BE_ZERO = ("result_downloads", "archive_downloads")


@dataclass(frozen=True)
class Sizes:
    """What is given: the peak over the daily average, how images arrive and are read back, and
    the size of each shared service (worker nodes and API processes scale out, so they are
    the answer rather than a limit)."""

    peak_factor: float = 3.0
    cores_per_node: int = 8
    upload_batch: int = 16  # images per bulk upload request
    result_downloads: float = 1.0  # reads of each result by clients (presigned GETs)
    # Reads of each result inside a batch archive (through the API, not presigned).
    archive_downloads: float = 0.0
    s3_cores: float = 8.0
    s3_network_gbps: float = 10.0
    postgres_cores: float = 4.0
    rabbitmq_cores: float = 4.0
    redis_ops_per_s: float = 100_000.0  # one Redis core, pipelined

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0 and field.name not in _MAY_BE_ZERO:
                raise ValueError(f"{field.name.replace('_', '-')} must be above zero")
        if self.result_downloads < 0 or self.archive_downloads < 0 or self.peak_factor < 1:
            raise ValueError(
                "result-downloads and archive-downloads must be 0 or more, peak-factor at least 1"
            )


# --- per image, then per second ---------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """Demand on every part: per image (`per_image`), or per second at a rate (`at`)."""

    worker_cores: float
    api_processes: float
    s3_get: float
    s3_put: float
    s3_in_bytes: float
    s3_out_bytes: float
    s3_cores: float
    postgres_statements: float
    postgres_cores: float
    rabbitmq_messages: float
    rabbitmq_cores: float
    redis_ops: float

    @classmethod
    def per_image(cls, costs: ImageCosts, sizes: Sizes) -> Load:
        """One image: uploaded through the bulk route, processed in batches, its result read
        `result_downloads` times by presigned GETs and `archive_downloads` times in a batch
        archive (one GET by the API each time, and keyset pages of the rows)."""
        batch, upload = costs.batch_size, sizes.upload_batch
        reads = sizes.result_downloads + sizes.archive_downloads
        return cls(
            worker_cores=costs.node_cpu_s,
            api_processes=1 / costs.api_images_per_s,
            # The node GETs the original; clients (or the API, for an archive) GET the result.
            s3_get=1 + reads,
            # The API PUTs the original, the node the result.
            s3_put=2,
            s3_in_bytes=costs.original_bytes + costs.result_bytes,
            s3_out_bytes=costs.original_bytes + costs.result_bytes * reads,
            s3_cores=costs.s3_cpu_s,
            # Upload: 1 INSERT + 1 UPDATE per request; processing: claim + commit per batch;
            # an archive reads its rows ARCHIVE_ROW_PASSES times, a page at a time.
            postgres_statements=2 / upload
            + 2 / batch
            + sizes.archive_downloads * ARCHIVE_ROW_PASSES / ARCHIVE_ROWS_PER_PAGE,
            postgres_cores=costs.postgres_cpu_s,
            # One publish and one delivery per image, one `multiple` ack per batch.
            rabbitmq_messages=2 + 1 / batch,
            rabbitmq_cores=costs.rabbitmq_cpu_s,
            # Upload: 2 rate-limit script calls per request; processing: a DEL and a PUBLISH.
            redis_ops=2 / upload + 2,
        )

    def at(self, images_per_s: float) -> Load:
        return Load(**{k: v * images_per_s for k, v in dataclasses.asdict(self).items()})


@dataclass(frozen=True)
class Limit:
    """The most images/s one shared service sustains at its given size."""

    service: str
    size: str
    images_per_s: float


def service_limits(per_image: Load, sizes: Sizes) -> list[Limit]:
    """Each shared service's ceiling, lowest first (the first is the first bottleneck). A
    service whose cost per image was not measured (zero) sets no ceiling and is left out."""
    network_bytes_per_s = sizes.s3_network_gbps * 1e9 / 8
    candidates = [
        ("object store CPU", f"{sizes.s3_cores:g} cores", sizes.s3_cores, per_image.s3_cores),
        (
            "object store network",
            f"{sizes.s3_network_gbps:g} Gbit/s",
            network_bytes_per_s,
            max(per_image.s3_in_bytes, per_image.s3_out_bytes),
        ),
        (
            "PostgreSQL",
            f"{sizes.postgres_cores:g} cores",
            sizes.postgres_cores,
            per_image.postgres_cores,
        ),
        (
            "RabbitMQ",
            f"{sizes.rabbitmq_cores:g} cores",
            sizes.rabbitmq_cores,
            per_image.rabbitmq_cores,
        ),
        ("Redis", f"{sizes.redis_ops_per_s:g} ops/s", sizes.redis_ops_per_s, per_image.redis_ops),
    ]
    limits = [
        Limit(service, size, capacity / cost)
        for service, size, capacity, cost in candidates
        if cost > 0
    ]
    return sorted(limits, key=lambda limit: limit.images_per_s)


@dataclass(frozen=True)
class CapacityPlan:
    images_per_day: int
    costs: ImageCosts
    sizes: Sizes
    average_images_per_s: float
    peak_images_per_s: float
    average: Load
    peak: Load
    worker_nodes: int
    limits: list[Limit]

    @property
    def bottleneck(self) -> Limit:
        return self.limits[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "images_per_day": self.images_per_day,
            "image_class": self.costs.image_class,
            "costs": dataclasses.asdict(self.costs),
            "sizes": dataclasses.asdict(self.sizes),
            "average_images_per_s": self.average_images_per_s,
            "peak_images_per_s": self.peak_images_per_s,
            "average": dataclasses.asdict(self.average),
            "peak": dataclasses.asdict(self.peak),
            "worker_nodes": self.worker_nodes,
            "api_processes": math.ceil(self.peak.api_processes),
            "limits": [dataclasses.asdict(limit) for limit in self.limits],
            "bottleneck": {
                **dataclasses.asdict(self.bottleneck),
                "saturated_at_peak": self.bottleneck.images_per_s < self.peak_images_per_s,
            },
        }


def plan_capacity(images_per_day: int, costs: ImageCosts, sizes: Sizes) -> CapacityPlan:
    """Size a deployment for `images_per_day`, arriving at `sizes.peak_factor` times the daily
    average at the busiest time; workers and API processes are sized for that peak."""
    if images_per_day < 1:
        raise ValueError("images per day must be at least 1")
    average = images_per_day / SECONDS_PER_DAY
    peak = average * sizes.peak_factor
    per_image = Load.per_image(costs, sizes)
    at_peak = per_image.at(peak)
    return CapacityPlan(
        images_per_day=images_per_day,
        costs=costs,
        sizes=sizes,
        average_images_per_s=average,
        peak_images_per_s=peak,
        average=per_image.at(average),
        peak=at_peak,
        worker_nodes=math.ceil(at_peak.worker_cores / sizes.cores_per_node),
        limits=service_limits(per_image, sizes),
    )


# --- the screen -------------------------------------------------------------------------------

MB = 1e6
# (label, field of Load, divisor, decimals)
_ROWS = (
    ("worker cores", "worker_cores", 1, 1),
    ("API processes", "api_processes", 1, 1),
    ("S3 GET requests/s", "s3_get", 1, 0),
    ("S3 PUT requests/s", "s3_put", 1, 0),
    ("S3 bandwidth in, MB/s", "s3_in_bytes", MB, 0),
    ("S3 bandwidth out, MB/s", "s3_out_bytes", MB, 0),
    ("S3 server cores", "s3_cores", 1, 1),
    ("PostgreSQL statements/s", "postgres_statements", 1, 0),
    ("PostgreSQL cores", "postgres_cores", 1, 2),
    ("RabbitMQ messages/s", "rabbitmq_messages", 1, 0),
    ("RabbitMQ cores", "rabbitmq_cores", 1, 2),
    ("Redis operations/s", "redis_ops", 1, 0),
)


def render_text(plan: CapacityPlan) -> str:
    sizes, costs = plan.sizes, plan.costs
    peak_label = f"peak (x{sizes.peak_factor:g})"
    lines = [
        f"{plan.images_per_day:,} {costs.image_class} images a day",
        f"  costs: {costs.source}",
        f"  API: {costs.api_source}",
        "",
        f"{'':<26}{'average':>12}{peak_label:>14}",
        f"{'images/s':<26}{plan.average_images_per_s:>12.1f}{plan.peak_images_per_s:>14.1f}",
    ]
    for label, name, divisor, decimals in _ROWS:
        average = getattr(plan.average, name) / divisor
        peak = getattr(plan.peak, name) / divisor
        lines.append(f"{label:<26}{average:>12.{decimals}f}{peak:>14.{decimals}f}")
    lines += [
        "",
        f"at the peak: {plan.worker_nodes} worker nodes of {sizes.cores_per_node} cores, "
        f"{math.ceil(plan.peak.api_processes)} API processes",
        "shared services, the images/s each sustains at its size (lowest first):",
    ]
    for limit in plan.limits:
        headroom = limit.images_per_s / plan.peak_images_per_s
        lines.append(
            f"  {limit.service:<22}{limit.size:>16}{limit.images_per_s:>12.0f}/s"
            f"  {headroom:>6.2f}x the peak"
        )
    first = plan.bottleneck
    verdict = "saturated at the peak" if first.images_per_s < plan.peak_images_per_s else "ok"
    lines.append(f"first bottleneck: {first.service} ({verdict})")
    return "\n".join(lines)


# --- where the figures come from --------------------------------------------------------------


def default_results_root() -> Path:
    return project_root() / "bench" / "results"


def _documents(results: Path) -> Iterator[dict[str, Any]]:
    """Every results document at `results` (one file, or all below a directory)."""
    paths = [results] if results.is_file() else sorted(results.rglob(RESULTS_FILE))
    for path in paths:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CapacityError(f"cannot read {path}: {exc}") from exc
        if isinstance(document, dict):
            document.setdefault("_path", str(path))
            yield document


def _newest(documents: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(documents, key=lambda d: str(d.get("timestamp", "")), default=None)


def _engine_row(document: dict[str, Any], image_class: str) -> dict[str, Any] | None:
    """The class's run with the largest batch (how nodes run in production)."""
    rows = [row for row in document.get("runs", []) if row.get("image_class") == image_class]
    return max(rows, key=lambda row: int(row.get("batch_size", 0)), default=None)


def _e2e_rate(document: dict[str, Any]) -> float | None:
    """Accepted images/s of the bulk run of an e2e document (its only run otherwise)."""
    run = document.get("bulk") or document.get("run") or {}
    rate = run.get("accepted_images_per_s")
    return float(rate) if rate else None


def costs_from_results(
    image_class: str, results: Path, api_processes_measured: int = 2
) -> ImageCosts | None:
    """The class's costs from the newest engine document at `results` that has it (and the
    newest e2e document of the class); None when no engine document has the class."""
    documents = list(_documents(results))
    engines = [d for d in documents if d.get("kind") == "engine" and _engine_row(d, image_class)]
    engine = _newest(engines)
    if engine is None:
        return None
    row = _engine_row(engine, image_class)
    assert row is not None
    reference = REFERENCE_COSTS.get(image_class)
    api_rate, api_source = _api_rate(documents, image_class, reference, api_processes_measured)
    original, result = _bytes(row, reference, engine["_path"])
    services = row.get("services_cpu_s_per_image", {})
    try:
        return ImageCosts(
            image_class=image_class,
            node_cpu_s=float(row["node_cpu_s_per_image"]),
            s3_cpu_s=float(services.get("seaweedfs", 0.0)),
            postgres_cpu_s=float(services.get("postgresql", 0.0)),
            rabbitmq_cpu_s=float(services.get("rabbitmq", 0.0)),
            original_bytes=original,
            result_bytes=result,
            batch_size=int(row.get("batch_size", 1)),
            api_images_per_s=api_rate,
            source=f"{engine['_path']} ({engine.get('timestamp', 'undated')})",
            api_source=api_source,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CapacityError(f"{engine['_path']}: not an engine run's row ({exc})") from exc


def _api_rate(
    documents: list[dict[str, Any]],
    image_class: str,
    reference: ImageCosts | None,
    api_processes_measured: int,
) -> tuple[float, str]:
    """Images/s one API process accepts, and where that comes from: the newest e2e document of
    the class, else the reference profile's figure."""
    of_class = [
        d
        for d in documents
        if d.get("kind") == "e2e" and d.get("settings", {}).get("image_class") == image_class
    ]
    e2e = _newest(of_class)
    rate = _e2e_rate(e2e) if e2e is not None else None
    if e2e is not None and rate:
        return (
            rate / api_processes_measured,
            f"{e2e['_path']} ({api_processes_measured} API processes)",
        )
    if reference is not None:
        return reference.api_images_per_s, reference.api_source
    raise CapacityError(
        f"no e2e results for {image_class}: run `python -m bench e2e --class {image_class}`"
    )


def _bytes(row: dict[str, Any], reference: ImageCosts | None, path: str) -> tuple[float, float]:
    """Mean original and result bytes: the run's own, else the reference class's."""
    if "original_bytes_per_image" in row and "result_bytes_per_image" in row:
        return float(row["original_bytes_per_image"]), float(row["result_bytes_per_image"])
    if reference is not None:
        return reference.original_bytes, reference.result_bytes
    raise CapacityError(f"{path} has no image sizes: run `python -m bench engine` again")


def load_costs(image_class: str, results: Path | None, api_processes_measured: int) -> ImageCosts:
    """Costs from `results` (which must have the class), else from the newest results under
    bench/results, else the reference profile."""
    if results is not None:
        found = costs_from_results(image_class, results, api_processes_measured)
        if found is None:
            raise CapacityError(f"{results} has no engine run of {image_class}")
        return found
    root = default_results_root()
    found = costs_from_results(image_class, root, api_processes_measured) if root.is_dir() else None
    if found is not None:
        return found
    if image_class in REFERENCE_COSTS:
        return REFERENCE_COSTS[image_class]
    known = ", ".join(sorted(REFERENCE_COSTS))
    raise CapacityError(
        f"no figures for {image_class} (reference classes: {known}): "
        f"run `python -m bench engine --class {image_class}`"
    )


# --- the command ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = Sizes()
    parser = argparse.ArgumentParser(prog="python -m ops capacity", description=__doc__)
    parser.add_argument("--images-per-day", type=int, required=True)
    parser.add_argument("--class", dest="image_class", default="jpeg-12mp")
    parser.add_argument("--results", type=Path, help="a results.json or a directory of runs")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--e2e-api-processes", type=int, default=2, help="API processes the e2e bench ran"
    )
    for field in dataclasses.fields(Sizes):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(
            flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name)
        )
    return parser


def capacity_command(argv: list[str]) -> int:
    """Size a deployment from the benchmarks (--images-per-day N [--class C] [--json])."""
    args = _parser().parse_args(argv)
    try:
        if args.e2e_api_processes < 1:
            raise ValueError("e2e-api-processes must be at least 1")
        sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
        costs = load_costs(args.image_class, args.results, args.e2e_api_processes)
        plan = plan_capacity(args.images_per_day, costs, sizes)
    except (CapacityError, ValueError) as exc:
        print(f"python -m ops capacity: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan.to_json(), indent=2) if args.json else render_text(plan))
    return 0
