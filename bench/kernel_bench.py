"""Kernel benchmark: the engine's render_grayscale against reference pipelines on the same files.

With `renditions` (RENDITIONS syntax) the same run also measures, side by side, the engine making
every rendition from one decode (format "renditions") against libvips making them from one load,
and each rendition alone (format "rendition:NAME", the engine only) for its cost on its own.

Each implementation runs in fresh child processes (bench.kernel_child, or the Go binary) limited
to one thread each; "P processes" runs P such children at once, each over the whole class. The
order of implementations rotates every repeat (ABAB, not AAABBB) so machine noise hits all alike.
Throughput counts only images that rendered successfully, divided by the batch's wall time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.corpus import CorpusEntry, read_manifest
from bench.kernel_child import SINGLE_THREAD_ENV
from bench.progress import ProgressBar
from bench.stats import median, ratio
from common.renditions import parse_renditions

IMPLEMENTATIONS = ("pixelmill", "vips", "pillow", "opencv-naive", "go")
# Who can make a whole rendition set, and who each rendition alone.
RENDITION_SET_IMPLEMENTATIONS = ("pixelmill", "vips")
RENDITIONS_FORMAT = "renditions"
ONE_RENDITION_PREFIX = "rendition:"
SUBJECT = "pixelmill"
SIZE_BASELINE = "vips"
ALL_CLASSES = "all"
REPO_ROOT = Path(__file__).resolve().parents[1]
GO_MODULE = Path(__file__).resolve().parent / "go"
GO_SOURCE = GO_MODULE / "main.go"
# Module mode: go.mod and go.sum pin disintegration/imaging, fetched once from the module proxy.
GO_BUILD_ENV = {"GO111MODULE": "on", "GOFLAGS": "-mod=readonly"}


@dataclass(frozen=True)
class KernelBenchConfig:
    """What to measure: which files, implementations, process counts, formats and repeats."""

    corpus_dir: Path
    cache_dir: Path
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    classes: tuple[str, ...] = ()
    repeat: int = 3
    processes: tuple[int, ...] = (1,)
    formats: tuple[str, ...] = ("png",)
    target_width: int = 800
    max_pixels: int = 100_000_000
    # Short classes are cycled until each batch holds this many images, so that one batch's
    # wall time is long enough to measure even in a tiny corpus.
    min_batch_images: int = 8
    # RENDITIONS syntax; empty: no rendition runs.
    renditions: str = ""

    def all_formats(self) -> tuple[str, ...]:
        """The formats, then the rendition set and each of its renditions alone."""
        if not self.renditions:
            return self.formats
        names = [r.name for r in parse_renditions(self.renditions)]
        return (
            *self.formats,
            RENDITIONS_FORMAT,
            *(f"{ONE_RENDITION_PREFIX}{name}" for name in names),
        )

    def runs_format(self, implementation: str, fmt: str) -> bool:
        if fmt == RENDITIONS_FORMAT:
            return implementation in RENDITION_SET_IMPLEMENTATIONS
        if fmt.startswith(ONE_RENDITION_PREFIX):
            return implementation == SUBJECT
        return True

    def settings(self) -> dict[str, Any]:
        """The settings as plain JSON values, for the results file."""
        return {
            "corpus_dir": str(self.corpus_dir),
            "implementations": list(self.implementations),
            "classes": list(self.classes),
            "repeat": self.repeat,
            "processes": list(self.processes),
            "formats": list(self.formats),
            "target_width": self.target_width,
            "max_pixels": self.max_pixels,
            "min_batch_images": self.min_batch_images,
            "renditions": self.renditions,
            "threads_per_process": 1,
        }


@dataclass
class Launchers:
    """How to start each runnable implementation, and why the others were skipped."""

    commands: dict[str, Callable[[str], list[str]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def build_go_reference(cache_dir: Path, environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """Build the bench/go module into cache_dir; return (binary, "") or (None, why)."""
    if shutil.which("go", path=environ.get("PATH")) is None:
        return None, "go is not installed (apt-get install golang-go)"
    binary = cache_dir / "go" / "gokernel"
    if binary.exists() and binary.stat().st_mtime >= GO_SOURCE.stat().st_mtime:
        return binary, ""
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = {**environ, **GO_BUILD_ENV, "GOCACHE": str(cache_dir / "go" / "build-cache")}
    completed = subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=GO_MODULE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        return None, f"go build failed: {completed.stderr.strip()[-500:]}"
    return binary, ""


def _python_module_missing(name: str) -> str:
    modules = {"pixelmill": "engine.kernel", "vips": "pyvips", "pillow": "PIL"}
    module = modules.get(name)
    if module is None:
        return ""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return "" if found else f"module {module} is not importable"


def prepare_launchers(config: KernelBenchConfig, environ: Mapping[str, str]) -> Launchers:
    """Resolve each requested implementation to a command line, or a reason it is skipped."""
    launchers = Launchers()
    for name in config.implementations:
        if name == "go":
            binary, reason = build_go_reference(config.cache_dir, environ)
            if binary is None:
                launchers.skipped[name] = reason
                continue
            launchers.commands[name] = _go_command(binary, config.target_width)
        elif name in IMPLEMENTATIONS:
            reason = _python_module_missing(name)
            if reason:
                launchers.skipped[name] = reason
                continue
            launchers.commands[name] = _python_command(name, config)
        else:
            launchers.skipped[name] = "unknown implementation"
    return launchers


def _go_command(binary: Path, width: int) -> Callable[[str], list[str]]:
    return lambda fmt: [str(binary), f"-width={width}", f"-format={fmt}"]


def _python_command(name: str, config: KernelBenchConfig) -> Callable[[str], list[str]]:
    base = [sys.executable, "-m", "bench.kernel_child", "--impl", name]
    limits = ["--width", str(config.target_width), "--max-pixels", str(config.max_pixels)]
    by_name = {r.name: r.spelled() for r in parse_renditions(config.renditions or "x:1:gray:png")}

    def command(fmt: str) -> list[str]:
        if fmt == RENDITIONS_FORMAT:
            return [*base, *limits, "--renditions", config.renditions]
        if fmt.startswith(ONE_RENDITION_PREFIX):
            spelled = by_name[fmt.removeprefix(ONE_RENDITION_PREFIX)]
            return [*base, *limits, "--renditions", spelled]
        return [*base, *limits, "--format", fmt]

    return command


class ChildWorker:
    """One child process speaking the kernel_child batch protocol."""

    def __init__(self, command: list[str], env: Mapping[str, str], stderr: IO[bytes]) -> None:
        self._stderr = stderr
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=dict(env),
            cwd=REPO_ROOT,
            text=True,
        )

    def send_batch(self, paths: Sequence[str]) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write("".join(f"{path}\n" for path in paths) + "\n")
        self._process.stdin.flush()

    def send_go(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write("go\n")
        self._process.stdin.flush()

    def read_line(self, expect_json: bool) -> str:
        """The next protocol line (skipping stray library output); raises if the child died."""
        assert self._process.stdout is not None
        while line := self._process.stdout.readline():
            stripped = line.strip()
            if (expect_json and stripped.startswith("{")) or stripped == "ready":
                return stripped
        self._stderr.seek(0)
        detail = self._stderr.read().decode(errors="replace").strip()[-800:]
        raise RuntimeError(f"benchmark child {self._process.args!r} exited: {detail}")

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def run_parallel_batch(workers: list[ChildWorker], paths: list[str]) -> list[dict[str, Any]]:
    """Give every worker the same files (rotated), start them together, collect their results."""
    for index, worker in enumerate(workers):
        offset = index % max(len(paths), 1)
        worker.send_batch(paths[offset:] + paths[:offset])
    for worker in workers:
        worker.read_line(expect_json=False)
    for worker in workers:
        worker.send_go()
    return [json.loads(worker.read_line(expect_json=True)) for worker in workers]


def throughput(
    images: list[dict[str, Any]], wall_s: float, megapixels_by_file: Mapping[str, float]
) -> dict[str, float]:
    """Images/s and source megapixels/s counting only images that rendered successfully."""
    ok = [image for image in images if image["ok"]]
    megapixels = sum(megapixels_by_file.get(image["file"], 0.0) for image in ok)
    if wall_s <= 0:
        return {"images_per_s": 0.0, "megapixels_per_s": 0.0}
    return {"images_per_s": len(ok) / wall_s, "megapixels_per_s": megapixels / wall_s}


def summarise_batch(
    batches: list[dict[str, Any]], megapixels_by_file: Mapping[str, float]
) -> dict[str, Any]:
    """One run record from the batch results of P parallel children."""
    images = [image for batch in batches for image in batch["images"]]
    ok = [image for image in images if image["ok"]]
    wall_s = max(batch["wall_s"] for batch in batches)
    errors = sorted({image["error"] for image in images if not image["ok"]})
    return {
        "wall_s": wall_s,
        "images_ok": len(ok),
        "images_failed": len(images) - len(ok),
        **throughput(images, wall_s, megapixels_by_file),
        "cpu_s_per_image": [image["cpu_s"] for image in ok],
        "out_bytes_per_image": [image["out_bytes"] for image in ok],
        "errors": errors[:5],
    }


def cycled(paths: list[str], minimum: int) -> list[str]:
    """paths repeated whole until there are at least `minimum` of them."""
    if not paths:
        return []
    rounds = -(-minimum // len(paths))
    return paths * max(rounds, 1)


def _paths_by_class(config: KernelBenchConfig, entries: list[CorpusEntry]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for entry in entries:
        if not config.classes or entry.image_class in config.classes:
            grouped.setdefault(entry.image_class, []).append(str(config.corpus_dir / entry.file))
    return {name: cycled(paths, config.min_batch_images) for name, paths in grouped.items()}


def run_session(
    command: list[str],
    processes: int,
    paths_by_class: Mapping[str, list[str]],
    megapixels_by_file: Mapping[str, float],
    env: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """Start P fresh children of one implementation and run every class through them."""
    with contextlib.ExitStack() as stack:
        workers = []
        for _ in range(processes):
            worker = ChildWorker(command, env, stack.enter_context(tempfile.TemporaryFile()))
            stack.callback(worker.close)
            workers.append(worker)
        return {
            name: summarise_batch(run_parallel_batch(workers, paths), megapixels_by_file)
            for name, paths in paths_by_class.items()
        }


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """items rotated left by `shift`, so each repeat starts with a different implementation."""
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def run_kernel_benchmark(config: KernelBenchConfig, environ: Mapping[str, str]) -> dict[str, Any]:
    """Run every implementation over the corpus; return runs, summary and skipped reasons."""
    entries = read_manifest(config.corpus_dir)
    paths_by_class = _paths_by_class(config, entries)
    megapixels_by_file = {str(config.corpus_dir / e.file): e.megapixels for e in entries}
    launchers = prepare_launchers(config, environ)
    env = {**environ, **SINGLE_THREAD_ENV}
    names = [name for name in config.implementations if name in launchers.commands]
    formats = config.all_formats()
    sessions = sum(1 for f in formats for n in names if config.runs_format(n, f))
    progress = ProgressBar(sessions * len(config.processes) * config.repeat, "kernel")
    runs = []
    for fmt in formats:
        measured = [name for name in names if config.runs_format(name, fmt)]
        for processes in config.processes:
            for repeat in range(config.repeat):
                for name in rotated(measured, repeat):
                    command = launchers.commands[name](fmt)
                    by_class = run_session(
                        command, processes, paths_by_class, megapixels_by_file, env
                    )
                    for image_class, record in by_class.items():
                        key = {"implementation": name, "format": fmt, "processes": processes}
                        runs.append({**key, "repeat": repeat, "image_class": image_class, **record})
                    progress.advance(note=f"{fmt} P={processes} {name}")
    summary = summarise_runs(runs)
    return {
        "kind": "kernel",
        "settings": config.settings(),
        "implementations": names,
        "skipped": launchers.skipped,
        "runs": runs,
        "summary": summary,
        "comparisons": compare_to_references(summary),
        "rendition_costs": rendition_costs(summary, config.formats[0]) if config.renditions else [],
    }


def _group(
    runs: list[dict[str, Any]], keys: tuple[str, ...]
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(tuple(run[k] for k in keys), []).append(run)
    return grouped


def _all_classes_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per repeat, the whole corpus as one workload: ok images and megapixels over summed wall."""
    combined = []
    keys = ("implementation", "format", "processes", "repeat")
    for key, group in _group(runs, keys).items():
        wall_s = sum(run["wall_s"] for run in group)
        megapixels = sum(run["megapixels_per_s"] * run["wall_s"] for run in group)
        combined.append(
            {
                **dict(zip(keys, key, strict=True)),
                "image_class": ALL_CLASSES,
                "wall_s": wall_s,
                "images_ok": sum(run["images_ok"] for run in group),
                "images_failed": sum(run["images_failed"] for run in group),
                "images_per_s": sum(run["images_ok"] for run in group) / wall_s,
                "megapixels_per_s": megapixels / wall_s,
                "cpu_s_per_image": [c for run in group for c in run["cpu_s_per_image"]],
                "out_bytes_per_image": [b for run in group for b in run["out_bytes_per_image"]],
            }
        )
    return combined


