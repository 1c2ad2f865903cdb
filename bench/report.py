"""Presentation of benchmark results: Markdown summary tables and PNG plots (matplotlib, Agg).

Kernel results get a throughput bar chart and a throughput-vs-processes chart. End-to-end results
of the shape {"latency_ms": {"upload": {"p50": ..}, "completed": {..}}, "stages_ms": {stage: ms}}
get a latency-percentile chart and a per-stage breakdown. Fairness results get the latency of
interactive uploads over time while a backlog drains, with lanes and without.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.corpus import IMAGE_CLASSES
from bench.kernel_bench import ALL_CLASSES, SIZE_BASELINE, SUBJECT
from bench.results import markdown_table, read_results

Summary = list[dict[str, Any]]


def _class_order(summary: Summary) -> list[str]:
    present = {row["image_class"] for row in summary}
    ordered = [name for name in IMAGE_CLASSES if name in present]
    return ordered + sorted(present - set(ordered) - {ALL_CLASSES}) + [ALL_CLASSES]


def _speedups(result: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, float | None]]:
    return {
        (row["image_class"], row["format"], row["processes"]): row["speedup"]
        for row in result["comparisons"]
    }


def kernel_throughput_table(result: dict[str, Any]) -> str:
    """One row per format, processes, class and implementation, medians over repeats."""
    speedups = _speedups(result)
    order = {name: index for index, name in enumerate(_class_order(result["summary"]))}
    impls = {name: index for index, name in enumerate(result["implementations"])}
    rows = []
    for row in sorted(
        result["summary"],
        key=lambda r: (
            r["format"],
            r["processes"],
            order[r["image_class"]],
            impls.get(r["implementation"], 99),
        ),
    ):
        key = (row["image_class"], row["format"], row["processes"])
        speedup = speedups.get(key, {}).get(row["implementation"])
        out_kb = row["out_bytes_per_image"] / 1024 if row["out_bytes_per_image"] else None
        rows.append(
            [
                row["format"],
                row["processes"],
                row["image_class"],
                row["implementation"],
                row["images_per_s"],
                row["megapixels_per_s"],
                row["cpu_ms_per_image"],
                out_kb,
                row["images_failed"],
                f"{speedup:.2f}x" if speedup else "-",
            ]
        )
    headers = [
        "format",
        "P",
        "class",
        "impl",
        "images/s",
        "MP/s",
        "CPU ms/img",
        "out KB",
        "failed",
        f"{SUBJECT} speed-up",
    ]
    return markdown_table(headers, rows)


def kernel_comparison_table(result: dict[str, Any]) -> str:
    """pixelmill's speed over each reference and its output size relative to vips, per class."""
    references = [name for name in result["implementations"] if name != SUBJECT]
    order = {name: index for index, name in enumerate(_class_order(result["summary"]))}
    rows = []
    for row in sorted(
        result["comparisons"], key=lambda r: (r["format"], r["processes"], order[r["image_class"]])
    ):
        speedups = [row["speedup"].get(name) for name in references]
        rows.append(
            [
                row["format"],
                row["processes"],
                row["image_class"],
                *[f"{s:.2f}x" if s else "-" for s in speedups],
                row["size_vs_vips"],
            ]
        )
    headers = [
        "format",
        "P",
        "class",
        *[f"vs {name}" for name in references],
        f"bytes vs {SIZE_BASELINE}",
    ]
    return markdown_table(headers, rows)


