"""The benchmarks' command line: `python -m bench COMMAND`.

Commands: corpus, kernel, engine, e2e, fairness, soak, chaos, sweep, report, quick, full.

This is a CLI edge: `engine` and `sweep` read the environment (Settings) for where PostgreSQL,
RabbitMQ and Redis live; everything they create there is their own and removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.chaos import DEFAULT_CHAOS_SEED, ChaosConfig, chaos_markdown, run_chaos
from bench.corpus import IMAGE_CLASSES, MANIFEST_NAME, bpp_by_class, is_photo_like, write_corpus
from bench.e2e import E2EConfig, compare_single_and_bulk, e2e_images, e2e_statistics, mint_token
from bench.e2e import run_upload as run_e2e_upload
from bench.engine_bench import EngineRunSpec, NodeSettings, run_engine_benchmark
from bench.fairness import FairnessConfig, run_fairness_benchmark
from bench.kernel_bench import (
    IMPLEMENTATIONS,
    REPO_ROOT,
    KernelBenchConfig,
    rendition_costs_markdown,
    run_kernel_benchmark,
)
from bench.report import (
    e2e_summary_markdown,
    engine_summary_markdown,
    fairness_summary_markdown,
    generate_report,
    kernel_summary_markdown,
    soak_summary_markdown,
    sweep_summary_markdown,
)
from bench.results import build_document, new_run_dir, write_results
from bench.soak import SoakConfig, run_soak
from bench.sweep import engine_grid, sweep_e2e, sweep_engine
from common.config import Settings, declare_local
from common.cpu_limit import usable_cores
from ops.stack import http_ok

DEFAULT_RESULTS_ROOT = REPO_ROOT / "bench" / "results"
DEFAULT_SEED = 20240601


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def make_corpus(out_dir: Path, count: int, seed: int, classes: Sequence[str]) -> None:
    """Generate a corpus and print its bits per pixel per class (the photo-likeness check)."""
    started = time.perf_counter()
    entries = write_corpus(out_dir, count, seed, list(classes) or None)
    elapsed = time.perf_counter() - started
    print(f"corpus: {len(entries)} images in {out_dir} ({elapsed:.1f}s, seed {seed})")
    for name, bpp in bpp_by_class(entries).items():
        verdict = ""
        if IMAGE_CLASSES[name].is_jpeg:
            verdict = "photo-like" if is_photo_like(bpp) else "OUTSIDE the photo range 1.5-4"
        print(f"  {name:18s} {bpp:6.2f} bits/pixel  {verdict}")


def run_kernel(config: KernelBenchConfig, results_root: Path, command: str, plots: bool) -> Path:
    """Run the kernel benchmark, write results.json + summary.md (+ plots), print the summary."""
    payload = run_kernel_benchmark(config, os.environ)
    settings = payload.pop("settings")
    document = build_document(command, settings, payload, REPO_ROOT)
    markdown = kernel_summary_markdown(document) + rendition_costs_markdown(
        payload.get("rendition_costs", [])
    )
    run_dir = new_run_dir(results_root, command)
    path = write_results(run_dir, document, markdown)
    if plots:
        generate_report([path], run_dir)
    print(markdown)
    print(f"results: {path}")
    return path


def _kernel_config(args: argparse.Namespace, corpus_dir: Path) -> KernelBenchConfig:
    return KernelBenchConfig(
        corpus_dir=corpus_dir.resolve(),
        cache_dir=args.results_dir.resolve() / ".cache",
        implementations=tuple(args.implementations),
        classes=tuple(args.classes),
        repeat=args.repeat,
        processes=tuple(args.processes),
        formats=tuple(args.formats),
        target_width=args.width,
        max_pixels=args.max_pixels,
        min_batch_images=args.min_batch_images,
        renditions=getattr(args, "renditions", ""),
    )


def _profile(args: argparse.Namespace, count: int, defaults: dict[str, object]) -> None:
    # quick shares bench/results/corpus with ad-hoc runs; full keeps its larger corpus apart.
    corpus_dir = args.results_dir / ("corpus" if args.command == "quick" else "corpus-full")
    if not (corpus_dir / MANIFEST_NAME).exists():
        make_corpus(corpus_dir, count, DEFAULT_SEED, [])
    for name, value in defaults.items():
        setattr(args, name, value)
    run_kernel(_kernel_config(args, corpus_dir), args.results_dir, args.command, plots=True)


def command_quick(args: argparse.Namespace) -> None:
    """Kernel: one image per class, 3 repeats, 1 and all processes, PNG only. Engine: 12 MP JPEGs
    (N=32, P=2) and 640x480 JPEGs with batch 1 against 16 (N=320 each: runs of several seconds, so
    that start-up and the last batch's tail weigh little). About 2.5 minutes on 2 cores."""
    cores = usable_cores()
    defaults = {
        "repeat": 3,
        "processes": sorted({1, cores}),
        "formats": ["png"],
        "min_batch_images": 1,
    }
    _profile(args, count=1, defaults=defaults)
    specs = [
        EngineRunSpec("jpeg-12mp", 32, NodeSettings(processes=2)),
        EngineRunSpec("jpeg-small", 320, NodeSettings(processes=2, batch_size=1)),
        EngineRunSpec("jpeg-small", 320, NodeSettings(processes=2, batch_size=16)),
    ]
    run_engine(specs, args.results_dir / "corpus", args.results_dir, "quick-engine")


def command_full(args: argparse.Namespace) -> None:
    """Larger corpus, more repeats, processes 1..cores, PNG and JPEG output; then the fairness
    benchmark at full scale (about 25 minutes on 2 cores) and the chaos run at full scale."""
    cores = usable_cores()
    defaults = {
        "repeat": 5,
        "processes": list(range(1, cores + 1)),
        "formats": ["png", "jpeg"],
        "min_batch_images": 8,
    }
    _profile(args, count=8, defaults=defaults)
    corpus = args.results_dir / "corpus-full"
    specs = [
        *[EngineRunSpec("jpeg-12mp", 48, NodeSettings(processes=p)) for p in range(1, cores + 1)],
        EngineRunSpec("jpeg-2mp", 96, NodeSettings(processes=cores)),
        EngineRunSpec("png-2mp", 48, NodeSettings(processes=cores)),
        EngineRunSpec("jpeg-small", 256, NodeSettings(processes=cores, batch_size=1)),
        EngineRunSpec("jpeg-small", 256, NodeSettings(processes=cores, batch_size=16)),
    ]
    run_engine(specs, corpus, args.results_dir, "full-engine")
    run_fairness(FairnessConfig(), corpus, args.results_dir, "full-fairness")
    if not run_chaos_command(ChaosConfig(), args.results_dir, "full-chaos"):
        sys.exit(1)


def _write(
    command: str,
    settings: dict[str, Any],
    payload: dict[str, Any],
    results_root: Path,
    markdown: Callable[[dict[str, Any]], str],
) -> Path:
    document = build_document(command, settings, payload, REPO_ROOT)
    run_dir = new_run_dir(results_root, command)
    path = write_results(run_dir, document, markdown(document))
    generate_report([path], run_dir)
    print(markdown(document))
    print(f"results: {path}")
    return path


def run_engine(
    specs: Sequence[EngineRunSpec], corpus_dir: Path, results_root: Path, command: str
) -> Path:
    """Engine runs on isolated services; results.json + summary.md + plots."""
    log_dir = results_root / ".cache" / "engine-logs" / command
    payload = run_engine_benchmark(
        Settings.from_env(declare_local(os.environ)), corpus_dir.resolve(), specs, log_dir
    )
    payload["stages_ms"] = payload["runs"][0]["stages_ms"] if payload["runs"] else {}
    settings = {"corpus_dir": str(corpus_dir), "runs": [_spec_settings(s) for s in specs]}
    return _write(command, settings, payload, results_root, engine_summary_markdown)


def _spec_settings(spec: EngineRunSpec) -> dict[str, Any]:
    return {"image_class": spec.image_class, "count": spec.count, **spec.node.__dict__}


def command_engine(args: argparse.Namespace) -> None:
    specs = [
        EngineRunSpec(
            args.image_class,
            args.count,
            NodeSettings(
                args.processes,
                args.prefetch,
                size,
                args.batch_wait_ms,
                args.memory_mb,
                args.renditions,
            ),
            args.timeout,
        )
        for size in args.batch_size
    ]
    run_engine(specs, args.corpus, args.results_dir, "engine")


def run_fairness(
    config: FairnessConfig, corpus_dir: Path, results_root: Path, command: str
) -> Path:
    """Lanes on and off on isolated services; results.json + summary.md + the latency plot."""
    classes = [config.backlog_class, config.interactive_class]
    if not (corpus_dir / MANIFEST_NAME).exists():
        make_corpus(corpus_dir, 1, DEFAULT_SEED, classes)
    log_dir = results_root / ".cache" / "fairness-logs" / command
    payload = run_fairness_benchmark(
        Settings.from_env(declare_local(os.environ)), corpus_dir.resolve(), config, log_dir
    )
    settings = {"corpus_dir": str(corpus_dir), **payload["config"]}
    return _write(command, settings, payload, results_root, fairness_summary_markdown)


def command_fairness(args: argparse.Namespace) -> None:
    config = FairnessConfig(
        backlog=args.backlog,
        second_owner=args.second_owner,
        idle_samples=args.idle_samples,
        samples=args.samples,
        sample_interval_s=args.interval,
        repeats=args.repeats,
        node=NodeSettings(processes=args.processes, batch_size=args.batch_size),
        timeout_s=args.timeout,
    )
    run_fairness(config, args.corpus, args.results_dir, "fairness")


@contextlib.contextmanager
def _stack(url: str, start: bool) -> Iterator[None]:
    """With --start-stack: `python -m ops up` when nothing answers, and `down` afterwards."""
    started = False
    if start and not http_ok(f"{url.rstrip('/')}/health"):
        subprocess.run([sys.executable, "-m", "ops", "up"], cwd=REPO_ROOT, check=True)
        started = True
    try:
        yield
    finally:
        if started:
            subprocess.run([sys.executable, "-m", "ops", "down"], cwd=REPO_ROOT, check=False)


def _e2e_config(args: argparse.Namespace, batch_size: int) -> E2EConfig:
    token = args.token or mint_token(sys.executable, REPO_ROOT, f"bench-{uuid.uuid4().hex[:8]}")
    return E2EConfig(
        url=args.url,
        token=token,
        count=args.count,
        concurrency=args.concurrency,
        batch_size=batch_size,
        image_class=args.image_class,
        wait_timeout_s=args.timeout,
    )


def command_e2e(args: argparse.Namespace) -> None:
    cache = args.results_dir / ".cache"
    with _stack(args.url, args.start_stack):
        config = _e2e_config(args, args.batch_size)
        if args.compare_single:
            single_paths = e2e_images(cache, args.image_class, args.count, seed=1)
            bulk_paths = e2e_images(cache, args.image_class, args.count, seed=2)
            payload = compare_single_and_bulk(config, single_paths, bulk_paths, args.state_dir)
            payload["latency_ms"] = payload["bulk"]["latency_ms"]
        else:
            paths = e2e_images(cache, args.image_class, args.count, seed=1)
            stats = e2e_statistics(run_e2e_upload(config, paths, single=args.single))
            payload = {"run": stats, "latency_ms": stats["latency_ms"]}
    payload["kind"] = "e2e"
    _write("e2e", config.settings(), payload, args.results_dir, e2e_summary_markdown)


def command_soak(args: argparse.Namespace) -> None:
    """Many images through the client into one batch against the running stack (not in CI)."""
    with _stack(args.url, args.start_stack):
        token = args.token or mint_token(
            sys.executable, REPO_ROOT, f"soak-{uuid.uuid4().hex[:8]}", expires_in=48 * 3600
        )
        config = SoakConfig(
            url=args.url,
            token=token,
            settings=Settings.from_env(declare_local(os.environ)),
            state_dir=args.state_dir,
            work_dir=args.results_dir / ".cache",
            count=args.count,
            warmup=args.warmup,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            samples=args.samples,
        )
        payload = run_soak(config)
    _write("soak", config.summary(), payload, args.results_dir, soak_summary_markdown)


def run_chaos_command(config: ChaosConfig, results_root: Path, command: str) -> bool:
    """A chaos run on a stack of its own; results.json + summary.md; whether nothing was lost."""
    log_dir = new_run_dir(results_root, command) / "logs"
    payload = run_chaos(config, log_dir)
    document = build_document(command, payload.pop("config"), payload, REPO_ROOT)
    path = write_results(log_dir.parent, document, chaos_markdown(document))
    print(chaos_markdown(document))
    print(f"results: {path}  (logs: {log_dir})")
    return bool(document["verdict"]["passed"])


def command_chaos(args: argparse.Namespace) -> None:
    config = ChaosConfig(
        uploads=args.uploads,
        faults=args.faults,
        seed=args.seed,
        owners=args.owners,
        gap_s=(args.min_gap, args.max_gap),
        settle_timeout_s=args.settle_timeout,
    )
    if not run_chaos_command(config, args.results_dir, "chaos"):
        sys.exit(1)


def command_sweep(args: argparse.Namespace) -> None:
    if args.mode == "engine":
        specs = engine_grid(
            args.image_class,
            args.count,
            args.processes,
            args.prefetch,
            args.batch_size,
            args.memory_mb,
        )
        log_dir = args.results_dir / ".cache" / "engine-logs" / "sweep"
        payload = sweep_engine(
            Settings.from_env(declare_local(os.environ)), args.corpus.resolve(), specs, log_dir
        )
        settings = {"mode": "engine", "runs": [_spec_settings(s) for s in specs]}
    else:
        with _stack(args.url, args.start_stack):
            config = _e2e_config(args, args.batch_size[0])
            payload = sweep_e2e(
                config, args.results_dir / ".cache", args.batch_size, args.concurrency
            )
        settings = {
            "mode": "e2e",
            **config.settings(),
            "batch_sizes": args.batch_size,
            "concurrency": args.concurrency,
        }
    _write("sweep", settings, payload, args.results_dir, sweep_summary_markdown)


def _add_kernel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--implementations", type=_csv, default=list(IMPLEMENTATIONS))
    parser.add_argument("--classes", nargs="*", default=[], choices=list(IMAGE_CLASSES))
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--max-pixels", type=int, default=100_000_000)
    parser.add_argument(
        "--min-batch-images", type=int, default=8, help="cycle a class's files to this many"
    )


def _add_node_options(parser: argparse.ArgumentParser, many: bool) -> None:
    parser.add_argument("--corpus", type=Path, default=DEFAULT_RESULTS_ROOT / "corpus")
    parser.add_argument("--class", dest="image_class", default="jpeg-12mp", choices=IMAGE_CLASSES)
    parser.add_argument("--count", type=int, default=24, help="images per run")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=600.0, help="longest run, s")
    if many:
        parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
        parser.add_argument("--prefetch", type=int, nargs="+", default=[64])
    else:
        parser.add_argument("--processes", type=int, default=usable_cores())
        parser.add_argument("--prefetch", type=int, default=64)
        parser.add_argument("--batch-wait-ms", type=int, default=50)


