"""Tests of the benchmark harness: corpus determinism, statistics, failure accounting, results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench.corpus import (
    IMAGE_CLASSES,
    CorpusEntry,
    encode_image,
    generate_image_bytes,
    is_photo_like,
    read_manifest,
    write_corpus,
    write_manifest,
)
from bench.kernel_bench import (
    KernelBenchConfig,
    cycled,
    rendition_costs_markdown,
    rotated,
    run_kernel_benchmark,
    throughput,
)
from bench.report import generate_report, kernel_summary_markdown
from bench.results import REQUIRED_KEYS, build_document, markdown_table, write_results
from bench.stats import median, percentile, percentiles

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_CLASSES = ["jpeg-small", "png-alpha"]


def test_same_seed_gives_byte_identical_corpus_across_processes(tmp_path: Path) -> None:
    here = write_corpus(tmp_path / "here", count=2, seed=7, class_names=SMALL_CLASSES)
    command = [sys.executable, "-m", "bench", "corpus", "--out", str(tmp_path / "there")]
    command += ["--count", "2", "--seed", "7", "--classes", *SMALL_CLASSES]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True)
    there = read_manifest(tmp_path / "there")
    assert [e.sha256 for e in here] == [e.sha256 for e in there]
    for entry in here:
        assert (tmp_path / "here" / entry.file).read_bytes() == (
            tmp_path / "there" / entry.file
        ).read_bytes()


def test_different_seed_or_index_gives_different_bytes() -> None:
    spec = IMAGE_CLASSES["jpeg-small"]
    first = generate_image_bytes(spec, seed=1, index=0)
    assert first != generate_image_bytes(spec, seed=2, index=0)
    assert first != generate_image_bytes(spec, seed=1, index=1)


def test_manifest_records_size_digest_and_dimensions(tmp_path: Path) -> None:
    entries = write_corpus(tmp_path, count=1, seed=3, class_names=["png-alpha"])
    (entry,) = read_manifest(tmp_path)
    assert entry == entries[0]
    decoded = cv2.imread(str(tmp_path / entry.file), cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    assert decoded.shape == (768, 1024, 4)
    assert entry.bytes == (tmp_path / entry.file).stat().st_size


@pytest.mark.parametrize("class_name", ["jpeg-small", "jpeg-progressive"])
def test_generated_jpeg_size_is_in_the_range_of_real_photos(class_name: str) -> None:
    spec = IMAGE_CLASSES[class_name]
    payload = generate_image_bytes(spec, seed=11, index=0)
    bpp = len(payload) * 8 / (spec.width * spec.height)
    assert is_photo_like(bpp), f"{class_name}: {bpp:.2f} bits/pixel"


def test_the_cmyk_rotated_and_progressive_classes_are_what_they_say() -> None:
    from common.imageinfo import probe
    from engine.colour import source_colour

    made = {
        name: generate_image_bytes(replace(IMAGE_CLASSES[name], width=320, height=240), 5, 0)
        for name in ("jpeg-cmyk-12mp", "jpeg-exif-rotated-12mp", "jpeg-progressive-12mp")
    }
    headers = {name: probe(data) for name, data in made.items()}
    cmyk = headers["jpeg-cmyk-12mp"]
    assert cmyk is not None and cmyk.channels == 4
    colour = source_colour(memoryview(made["jpeg-cmyk-12mp"]), cmyk)
    assert colour.cmyk and colour.adobe_inverted and colour.profile is None
    rotated = headers["jpeg-exif-rotated-12mp"]
    assert rotated is not None and rotated.orientation == 6 and rotated.display_size == (240, 320)
    assert b"\xff\xc2" in made["jpeg-progressive-12mp"]
    for name, data in made.items():
        assert is_photo_like(len(data) * 8 / (320 * 240)), name


def test_flat_colour_and_pure_noise_are_not_photo_like() -> None:
    spec = IMAGE_CLASSES["jpeg-small"]
    flat = np.full((spec.height, spec.width, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, size=flat.shape, dtype=np.uint8)
    for image in (flat, noise):
        bpp = len(encode_image(image, spec)) * 8 / (spec.width * spec.height)
        assert not is_photo_like(bpp)


def test_median_of_odd_and_even_counts() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([5.0]) == 5.0


def test_percentiles_match_hand_computed_linear_interpolation() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10
    # rank = p/100 * (n - 1): p95 -> 8.55 -> 9 + 0.55 * (10 - 9)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 10.0
    assert percentiles([10.0, 20.0, 30.0, 40.0]) == pytest.approx(
        {"p50": 25.0, "p95": 38.5, "p99": 39.7}
    )
    sample = np.random.default_rng(5).exponential(size=101)
    for p in (50, 95, 99):
        assert percentile(sample.tolist(), p) == pytest.approx(np.percentile(sample, p))


def test_statistics_refuse_empty_input_and_bad_percent() -> None:
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_throughput_counts_only_successful_images() -> None:
    images = [
        {"file": "a", "ok": True},
        {"file": "b", "ok": False},
        {"file": "c", "ok": True},
    ]
    rates = throughput(images, wall_s=2.0, megapixels_by_file={"a": 12.0, "b": 12.0, "c": 2.0})
    assert rates == {"images_per_s": 1.0, "megapixels_per_s": 7.0}


def test_implementations_rotate_between_repeats_and_short_classes_are_cycled() -> None:
    names = ["pixelmill", "vips", "go"]
    assert [rotated(names, r)[0] for r in range(4)] == ["pixelmill", "vips", "go", "pixelmill"]
    assert cycled(["a", "b", "c"], 5) == ["a", "b", "c", "a", "b", "c"]
    assert cycled(["a", "b"], 1) == ["a", "b"]


def _corpus_with_corrupt_file(corpus_dir: Path) -> None:
    entries = write_corpus(corpus_dir, count=1, seed=5, class_names=["jpeg-small"])
    corrupt = corpus_dir / "jpeg-small" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    entries.append(CorpusEntry("jpeg-small", "jpeg-small/corrupt.jpg", 640, 480, 32, "0" * 64))
    write_manifest(corpus_dir, entries, seed=5)


def _implementations_under_test() -> tuple[str, ...]:
    names = ("pixelmill", "vips", "pillow", "opencv-naive")
    return (*names, "go") if shutil.which("go") else names


@pytest.fixture(scope="module")
def corrupt_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    _corpus_with_corrupt_file(root / "corpus")
    config = KernelBenchConfig(
        corpus_dir=root / "corpus",
        cache_dir=root / "cache",
        implementations=_implementations_under_test(),
        repeat=1,
        processes=(1,),
        min_batch_images=1,
    )
    return run_kernel_benchmark(config, os.environ)


def test_every_implementation_ran(corrupt_run: dict) -> None:
    assert corrupt_run["skipped"] == {}
    assert corrupt_run["implementations"] == list(_implementations_under_test())


def test_corrupt_image_is_a_failure_and_not_throughput(corrupt_run: dict) -> None:
    runs = [run for run in corrupt_run["runs"] if run["image_class"] == "jpeg-small"]
    assert len(runs) == len(_implementations_under_test())
    for run in runs:
        assert (run["images_ok"], run["images_failed"]) == (1, 1), run["implementation"]
        assert run["images_per_s"] == pytest.approx(1 / run["wall_s"])
        assert run["megapixels_per_s"] == pytest.approx(640 * 480 / 1e6 / run["wall_s"])
        assert run["errors"], run["implementation"]
        assert len(run["cpu_s_per_image"]) == 1


def test_comparisons_relate_pixelmill_to_each_reference(corrupt_run: dict) -> None:
    (row,) = [r for r in corrupt_run["comparisons"] if r["image_class"] == "jpeg-small"]
    assert set(row["speedup"]) == set(_implementations_under_test()) - {"pixelmill"}
    summary = {r["implementation"]: r for r in corrupt_run["summary"]}
    expected = summary["pixelmill"]["out_bytes_per_image"] / summary["vips"]["out_bytes_per_image"]
    assert row["size_vs_vips"] == pytest.approx(expected)


def test_results_document_has_provenance_and_renders(corrupt_run: dict, tmp_path: Path) -> None:
    payload = dict(corrupt_run)
    settings = payload.pop("settings")
    document = build_document("kernel", settings, payload, REPO_ROOT)
    markdown = kernel_summary_markdown(document)
    path = write_results(tmp_path, document, markdown)
    saved = json.loads(path.read_text())
    assert set(REQUIRED_KEYS) <= set(saved)
    assert {"cpu_model", "cores", "memory_gib"} <= set(saved["machine"])
    assert {"opencv", "numpy", "pyvips", "libvips", "pillow", "go"} <= set(saved["packages"])
    assert saved["git_commit"]
    assert "| png | 1 | jpeg-small | pixelmill |" in (tmp_path / "summary.md").read_text()
    plots = generate_report([path], tmp_path / "plots")
    assert plots and all(p.read_bytes().startswith(b"\x89PNG") for p in plots)


def test_results_document_without_provenance_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="git_commit"):
        write_results(tmp_path, {"command": "x", "timestamp": "t"}, "")


def test_e2e_result_shape_gets_latency_and_stage_plots(tmp_path: Path) -> None:
    e2e = {
        "latency_ms": {
            "upload": {"p50": 12.0, "p95": 30.0, "p99": 55.0},
            "completed": {"p50": 80.0, "p95": 150.0, "p99": 260.0},
        },
        "stages_ms": {"queue": 5.0, "download": 8.0, "kernel": 40.0, "upload": 9.0},
    }
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(e2e))
    plots = generate_report([path], tmp_path / "plots")
    assert sorted(p.name for p in plots) == ["e2e-latency.png", "e2e-stages.png"]


def test_markdown_table_formats_missing_values_and_floats() -> None:
    table = markdown_table(["a", "b"], [[1.23456, None], [12345.6, "x"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | - |", "| 12346 | x |"]


def test_config_settings_are_plain_json(tmp_path: Path) -> None:
    config = replace(KernelBenchConfig(corpus_dir=tmp_path, cache_dir=tmp_path), repeat=2)
    assert json.loads(json.dumps(config.settings()))["repeat"] == 2


def test_a_rendition_run_measures_the_set_against_vips_and_each_rendition_alone(
    tmp_path: Path,
) -> None:
    write_corpus(tmp_path / "corpus", count=1, seed=5, class_names=["jpeg-small"])
    config = KernelBenchConfig(
        corpus_dir=tmp_path / "corpus",
        cache_dir=tmp_path / "cache",
        implementations=("pixelmill", "vips", "pillow"),
        repeat=1,
        min_batch_images=1,
        renditions="big:400:gray:png, small:100:color:webp:80",
    )

    result = run_kernel_benchmark(config, os.environ)

    ran = {(r["implementation"], r["format"]) for r in result["runs"]}
    assert ran == {
        ("pixelmill", "png"),
        ("vips", "png"),
        ("pillow", "png"),
        ("pixelmill", "renditions"),
        ("vips", "renditions"),
        ("pixelmill", "rendition:big"),
        ("pixelmill", "rendition:small"),
    }
    assert not any(r["images_failed"] for r in result["runs"])
    (costs,) = [c for c in result["rendition_costs"] if c["image_class"] == "jpeg-small"]
    assert set(costs["alone_cpu_ms"]) == {"big", "small"}
    assert costs["set_over_single"] == pytest.approx(costs["set_cpu_ms"] / costs["single_cpu_ms"])
    assert costs["speedup_over_vips"] is not None
    assert "| jpeg-small | 1 |" in rendition_costs_markdown(result["rendition_costs"])