def kernel_summary_markdown(document: dict[str, Any]) -> str:
    """The Markdown summary of a kernel results document."""
    machine = document["machine"]
    lines = [
        f"# Kernel benchmark ({document['timestamp']}, commit {document['git_commit'][:12]})",
        "",
        f"{machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        "one thread per process; medians of "
        f"{document['settings']['repeat']} repeats; images/s counts successful images only.",
        "",
    ]
    for name, reason in document["skipped"].items():
        lines.append(f"Skipped {name}: {reason}")
    lines += ["", kernel_throughput_table(document), kernel_comparison_table(document)]
    return "\n".join(lines)


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure on the Agg canvas: no pyplot, so no global GUI backend state."""
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _grouped_bars(axis: Any, groups: Sequence[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, values, width, label=label)
    axis.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axis.legend(fontsize="small")


def plot_kernel_throughput(
    document: dict[str, Any], path: Path, processes: int = 1, fmt: str = "png"
) -> Path:
    """Bar chart: images/s per class (log scale), one bar per implementation, P processes."""
    rows = [r for r in document["summary"] if r["processes"] == processes and r["format"] == fmt]
    classes = _class_order(rows)
    lookup = {(r["implementation"], r["image_class"]): r["images_per_s"] for r in rows}
    series = {
        impl: [lookup.get((impl, name), 0.0) for name in classes]
        for impl in document["implementations"]
    }
    figure = _new_figure((10, 5))
    axis = figure.subplots()
    _grouped_bars(axis, classes, series)
    axis.set_yscale("log")
    axis.set_ylabel("images/s (median)")
    axis.set_title(f"Kernel throughput, {processes} process(es), {fmt} output")
    return _save(figure, path)


def plot_kernel_scaling(document: dict[str, Any], path: Path, fmt: str = "png") -> Path:
    """Line charts: images/s against number of processes, one panel per class."""
    rows = [r for r in document["summary"] if r["format"] == fmt]
    classes = _class_order(rows)
    columns = 3
    figure = _new_figure((12, 3.2 * ((len(classes) + columns - 1) // columns)))
    axes = figure.subplots(
        (len(classes) + columns - 1) // columns,
        columns,
        squeeze=False,
    )
    for axis, name in zip(axes.flat, classes, strict=False):
        for impl in document["implementations"]:
            points = sorted(
                (r["processes"], r["images_per_s"])
                for r in rows
                if r["implementation"] == impl and r["image_class"] == name
            )
            axis.plot([p for p, _ in points], [v for _, v in points], marker="o", label=impl)
        axis.set_title(name, fontsize="medium")
        axis.set_xticks(sorted({r["processes"] for r in rows}))
        axis.set_xlabel("processes")
        axis.set_ylabel("images/s")
    for axis in list(axes.flat)[len(classes) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    return _save(figure, path)


def plot_latency_percentiles(e2e: dict[str, Any], path: Path) -> Path:
    """Grouped bars of latency percentiles (ms) for each measured latency (upload, completed)."""
    latencies: dict[str, dict[str, float]] = e2e["latency_ms"]
    percentile_names = sorted(
        {p for values in latencies.values() for p in values}, key=lambda p: float(p.lstrip("p"))
    )
    series = {p: [latencies[name].get(p, 0.0) for name in latencies] for p in percentile_names}
    figure = _new_figure((8, 4.5))
    axis = figure.subplots()
    _grouped_bars(axis, list(latencies), series)
    axis.set_ylabel("latency (ms)")
    axis.set_title("End-to-end latency percentiles")
    return _save(figure, path)


def plot_stage_breakdown(e2e: dict[str, Any], path: Path) -> Path:
    """Horizontal bars: median milliseconds spent in each pipeline stage."""
    stages: dict[str, float] = e2e["stages_ms"]
    figure = _new_figure((8, 0.5 * len(stages) + 1.5))
    axis = figure.subplots()
    axis.barh(list(stages), list(stages.values()))
    axis.invert_yaxis()
    axis.set_xlabel("median ms per image")
    axis.set_title("Per-stage breakdown")
    return _save(figure, path)


def plot_sweep_throughput(document: dict[str, Any], path: Path) -> Path:
    """Lines: images/s against processes, one line per (batch size, prefetch) of an engine sweep."""
    figure = _new_figure((8, 4.5))
    axis = figure.subplots()
    series: dict[str, list[tuple[int, float]]] = {}
    for row in document["rows"]:
        label = f"batch {row['batch_size']}, prefetch {row['prefetch']}"
        series.setdefault(label, []).append((row["processes"], row["images_per_s"]))
    for label, points in series.items():
        points.sort()
        axis.plot([p for p, _ in points], [v for _, v in points], marker="o", label=label)
    axis.set_xlabel("processes")
    axis.set_ylabel("images/s")
    axis.set_title(f"Engine sweep: {document['rows'][0]['image_class']}")
    axis.legend(fontsize="small")
    return _save(figure, path)


def _engine_rows(runs: list[dict[str, Any]]) -> list[list[object]]:
    rows = []
    for run in runs:
        services = run["services_cpu_s_per_image"]
        rows.append(
            [
                run["image_class"],
                run["count"],
                run["processes"],
                run["prefetch"],
                run["batch_size"],
                run["images_per_s"],
                run["failed"],
                run["node_cpu_s_per_image"] * 1000,
                run.get("node_kernel_cpu_s_per_image", 0.0) * 1000,
                run.get("cpu_ratio_in_node"),
                run.get("kernel_cpu_s_per_image", 0.0) * 1000,
                run.get("cpu_ratio"),
                services.get("seaweedfs", 0.0) * 1000,
                services.get("rabbitmq", 0.0) * 1000,
                services.get("postgresql", 0.0) * 1000,
                run["node_peak_pss_mib"],
                run["node_peak_rss_sum_mib"],
                run["memory_mb"],
            ]
        )
    return rows


ENGINE_HEADERS = [
    "class",
    "N",
    "P",
    "prefetch",
    "batch",
    "images/s",
    "failed",
    "node CPU ms/img",
    "kernel CPU in node ms/img",
    "node/kernel",
    "kernel CPU alone ms/img",
    "node/kernel alone",
    "weed ms/img",
    "rabbitmq ms/img",
    "postgres ms/img",
    "node PSS MiB",
    "node RSS sum MiB",
    "memory-mb",
]


def engine_summary_markdown(document: dict[str, Any]) -> str:
    """Runs table, batch-size comparisons and per-stage medians of an engine results document."""
    lines = [
        f"# Engine benchmark ({document['timestamp']}, commit {document['git_commit'][:12]})",
        "",
        "images/s counts completed images only; CPU per image from /proc (node = the node process "
        "and all its descendants); node/kernel divides it by the kernel's CPU inside the node's "
        "CPU processes in the same run (target <= 1.15), node/kernel alone by the kernel's CPU "
        "measured alone on the same files; service CPU is machine-wide for "
        "RabbitMQ and PostgreSQL. PSS splits shared memory among processes; RSS sums count "
        "the shared arenas once per process.",
        "",
        markdown_table(ENGINE_HEADERS, _engine_rows(document["runs"])),
    ]
    for row in document.get("batch_comparison", []):
        verdict = "meets" if row["meets_target"] else "misses"
        lines.append(
            f"- {row['image_class']}: batch {row['batch_size']} is "
            f"{row['speedup_vs_batch_1'] or 0:.2f}x batch 1 ({verdict} the {row['target']}x target)"
        )
    lines += ["", "Median ms per image per stage:", "", _stage_table(document["runs"])]
    return "\n".join(lines)


def _stage_table(runs: list[dict[str, Any]]) -> str:
    stages = sorted({stage for run in runs for stage in run["stages_ms"]})
    rows = [
        [f"{r['image_class']} P{r['processes']} B{r['batch_size']}"]
        + [r["stages_ms"].get(stage) for stage in stages]
        for r in runs
    ]
    return markdown_table(["run", *stages], rows)


E2E_HEADERS = [
    "route",
    "images",
    "requests",
    "requests/s",
    "accepted img/s",
    "completed img/s",
    "upload p50 ms",
    "upload p95 ms",
    "upload p99 ms",
    "to completed p50 ms",
    "p95 ms",
    "p99 ms",
    "failures",
]


def _e2e_row(stats: dict[str, Any]) -> list[object]:
    upload = stats["latency_ms"].get("upload", {})
    done = stats["latency_ms"].get("completed", {})
    return [
        stats["route"],
        stats["images"],
        stats["requests"],
        stats["upload_requests_per_s"],
        stats["accepted_images_per_s"],
        stats["completed_images_per_s"],
        upload.get("p50"),
        upload.get("p95"),
        upload.get("p99"),
        done.get("p50"),
        done.get("p95"),
        done.get("p99"),
        stats["failures"],
    ]


def e2e_summary_markdown(document: dict[str, Any]) -> str:
    """One row per run (single and bulk when compared), the ratio and the API's peak memory."""
    runs = [document[name] for name in ("single", "bulk") if name in document]
    runs = runs or [document["run"]]
    settings = document["settings"]
    lines = [
        f"# End-to-end benchmark ({document['timestamp']}, commit {document['git_commit'][:12]})",
        "",
        f"{settings['count']} x {settings['image_class']} per run, {settings['concurrency']} "
        f"concurrent clients, batch size {settings['batch_size']}; failed or rejected images "
        "count as failures, never as throughput.",
        "",
        markdown_table(E2E_HEADERS, [_e2e_row(stats) for stats in runs]),
    ]
    if "bulk_vs_single_accepted" in document:
        speedup = document["bulk_vs_single_accepted"] or 0.0
        verdict = "meets" if document["meets_target"] else "misses"
        memory = document["api_memory_during_bulk"]
        lines += [
            f"Bulk accepts {speedup:.2f}x the images/s of single ({verdict} the "
            f"{document['target']}x target).",
            f"API peak RSS during the bulk run: {memory['peak_rss_mib_max']} MiB max over "
            f"{memory['processes']} processes ({memory['method']}).",
        ]
    for stats in runs:
        for reason, count in stats["failure_reasons"].items():
            lines.append(f"- {stats['route']}: {count} x {reason}")
    return "\n".join(lines) + "\n"


