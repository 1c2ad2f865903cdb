"""Memory-bounded decoding: the budget read from the header, refused at upload and in the engine,
PNGs turned to gray without a second full-size copy, and a hard memory cap per CPU process."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import pytest
import yaml

from common.decode_budget import MIB, decode_bytes, jpeg_coefficient_bytes
from common.imageinfo import probe
from common.renditions import parse_renditions
from engine.cpu_pool import (
    OUT_OF_MEMORY_REASON,
    KernelOptions,
    RenderResult,
    RenderTask,
)
from engine.kernel import ImageRejected, decode_gray, read_header, render_grayscale
from tests.support import (
    ROOT,
    ApiClient,
    PoolUnderTest,
    StackProbe,
    jpeg,
    multipart,
    without_adobe_marker,
)

BUDGET = 384 * MIB
HOG_MARKER = b"PIXELMILL-TEST-HOG"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(
    width: int,
    height: int,
    colour_type: int,
    bit_depth: int,
    rows: Iterator[bytes],
    extra_chunks: bytes = b"",
) -> bytes:
    """A PNG built chunk by chunk, its image data compressed row by row (each row starting
    with its filter byte)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for row in rows) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra_chunks
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def hostile_png() -> bytes:
    """The file from the issue: 10000x10000 RGBA at 16 bits, zeroed, 0.78 MB."""
    row = bytes(1 + 10000 * 8)
    return png_file(10000, 10000, 6, 16, (row for _ in range(10000)))