def summarise_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repeats per (implementation, class, format, processes), plus an "all" class."""
    keys = ("implementation", "image_class", "format", "processes")
    summary = []
    for key, group in _group(runs + _all_classes_runs(runs), keys).items():
        cpu = [c for run in group for c in run["cpu_s_per_image"]]
        out_bytes = [b for run in group for b in run["out_bytes_per_image"]]
        summary.append(
            {
                **dict(zip(keys, key, strict=True)),
                "repeats": len(group),
                "images_per_s": median(run["images_per_s"] for run in group),
                "megapixels_per_s": median(run["megapixels_per_s"] for run in group),
                "cpu_ms_per_image": median(cpu) * 1000 if cpu else None,
                "out_bytes_per_image": median(out_bytes) if out_bytes else None,
                "images_failed": sum(run["images_failed"] for run in group),
            }
        )
    return summary


def compare_to_references(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per class/format/processes: pixelmill's speed over each reference, and its output size
    relative to vips (pixelmill bytes / vips bytes)."""
    rows = []
    keys = ("image_class", "format", "processes")
    for key, group in _group(summary, keys).items():
        by_impl = {row["implementation"]: row for row in group}
        subject = by_impl.get(SUBJECT)
        if subject is None:
            continue
        speedup = {
            name: ratio(subject["images_per_s"], row["images_per_s"])
            for name, row in by_impl.items()
            if name != SUBJECT
        }
        baseline = by_impl.get(SIZE_BASELINE, {}).get("out_bytes_per_image")
        subject_bytes = subject["out_bytes_per_image"]
        size_ratio = ratio(subject_bytes, baseline) if subject_bytes and baseline else None
        rows.append(
            {**dict(zip(keys, key, strict=True)), "speedup": speedup, "size_vs_vips": size_ratio}
        )
    return rows