FAIRNESS_HEADERS = [
    "lanes",
    "idle p50 ms",
    "idle p95 ms",
    "draining p50 ms",
    "draining p95 ms",
    "p95 / idle p95",
    "B alone s",
    "B behind backlog s",
    "B ratio",
    "images/s median",
    "images/s min-max",
]


def _fairness_row(name: str, mode: dict[str, Any]) -> list[object]:
    spread = f"{mode['images_per_s_min']:.1f}-{mode['images_per_s_max']:.1f}"
    return [
        name,
        mode["idle_p50_ms"],
        mode["idle_p95_ms"],
        mode["draining_p50_ms"],
        mode["draining_p95_ms"],
        mode["latency_ratio"],
        mode["second_owner_alone_s"],
        mode["second_owner_behind_s"],
        mode["second_owner_ratio"],
        mode["images_per_s_median"],
        spread,
    ]


def fairness_summary_markdown(document: dict[str, Any]) -> str:
    """Lanes on and off side by side (medians over the runs of each), and the targets."""
    summary, config = document["summary"], document["config"]
    modes = [(name, summary[key]) for name, key in (("on", "lanes_on"), ("off", "lanes_off"))]
    met = summary["meets_target"]
    targets = summary["targets"]
    throughput = summary["throughput_ratio"]

    def verdict(ok: bool) -> str:
        return "meets" if ok else "misses"

    return "\n".join(
        [
            f"# Fairness benchmark ({document['timestamp']}, commit {document['git_commit'][:12]})",
            "",
            f"Owner A's backlog of {config['backlog']} x {config['backlog_class']}, owner B's "
            f"{config['second_owner']} published right behind it, single "
            f"{config['interactive_class']} uploads every {config['sample_interval_s']} s while "
            f"it drains; {config['repeats']} runs with lanes on and off each, interleaved; "
            "medians over the runs.",
            "",
            markdown_table(FAIRNESS_HEADERS, [_fairness_row(n, m) for n, m in modes if m]),
            f"- interactive p95 while draining: {verdict(met['latency'])} the "
            f"{targets['latency_ratio']}x idle p95 target (lanes on)",
            f"- owner B behind the backlog: {verdict(met['second_owner'])} the "
            f"{targets['second_owner_ratio']}x its idle time target (lanes on)",
            f"- throughput lanes on / off: {_rounded(throughput)}"
            f" ({verdict(met['throughput'])} the {targets['throughput_ratio']}x target)",
            "",
        ]
    )