def _add_engine_parser(commands: Any) -> None:
    engine = commands.add_parser("engine", help="one worker node alone, on isolated services")
    _add_node_options(engine, many=False)
    engine.add_argument(
        "--batch-size", type=int, nargs="+", default=[16], help="one run per size (e.g. 1 16)"
    )
    engine.add_argument(
        "--renditions", default="", help="the node's RENDITIONS (default: one 800 px gray PNG)"
    )


def _add_stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--token", help="bearer token (default: mint one with python -m ops token)")
    parser.add_argument("--start-stack", action="store_true", help="make up if nothing answers")
    parser.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".state")


def _add_e2e_parser(commands: Any) -> None:
    e2e = commands.add_parser("e2e", help="the running stack over HTTP, as clients use it")
    _add_stack_options(e2e)
    e2e.add_argument("--count", type=int, default=200)
    e2e.add_argument("--concurrency", type=int, default=4)
    e2e.add_argument("--batch-size", type=int, default=16)
    e2e.add_argument("--class", dest="image_class", default="jpeg-small", choices=IMAGE_CLASSES)
    e2e.add_argument("--single", action="store_true", help="the single-image route only")
    e2e.add_argument("--compare-single", action="store_true", help="single vs bulk route")
    e2e.add_argument("--timeout", type=float, default=600.0, help="longest wait for completion")