def rendition_costs(summary: list[dict[str, Any]], single: str) -> list[dict[str, Any]]:
    """Per class and process count: the engine's CPU per image for the whole rendition set, and
    for each rendition alone, over its CPU for the single `single`-format render (the default
    rendition); and its speed over libvips making the same set."""
    rows = []
    for (image_class, processes), group in _group(summary, ("image_class", "processes")).items():
        cpu = {
            (row["implementation"], row["format"]): row["cpu_ms_per_image"]
            for row in group
            if row["cpu_ms_per_image"]
        }
        speed = {(row["implementation"], row["format"]): row["images_per_s"] for row in group}
        base = cpu.get((SUBJECT, single))
        whole = cpu.get((SUBJECT, RENDITIONS_FORMAT))
        if base is None or whole is None:
            continue
        alone = {
            fmt.removeprefix(ONE_RENDITION_PREFIX): ms
            for (name, fmt), ms in cpu.items()
            if name == SUBJECT and fmt.startswith(ONE_RENDITION_PREFIX)
        }
        vips = speed.get(("vips", RENDITIONS_FORMAT))
        rows.append(
            {
                "image_class": image_class,
                "processes": processes,
                "single_cpu_ms": base,
                "set_cpu_ms": whole,
                "set_over_single": ratio(whole, base),
                "alone_cpu_ms": alone,
                "speedup_over_vips": ratio(speed[(SUBJECT, RENDITIONS_FORMAT)], vips)
                if vips
                else None,
            }
        )
    return rows


def rendition_costs_markdown(rows: list[dict[str, Any]]) -> str:
    """The rendition runs' table: the set's CPU over the single render's, each alone, vips."""
    if not rows:
        return ""
    lines = [
        "",
        "## Renditions from one decode (CPU ms per image, P = processes)",
        "",
        "| class | P | single | set | set / single | each alone | set speed / vips |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        alone = ", ".join(f"{name} {ms:.1f}" for name, ms in row["alone_cpu_ms"].items())
        over_vips = row["speedup_over_vips"]
        lines.append(
            f"| {row['image_class']} | {row['processes']} | {row['single_cpu_ms']:.1f} "
            f"| {row['set_cpu_ms']:.1f} | {row['set_over_single']:.2f}x | {alone} "
            f"| {'-' if over_vips is None else f'{over_vips:.2f}x'} |"
        )
    return "\n".join(lines) + "\n"