def _rounded(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot_fairness_latency(document: dict[str, Any], path: Path) -> Path:
    """Latency of each interactive upload against when it was sent into the drain, every run,
    lanes on and off in two colours (log scale: without lanes it grows with the backlog)."""
    figure = _new_figure((8, 4.5))
    axis = figure.subplots()
    labelled: set[bool] = set()
    for run in document["runs"]:
        lanes = bool(run["lanes"])
        points = run["samples"]
        axis.plot(
            [p["at_s"] for p in points],
            [p["latency_s"] * 1000 for p in points],
            marker="o",
            markersize=3,
            color="tab:blue" if lanes else "tab:red",
            label=None if lanes in labelled else ("lanes on" if lanes else "lanes off"),
        )
        labelled.add(lanes)
    axis.set_yscale("log")
    axis.set_xlabel("seconds since the backlog was published")
    axis.set_ylabel("upload -> completed (ms)")
    axis.set_title("Interactive uploads while a bulk backlog drains")
    axis.legend(fontsize="small")
    return _save(figure, path)


def sweep_summary_markdown(document: dict[str, Any]) -> str:
    """The grid as a table and the best setting named."""
    best = document.get("best")
    if document["mode"] == "engine":
        table = markdown_table(ENGINE_HEADERS, _engine_rows(document["rows"]))
        named = (
            f"P={best['processes']} prefetch={best['prefetch']} batch={best['batch_size']} "
            f"({best['images_per_s']:.1f} images/s)"
            if best
            else "none (every setting had failures)"
        )
    else:
        table = markdown_table(
            ["batch", "clients", *E2E_HEADERS],
            [[r["batch_size"], r["concurrency"], *_e2e_row(r)] for r in document["rows"]],
        )
        named = (
            f"batch={best['batch_size']} clients={best['concurrency']} "
            f"({best['completed_images_per_s']:.1f} completed images/s)"
            if best
            else "none (every setting had failures)"
        )
    return (
        f"# Sweep ({document['mode']}, {document['timestamp']}, commit "
        f"{document['git_commit'][:12]})\n\n{table}\nBest: {named}\n"
    )


def _yes_no(value: object) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def soak_summary_markdown(document: dict[str, Any]) -> str:
    """`bench soak`: the tenths, the idle GET p99s before and after, sizes, memory, verdicts."""
    lines = [
        f"# Soak: {document['settings']['count']} images into one batch\n",
        f"{document['completed']} completed, {document['failed']} failed, "
        f"{document['rejected']} rejected, {document['unfinished']} unfinished in "
        f"{document['run_seconds']:.0f} s (uploads ended after "
        f"{document['uploads_ended_after_s']:.0f} s; expected about "
        f"{document['expected_seconds']:.0f} s from the warm-up).\n",
        *_soak_tenths(document),
        *_soak_idle(document),
        *_soak_memory(document["memory"]),
    ]
    return "\n".join(lines)


def _soak_tenths(document: dict[str, Any]) -> list[str]:
    headers = ["tenth", "images", "completed/s", "after uploads", "GET batch p99", "GET image p99"]
    rows = [
        [
            t["index"],
            t["images"],
            t["per_second"],
            "yes" if t["after_uploads"] else "",
            p["get_batch_p99_ms"],
            p["get_image_p99_ms"],
        ]
        for t, p in zip(document["tenths"], document["p99_by_tenth"], strict=True)
    ]
    rate = document["rate"]
    return [
        "## Completed per second, by tenth of the images (p99 in ms)\n",
        markdown_table(headers, rows),
        f"Last tenth after the uploads vs the first: {rate['ratio']} (target >= 0.9): "
        f"{_yes_no(rate['meets_target'])}\n",
    ]


def _soak_idle(document: dict[str, Any]) -> list[str]:
    before, after = document["idle_before"], document["idle_after"]
    p99_rows = [
        [name, before["p99_ms"][name], after["p99_ms"][name], ratio]
        for name, ratio in document["p99_after_vs_before"].items()
    ]
    size_rows = [
        [table, *(_mib(side["tables"][table][k]) for side in (before, after) for k in SIZE_KEYS)]
        for table in after["tables"]
    ]
    return [
        "## Idle GET p99 (ms), before and after\n",
        markdown_table(["request", "before", "after", "after/before"], p99_rows),
        f"Every p99 after <= 1.5x before: {_yes_no(document['p99_meets_target'])}\n",
        "## Sizes\n",
        markdown_table(
            ["table", "table MiB before", "index MiB before", "table MiB after", "index MiB after"],
            size_rows,
        ),
        f"Redis used memory: {_mib(before['redis_used_memory_bytes'])} MiB before, "
        f"{_mib(after['redis_used_memory_bytes'])} MiB after.\n",
    ]


def _soak_memory(memory: dict[str, Any]) -> list[str]:
    rows = [
        [
            pid,
            row["role"],
            row["peak_rss_mib"],
            row["rss_at_first_tenth_mib"],
            row["rss_at_end_mib"],
            "YES" if row["grew"] else "no",
        ]
        for pid, row in memory["processes"].items()
    ]
    services = ", ".join(f"{k} {v} MiB" for k, v in memory["services_peak_rss_mib"].items())
    return [
        "## Memory of the pixelmill processes (MiB)\n",
        markdown_table(["pid", "role", "peak", "at first tenth", "at end", "grew"], rows),
        f"No pixelmill process grows with the count: {_yes_no(memory['meets_target'])}. "
        f"Services' peak RSS (reported, not judged): {services}\n",
    ]


SIZE_KEYS = ("table_bytes", "index_bytes")


def _mib(value: int) -> float:
    return round(value / (1024 * 1024), 2)


def plot_soak_timeline(document: dict[str, Any], path: Path) -> Path:
    """Throughput (completed/s between samples) and the sampled GET latencies over the run."""
    points = document["timeline"]
    start = points[0]["t"] if points else 0.0
    times = [p["t"] - start for p in points]
    rates = [0.0] + [
        max(0.0, (b["done"] - a["done"]) / max(b["t"] - a["t"], 1e-9))
        for a, b in itertools.pairwise(points)
    ]
    figure = _new_figure((9, 5))
    throughput, latency = figure.subplots(2, 1, sharex=True)
    throughput.plot(times, rates[: len(times)])
    throughput.set_ylabel("completed/s")
    throughput.set_title(f"Soak: {document['settings']['count']} images in one batch")
    latency.plot(times, [p["get_batch_ms"] for p in points], label="GET batch")
    latency.plot(times, [p["get_image_ms"] for p in points], label="GET image")
    latency.set_ylabel("latency (ms)")
    latency.set_xlabel("seconds into the run")
    latency.legend(fontsize="small")
    return _save(figure, path)


def kernel_plots(document: dict[str, Any], out_dir: Path, prefix: str) -> list[Path]:
    """Throughput bars for every format and process count; scaling lines per format."""
    written = []
    settings = document["settings"]
    for fmt in settings["formats"]:
        for processes in settings["processes"]:
            target = out_dir / f"{prefix}-kernel-{fmt}-throughput-p{processes}.png"
            written.append(plot_kernel_throughput(document, target, processes, fmt))
        if len(settings["processes"]) > 1:
            target = out_dir / f"{prefix}-kernel-{fmt}-scaling.png"
            written.append(plot_kernel_scaling(document, target, fmt))
    return written


def plots_for(document: dict[str, Any], out_dir: Path, prefix: str) -> list[Path]:
    """The plots that fit one results document (kernel, end-to-end, or both parts)."""
    written = []
    if document.get("kind") == "kernel":
        written += kernel_plots(document, out_dir, prefix)
    if "latency_ms" in document:
        written.append(plot_latency_percentiles(document, out_dir / f"{prefix}-latency.png"))
    if document.get("stages_ms"):
        written.append(plot_stage_breakdown(document, out_dir / f"{prefix}-stages.png"))
    if document.get("kind") == "soak":
        written.append(plot_soak_timeline(document, out_dir / f"{prefix}-soak.png"))
    if document.get("kind") == "sweep" and document.get("mode") == "engine" and document["rows"]:
        written.append(plot_sweep_throughput(document, out_dir / f"{prefix}-sweep.png"))
    if document.get("kind") == "fairness" and document["runs"]:
        written.append(plot_fairness_latency(document, out_dir / f"{prefix}-fairness.png"))
    return written


def generate_report(result_paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Write the plots for every results file into out_dir; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in result_paths:
        prefix = path.parent.name if path.name == "results.json" else path.stem
        written += plots_for(read_results(path), out_dir, prefix)
    return written