def _add_fairness_parser(commands: Any) -> None:
    full = FairnessConfig()
    fairness = commands.add_parser(
        "fairness",
        help="interactive latency and a second bulk owner during a backlog, lanes on/off",
    )
    fairness.add_argument("--corpus", type=Path, default=DEFAULT_RESULTS_ROOT / "corpus")
    fairness.add_argument("--backlog", type=int, default=full.backlog, help="owner A's images")
    fairness.add_argument("--second-owner", type=int, default=full.second_owner)
    fairness.add_argument("--idle-samples", type=int, default=full.idle_samples)
    fairness.add_argument(
        "--samples", type=int, default=full.samples, help="most interactive uploads per drain"
    )
    fairness.add_argument("--interval", type=float, default=full.sample_interval_s)
    fairness.add_argument("--repeats", type=int, default=full.repeats, help="runs per mode")
    fairness.add_argument("--processes", type=int, default=full.node.processes)
    fairness.add_argument("--batch-size", type=int, default=full.node.batch_size)
    fairness.add_argument("--timeout", type=float, default=full.timeout_s, help="longest wait, s")


def _add_soak_parser(commands: Any) -> None:
    soak = commands.add_parser("soak", help="many images into one batch; nothing may degrade")
    _add_stack_options(soak)
    soak.add_argument("--count", type=int, default=100_000)
    soak.add_argument("--warmup", type=int, default=1000, help="images before the idle readings")
    soak.add_argument("--concurrency", type=int, default=4)
    soak.add_argument("--batch-size", type=int, default=50, help="images per bulk request")
    soak.add_argument("--samples", type=int, default=200, help="GETs per idle p99")


