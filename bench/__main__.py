"""Command line of the benchmarks: `python -m bench {corpus,kernel,report,quick,full}`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.corpus import IMAGE_CLASSES, MANIFEST_NAME, bpp_by_class, is_photo_like, write_corpus
from bench.kernel_bench import IMPLEMENTATIONS, REPO_ROOT, KernelBenchConfig, run_kernel_benchmark
from bench.report import generate_report, kernel_summary_markdown
from bench.results import build_document, new_run_dir, write_results

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
    markdown = kernel_summary_markdown(document)
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
    """One image per class, 3 repeats, 1 and all processes, PNG only: under 2 minutes on 2 cores."""
    cores = os.cpu_count() or 1
    defaults = {
        "repeat": 3,
        "processes": sorted({1, cores}),
        "formats": ["png"],
        "min_batch_images": 1,
    }
    _profile(args, count=1, defaults=defaults)


def command_full(args: argparse.Namespace) -> None:
    """Larger corpus, more repeats, processes 1..cores, PNG and JPEG output."""
    cores = os.cpu_count() or 1
    defaults = {
        "repeat": 5,
        "processes": list(range(1, cores + 1)),
        "formats": ["png", "jpeg"],
        "min_batch_images": 8,
    }
    _profile(args, count=8, defaults=defaults)


def _add_kernel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--implementations", type=_csv, default=list(IMPLEMENTATIONS))
    parser.add_argument("--classes", nargs="*", default=[], choices=list(IMAGE_CLASSES))
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--max-pixels", type=int, default=100_000_000)
    parser.add_argument(
        "--min-batch-images", type=int, default=8, help="cycle a class's files to this many"
    )


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
    _add_kernel_options(kernel)

    report = commands.add_parser("report", help="plots from results files")
    report.add_argument("--results", type=Path, nargs="+", required=True)
    report.add_argument("--out", type=Path, required=True)

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
    elif args.command == "quick":
        command_quick(args)
    else:
        command_full(args)


if __name__ == "__main__":
    main(sys.argv[1:])