def progressive_jpeg_100_mp() -> tuple[bytes, np.ndarray]:
    """A 10000x10000 4:2:0 progressive JPEG and its gray content at 800x800, for comparison."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (10000, 40))[:, :10000]
    image = cv2.merge([ramp, np.ascontiguousarray(ramp.T), ramp])
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 80]
    ok, encoded = cv2.imencode(".jpg", image, params)
    assert ok
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    del image
    return encoded.tobytes(), cv2.resize(gray, (800, 800), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def hostile() -> bytes:
    return hostile_png()


@pytest.fixture(scope="module")
def progressive() -> tuple[bytes, np.ndarray]:
    return progressive_jpeg_100_mp()


# --- the arithmetic, from headers --------------------------------------------------------------


def test_the_hostile_png_needs_its_whole_16_bit_rgba_decode_and_is_over_the_default_budget(
    hostile: bytes,
) -> None:
    header = probe(hostile)
    assert header is not None and len(hostile) < MIB
    assert (header.channels, header.sample_bytes) == (4, 2)
    assert decode_bytes(header) == 10000 * 10000 * 4 * 2
    assert decode_bytes(header) > BUDGET


def test_a_100_mp_progressive_jpeg_counts_its_coefficient_buffer_and_fits_the_default_budget(
    progressive: tuple[bytes, np.ndarray],
) -> None:
    header = probe(progressive[0])
    assert header is not None and header.whole_image_coefficients
    assert header.sampling == ((2, 2), (1, 1), (1, 1))
    # Luma 1250x1250 blocks, each chroma 625x625 (rounded to whole MCUs), 128 bytes a block.
    assert jpeg_coefficient_bytes(header) == (1250 * 1250 + 2 * 625 * 625) * 128
    assert decode_bytes(header) == 10000 * 10000 + jpeg_coefficient_bytes(header)
    assert decode_bytes(header) <= BUDGET


def test_a_baseline_jpeg_needs_only_its_output_and_a_transparent_palette_counts_as_rgba() -> None:
    baseline = probe(jpeg(640, 480))
    assert baseline is not None and not baseline.whole_image_coefficients
    assert decode_bytes(baseline) == 640 * 480

    def palette_png(extra: bytes) -> bytes:
        rows = iter([bytes(5), bytes(5)])
        return png_file(4, 2, 3, 8, rows, png_chunk(b"PLTE", bytes(3)) + extra)

    plain, transparent = probe(palette_png(b"")), probe(palette_png(png_chunk(b"tRNS", b"\0")))
    assert plain is not None and transparent is not None
    assert decode_bytes(plain) == 4 * 2 * 3
    assert decode_bytes(transparent) == 4 * 2 * 4


def test_a_jpeg_whose_first_scan_splits_the_components_keeps_every_coefficient() -> None:
    data = bytearray(jpeg(64, 48))
    sos = data.index(b"\xff\xda")
    data[sos + 4] = 1  # the first scan carries one of the three components
    header = probe(bytes(data))
    assert header is not None and header.whole_image_coefficients
    assert decode_bytes(header) == 64 * 48 + jpeg_coefficient_bytes(header)


def test_a_png_whose_data_hides_behind_endless_chunks_is_sized_with_alpha() -> None:
    filler = png_chunk(b"tEXt", b"k\0v") * 1001
    header = probe(png_file(4, 2, 2, 8, iter([bytes(13), bytes(13)]), filler))
    assert header is not None and header.channels == 4


# --- refused at upload ---------------------------------------------------------------------------


def test_uploading_the_hostile_png_is_422_naming_the_memory_and_stores_nothing(
    api: ApiClient, probe: StackProbe, user_id: str, hostile: bytes
) -> None:
    before = probe.originals()
    response = api.upload(hostile, "small.png")
    assert response.status_code == 422, response.text
    assert response.json["error"]["code"] == "unprocessable_image"
    assert "MB of memory" in response.json["error"]["message"]
    assert probe.rows_for(user_id) == []
    assert probe.originals() == before


def test_a_bulk_upload_refuses_the_hostile_png_alone(
    api: ApiClient, probe: StackProbe, user_id: str, hostile: bytes
) -> None:
    parts = [("image", "small.png", hostile, "image/png"), ("image", "ok.jpg", jpeg(64, 48), "")]
    body, content_type = multipart(parts)
    response = api.post_raw("/api/v1/uploads", body, content_type)
    assert response.status_code == 207, response.text
    refused, accepted = response.json["items"]
    assert refused["status"] == 422 and "MB of memory" in refused["error"]["message"]
    assert accepted["status"] == 201
    assert [str(row[0]) for row in probe.rows_for(user_id)] == [accepted["id"]]


def test_the_kernel_refuses_an_image_over_the_budget_before_decoding(hostile: bytes) -> None:
    with pytest.raises(ImageRejected, match="MB of memory, over the limit of 384 MB"):
        render_grayscale(hostile, max_decode_bytes=BUDGET)


# --- PNGs turned to gray in place ---------------------------------------------------------------


def reference_gray(pixels: np.ndarray) -> np.ndarray:
    """The whole-image conversion: 16 -> 8 bits, gray, alpha composited onto white."""
    if pixels.dtype == np.uint16:
        pixels = cv2.convertScaleAbs(pixels, alpha=1 / 257)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels == 1:
        return pixels
    if channels == 3:
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    if channels == 2:
        gray, alpha = np.ascontiguousarray(pixels[:, :, 0]), np.ascontiguousarray(pixels[:, :, 1])
    else:
        gray, alpha = cv2.cvtColor(pixels, cv2.COLOR_RGBA2GRAY), pixels[:, :, 3].copy()
    white = np.full_like(gray, 255, dtype=np.float64)
    composited = gray * (alpha / 255.0) + white * (1 - alpha / 255.0)
    return np.rint(composited).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_png_decodes_to_the_same_gray_as_a_whole_image_conversion(
    channels: int, dtype: Any
) -> None:
    rng = np.random.default_rng(channels)
    top = 65535 if dtype == np.uint16 else 255
    shape = (700, 333) if channels == 1 else (700, 333, channels)  # 700 rows: several strips
    pixels = rng.integers(0, top + 1, shape, dtype=dtype)
    encoded = imagecodecs.png_encode(pixels)
    view = memoryview(encoded)
    header = read_header(view, 10**8, BUDGET)
    decoded = decode_gray(view, header, 800)
    assert decoded.shape == (700, 333) and decoded.dtype == np.uint8
    # Within one level of rounding of the exact composite; the same on every strip.
    assert np.abs(decoded.astype(int) - reference_gray(pixels)).max() <= 1


# --- the memory cap of a CPU process ------------------------------------------------------------


def render_or_hog(task: RenderTask) -> RenderResult:
    """A render function for the CPU pool: inputs starting with HOG_MARKER ask for 4 GiB, far
    past the memory cap, as a decoder surprised by its input would (left untouched, so that
    without a cap the test fails instead of eating the machine's memory); the rest render
    normally."""
    from engine.cpu_pool import input_view, render_slot

    view = input_view(task)
    head = bytes(view[: len(HOG_MARKER)])
    view.release()
    if head == HOG_MARKER:
        hog = np.empty(4 * 1024 * MIB, np.uint8)
        return RenderResult(error=f"allocated {hog.nbytes} bytes")
    return render_slot(task)


@pytest.fixture
def capped() -> Iterator[PoolUnderTest]:
    """Two CPU processes with the default decode budget, so with the memory cap."""
    pool = PoolUnderTest(
        KernelOptions(800, "png", 100_000_000, max_decode_bytes=BUDGET),
        render_or_hog,
        slots=2,
        input_slot_bytes=8 * MIB,
        output_slot_bytes=4 * MIB,
    )
    yield pool
    pool.close()


def proc_field(pid: int, name: str) -> int:
    """A kB field of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def data_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            soft = line.split()[3]
            assert soft != "unlimited", "the CPU process runs without a memory cap"
            return int(soft)
    raise AssertionError(f"no data size limit in /proc/{pid}/limits")


def test_each_cpu_process_runs_under_a_data_limit_sized_from_the_budget(
    capped: PoolUnderTest,
) -> None:
    for pid in capped.pool.pids():
        limit = data_limit(pid)
        start_size = proc_field(pid, "VmData")
        assert BUDGET < limit - start_size <= BUDGET + 256 * MIB


def test_the_hostile_png_and_a_100_mp_progressive_jpeg_end_with_a_result_or_a_reason_under_the_cap(
    capped: PoolUnderTest, hostile: bytes, progressive: tuple[bytes, np.ndarray]
) -> None:
    refused, _ = capped.render(hostile)
    assert refused.error is not None and "MB of memory" in refused.error

    data, expected = progressive
    result, output = capped.render(data)
    assert result.error is None
    assert (result.width, result.height, result.source_width) == (800, 800, 10000)
    rendered = cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.abs(rendered.astype(int) - expected).mean() < 3

    for pid in capped.pool.pids():
        assert proc_field(pid, "VmHWM") < data_limit(pid)  # peak resident size under the cap


def test_an_allocation_past_the_cap_fails_only_that_image_and_the_process_goes_on(
    capped: PoolUnderTest,
) -> None:
    pids = capped.pool.pids()
    result, _ = capped.render(HOG_MARKER + jpeg(64, 48))
    assert result.error == OUT_OF_MEMORY_REASON
    assert capped.pool.pids() == pids  # no process died or was replaced

    for _ in pids:  # every process, the one that refused the allocation included
        after, _ = capped.render(jpeg(1600, 1200))
        assert after.error is None and after.width == 800


# --- the memory arithmetic of the Kubernetes worker ---------------------------------------------

# Resident sizes read from /proc/PID/status of a node that rendered 12 MP JPEGs (README: memory),
# rounded up: the node process with its fork server and resource tracker, and a CPU process at
# start (its memory cap counts from there).
NODE_PROCESS_MIB = 130
CPU_PROCESS_START_MIB = 64


def test_the_worker_manifest_holds_every_cpu_process_at_its_cap_within_the_memory_limit() -> None:
    from common.config import Settings
    from engine.cpu_pool import MEMORY_CAP_HEADROOM_BYTES

    manifest = yaml.safe_load_all((ROOT / "ops" / "k8s" / "worker.yaml").read_text())
    deployment = next(doc for doc in manifest if doc and doc["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    declared = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    engine = Settings.from_env({**declared, "PIXELMILL_ENV": "local"}).engine
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")

    per_process = engine.max_decode_mb + MEMORY_CAP_HEADROOM_BYTES // MIB + CPU_PROCESS_START_MIB
    needed = engine.memory_mb + NODE_PROCESS_MIB + engine.processes * per_process
    assert needed <= int(limit[:-2]) * 1024


# --- CMYK JPEGs within their budget ---------------------------------------------------------

CMYK_BUDGET = 64 * MIB


def cmyk_jpeg_12_mp(adobe: bool) -> tuple[bytes, np.ndarray]:
    """A 4000x3000 CMYK JPEG (48 MB decoded: inside CMYK_BUDGET) of smooth ink ramps, as Adobe
    stores it (inverted) or as ink; and its naive RGB conversion's gray at 800x600."""
    ramp = np.tile(np.arange(250, dtype=np.uint8), (3000, 16))
    ink = cv2.merge([ramp, np.ascontiguousarray(np.flipud(ramp)), ramp // 2, ramp // 3])
    stored = 255 - ink if adobe else ink
    data = bytes(
        imagecodecs.jpeg8_encode(stored, level=85, colorspace="CMYK", outcolorspace="CMYK")
    )
    assert b"Adobe" in data
    paper = (255 - ink).astype(np.float32) / 255
    rgb = np.rint(255 * paper[:, :, :3] * paper[:, :, 3:]).astype(np.uint8)
    gray = cv2.resize(
        cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (800, 600), interpolation=cv2.INTER_AREA
    )
    return (data if adobe else without_adobe_marker(data)), gray


@pytest.fixture(scope="module")
def cmyk_pool() -> Iterator[PoolUnderTest]:
    """One CPU process under a 64 MiB decode budget (its cap: 192 MiB more than at start),
    making a gray and a colour rendition."""
    options = KernelOptions(
        800,
        "png",
        100_000_000,
        max_decode_bytes=CMYK_BUDGET,
        renditions=parse_renditions("default:800:gray:png, thumb:200:color:webp:80"),
    )
    pool = PoolUnderTest(options, render_or_hog, processes=1, slots=1, input_slot_bytes=8 * MIB)
    yield pool
    pool.close()


@pytest.mark.parametrize("adobe", [True, False], ids=["adobe-inverted", "ink"])
def test_a_cmyk_jpeg_without_a_profile_inside_the_budget_renders_under_the_memory_cap(
    cmyk_pool: PoolUnderTest, adobe: bool
) -> None:
    data, expected = cmyk_jpeg_12_mp(adobe)
    header = probe(data)
    assert header is not None and decode_bytes(header, colour=True) <= CMYK_BUDGET

    result, output = cmyk_pool.render(data)

    assert result.error is None, result.error
    assert [(o.name, o.width, o.height) for o in result.outputs] == [
        ("default", 800, 600),
        ("thumb", 200, 150),
    ]
    rendered = cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.abs(rendered.astype(int) - expected).mean() < 3
    [pid] = cmyk_pool.pool.pids()
    assert proc_field(pid, "VmHWM") < data_limit(pid)