def _add_chaos_parser(commands: Any) -> None:
    full = ChaosConfig()
    chaos = commands.add_parser(
        "chaos", help="uploads under a seeded schedule of crashes and outages; nothing may be lost"
    )
    chaos.add_argument("--uploads", type=int, default=full.uploads, help="images to upload")
    chaos.add_argument("--faults", type=int, default=full.faults, help="faults to inject")
    chaos.add_argument("--seed", type=int, default=DEFAULT_CHAOS_SEED, help="of the schedule")
    chaos.add_argument("--owners", type=int, default=full.owners)
    chaos.add_argument("--min-gap", type=float, default=full.gap_s[0], help="s between faults")
    chaos.add_argument("--max-gap", type=float, default=full.gap_s[1], help="s between faults")
    chaos.add_argument(
        "--settle-timeout", type=float, default=full.settle_timeout_s, help="longest settle, s"
    )


def _add_sweep_parser(commands: Any) -> None:
    sweep = commands.add_parser("sweep", help="a grid of engine or end-to-end settings")
    sweep.add_argument("--mode", choices=["engine", "e2e"], default="engine")
    _add_node_options(sweep, many=True)
    sweep.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    sweep.add_argument("--concurrency", type=int, nargs="+", default=[4], help="e2e clients")
    _add_stack_options(sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_ROOT)
    commands = parser.add_subparsers(dest="command", required=True)

    corpus = commands.add_parser("corpus", help="generate the deterministic image corpus")
    corpus.add_argument("--out", type=Path, required=True)
    corpus.add_argument("--count", type=int, default=5, help="images per class")
    corpus.add_argument("--seed", type=int, default=DEFAULT_SEED)
    corpus.add_argument("--classes", nargs="*", default=[], choices=list(IMAGE_CLASSES))

    kernel = commands.add_parser("kernel", help="engine kernel against reference pipelines")
    kernel.add_argument("--corpus", type=Path, required=True)
    kernel.add_argument("--repeat", type=int, default=5)
    kernel.add_argument("--processes", type=int, nargs="+", default=[1])
    kernel.add_argument("--formats", type=_csv, default=["png"])
    kernel.add_argument(
        "--renditions",
        default="",
        help="also measure this rendition set (RENDITIONS syntax) from one decode, against "
        "libvips, and each rendition alone",
    )
    _add_kernel_options(kernel)

    report = commands.add_parser("report", help="plots from results files")
    report.add_argument("--results", type=Path, nargs="+", required=True)
    report.add_argument("--out", type=Path, required=True)

    _add_engine_parser(commands)
    _add_e2e_parser(commands)
    _add_fairness_parser(commands)
    _add_soak_parser(commands)
    _add_chaos_parser(commands)
    _add_sweep_parser(commands)

    for name in ("quick", "full"):
        _add_kernel_options(commands.add_parser(name, help=f"the {name} benchmark profile"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "corpus":
        make_corpus(args.out, args.count, args.seed, args.classes)
    elif args.command == "kernel":
        run_kernel(_kernel_config(args, args.corpus), args.results_dir, "kernel", plots=False)
    elif args.command == "report":
        for path in generate_report(args.results, args.out):
            print(path)
    elif args.command in ("engine", "e2e", "fairness", "soak", "chaos", "sweep"):
        commands = {
            "chaos": command_chaos,
            "engine": command_engine,
            "e2e": command_e2e,
            "fairness": command_fairness,
            "soak": command_soak,
            "sweep": command_sweep,
        }
        commands[args.command](args)
    elif args.command == "quick":
        command_quick(args)
    else:
        command_full(args)


if __name__ == "__main__":
    main(sys.argv[1:])
