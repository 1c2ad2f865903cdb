"""One benchmark worker process: runs a single implementation over batches of files.

The parent starts one of these per implementation (a fresh process, so thread settings and
library state never leak between implementations) and talks to it over stdin/stdout:

    parent -> child : file paths, one per line, then an empty line   (one batch)
    child  -> parent: "ready"        (files read into memory; one warm-up render per new suffix)
    parent -> child : "go"
    child  -> parent: one JSON line  {"wall_s", "cpu_s", "images": [{file, ok, error, ...}]}

and so on until stdin closes. The Go reference (bench/go/main.go) speaks the same protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

Renderer = Callable[[bytes], bytes]

# Set before any numeric or imaging library is imported, so each process uses one thread.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VIPS_CONCURRENCY": "1",
    "GOMAXPROCS": "1",
}


def pixelmill_renderer(target_width: int, output_format: str, max_pixels: int) -> Renderer:
    """The engine's kernel as a deployment without RENDITIONS runs it: its one default
    rendition through engine.renditions.render_renditions (the gray fast path)."""
    import cv2

    from common.renditions import default_renditions
    from engine.renditions import render_renditions

    cv2.setNumThreads(1)
    only = default_renditions(target_width, output_format)

    def render(data: bytes) -> bytes:
        return render_renditions(data, only, max_pixels=max_pixels).images[0].data

    return render


def pixelmill_renditions_renderer(spec: str, max_pixels: int) -> Renderer:
    """The engine's rendition fan-out, engine.renditions.render_renditions: every rendition of
    `spec` (RENDITIONS syntax) from one decode; the output is all of them, concatenated."""
    import cv2

    from common.renditions import parse_renditions
    from engine.renditions import render_renditions

    cv2.setNumThreads(1)
    renditions = parse_renditions(spec)

    def render(data: bytes) -> bytes:
        rendered = render_renditions(data, renditions, max_pixels=max_pixels)
        return b"".join(image.data for image in rendered.images)

    return render


def load_renderer(
    name: str, target_width: int, output_format: str, max_pixels: int, renditions: str = ""
) -> Renderer:
    """The render function of implementation `name` (a reference or "pixelmill"); with
    `renditions`, the one making every rendition it names."""
    if renditions:
        if name == "pixelmill":
            return pixelmill_renditions_renderer(renditions, max_pixels)
        from bench.references import RENDITION_RENDERERS

        return RENDITION_RENDERERS[name](renditions)
    if name == "pixelmill":
        return pixelmill_renderer(target_width, output_format, max_pixels)
    from bench.references import REFERENCE_RENDERERS

    return REFERENCE_RENDERERS[name](target_width, output_format)


def render_one(render: Renderer, path: str, data: bytes | None) -> dict[str, Any]:
    """Render one image and time it; a failure is recorded, never raised."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    try:
        if data is None:
            raise OSError("file could not be read")
        output = render(data)
        result: dict[str, Any] = {"ok": True, "error": None, "out_bytes": len(output)}
    except Exception as exc:  # a failed image is a result to report, not a crash
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "out_bytes": 0}
    result["wall_s"] = time.perf_counter() - wall_start
    result["cpu_s"] = time.process_time() - cpu_start
    result["file"] = path
    return result


def read_batch(stream: TextIO) -> list[str] | None:
    """Paths up to the next empty line; None when the parent has closed stdin."""
    paths: list[str] = []
    for line in stream:
        if not line.strip():
            return paths
        paths.append(line.strip())
    return paths or None


def load_files(paths: list[str]) -> list[bytes | None]:
    """File contents (None for unreadable files), read before timing starts."""
    contents: list[bytes | None] = []
    for path in paths:
        try:
            contents.append(Path(path).read_bytes())
        except OSError:
            contents.append(None)
    return contents


def warm_up(
    render: Renderer, paths: list[str], contents: list[bytes | None], seen: set[str]
) -> None:
    """Render one file of each file type not rendered before in this process (untimed), so
    lazy library initialisation is not charged to the measured batch."""
    for path, data in zip(paths, contents, strict=True):
        suffix = Path(path).suffix.lower()
        if suffix not in seen and render_one(render, path, data)["ok"]:
            seen.add(suffix)


def run_batch(
    render: Renderer, paths: list[str], warmed: set[str], stdin: TextIO, stdout: TextIO
) -> None:
    """Warm up, wait for "go", render every file and print the batch result."""
    contents = load_files(paths)
    warm_up(render, paths, contents, warmed)
    stdout.write("ready\n")
    stdout.flush()
    if stdin.readline().strip() != "go":
        raise SystemExit("kernel_child: expected 'go' from the parent")
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    images = [render_one(render, p, d) for p, d in zip(paths, contents, strict=True)]
    batch = {
        "wall_s": time.perf_counter() - wall_start,
        "cpu_s": time.process_time() - cpu_start,
        "images": images,
    }
    stdout.write(json.dumps(batch) + "\n")
    stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m bench.kernel_child --impl NAME [--format png] ...`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--format", default="png", choices=("png", "jpeg"))
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--max-pixels", type=int, default=100_000_000)
    parser.add_argument("--renditions", default="", help="RENDITIONS syntax; replaces --format")
    args = parser.parse_args(argv)
    os.environ.update(SINGLE_THREAD_ENV)
    render = load_renderer(args.impl, args.width, args.format, args.max_pixels, args.renditions)
    warmed: set[str] = set()
    while (paths := read_batch(sys.stdin)) is not None:
        run_batch(render, paths, warmed, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
