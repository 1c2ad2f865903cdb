"""Fuzzing the render path: whatever file comes in and whatever renditions are configured,
`engine.renditions.render_renditions` makes every output at its size, or raises ImageRejected
with a reason; no other exception (which would end the image as "failed unexpectedly").

Inputs are built, then perhaps damaged: JPEG (gray, RGB, CMYK with or without Adobe's marker,
baseline or progressive) and PNG (gray, gray+alpha, RGB, RGBA, palette; 8 or 16 bits) of random
sizes, extreme aspect ratios included, with EXIF orientations (valid or not), ICC profiles (sRGB,
wide gamut, CMYK, gray, garbage, cut short, over the 4 MB cap), then bytes overwritten or the
file cut short; each against a random set of gray and colour renditions of every output format.

The suite runs a fixed, derandomized set of examples. A longer run explores at random and keeps
what it finds in `.hypothesis/`: `RENDER_FUZZ_EXAMPLES=10000 .venv/bin/pytest -q -s
tests/test_render_fuzz.py`. Each crash found is kept below as an `@example`.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import time
import zlib
from typing import Any

import cv2
import imagecodecs
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from common.renditions import Rendition
from engine.kernel import ImageRejected
from engine.renditions import render_renditions
from tests.support import without_adobe_marker
from tests.test_renditions import cmyk_profile

LONG_RUN = int(os.environ.get("RENDER_FUZZ_EXAMPLES", "0"))
_COMMON = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
SUITE_SETTINGS = hypothesis_settings(max_examples=300, derandomize=True, database=None, **_COMMON)
LONG_SETTINGS = hypothesis_settings(max_examples=max(LONG_RUN, 1), **_COMMON)
MAX_PIXELS = 2_000_000
MAX_DECODE_BYTES = 64 * 1024 * 1024
FORMATS = ("png", "jpeg", "webp", "avif", "jxl")
QUALITY = {"png": 0, "jpeg": 80, "webp": 80, "avif": 60, "jxl": 80}
PROFILE_KINDS = ("none", "srgb", "wide", "cmyk", "gray", "garbage", "cut", "huge")


# --- profiles ---------------------------------------------------------------------------------


@functools.cache
def lcms_profile(kind: str) -> bytes:
    """Made once: lcms2 stamps each profile it makes with the time, and a strategy must draw
    the same bytes every time it replays a choice."""
    return _made_profile(kind)


def _made_profile(kind: str) -> bytes:
    if kind == "wide":
        primaries = [0.680, 0.320, 0.265, 0.690, 0.150, 0.060]
        return bytes(imagecodecs.cms_profile("rgb", primaries=primaries, gamma=2.2))
    if kind == "gray":
        return bytes(imagecodecs.cms_profile("gray", gamma=2.2))
    if kind == "cmyk":
        return cmyk_profile()
    return bytes(imagecodecs.cms_profile("srgb"))


@st.composite
def profiles(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(PROFILE_KINDS))
    if kind == "none":
        return None
    if kind == "garbage":
        head = draw(st.sampled_from([b"", b"\0\0\x02\x00lcms\x02\x10\x00\x00mntrRGB XYZ "]))
        return head + draw(st.binary(min_size=0, max_size=400))
    if kind == "cut":
        whole = lcms_profile(draw(st.sampled_from(["srgb", "wide", "gray"])))
        return whole[: draw(st.integers(0, len(whole) - 1))]
    if kind == "huge":
        return lcms_profile("wide") + bytes(4 * 1024 * 1024)
    return lcms_profile(kind)


# --- files ------------------------------------------------------------------------------------


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int]:
    """Ordinary sizes, and strips one to a few pixels across and up to 20000 long."""
    if draw(st.integers(0, 3)) == 0:
        thin, long = draw(st.integers(1, 4)), draw(st.integers(1000, 20000))
        return (thin, long) if draw(st.booleans()) else (long, thin)
    return draw(st.integers(1, 160)), draw(st.integers(1, 160))


def pixels(draw: st.DrawFn, width: int, height: int, channels: int, dtype: Any) -> np.ndarray:
    """A gradient with a little seeded noise: cheap, and not constant."""
    top = 65535 if dtype == np.uint16 else 255
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    ramp = np.linspace(0, top, width * height, dtype=np.float64).reshape(height, width)
    shape = (height, width) if channels == 1 else (height, width, channels)
    noise = rng.integers(0, top // 8 + 1, shape)
    base = ramp if channels == 1 else ramp[:, :, None]
    return np.clip(base + noise, 0, top).astype(dtype)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def png_files(draw: st.DrawFn) -> bytes:
    width, height = draw(sizes())
    palette = draw(st.integers(0, 5)) == 0
    if palette:
        data = png_palette(draw, width, height)
    else:
        channels = draw(st.integers(1, 4))
        dtype = draw(st.sampled_from([np.uint8, np.uint16]))
        data = bytes(imagecodecs.png_encode(pixels(draw, width, height, channels, dtype)))
    profile = draw(profiles())
    if profile is None:
        return data
    iccp = png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(profile))
    return data[:33] + iccp + data[33:]


def png_palette(draw: st.DrawFn, width: int, height: int) -> bytes:
    indices = pixels(draw, width, height, 1, np.uint8) // 16
    entries = draw(st.integers(1, 16))
    plte = bytes(range(entries * 3))
    trns = png_chunk(b"tRNS", bytes([0, 128])) if draw(st.booleans()) else b""
    raw = b"".join(b"\0" + bytes(np.minimum(row, entries - 1)) for row in indices)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"PLTE", plte)
        + trns
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def app_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def exif_segment(orientation: int, value_type: int) -> bytes:
    value = struct.pack("<HH", orientation, 0)
    entry = struct.pack("<HHI", 0x0112, value_type, 1) + value
    tiff = b"II" + struct.pack("<HIH", 42, 8, 1) + entry + struct.pack("<I", 0)
    return app_segment(0xE1, b"Exif\0\0" + tiff)


def icc_segments(profile: bytes, draw: st.DrawFn) -> bytes:
    """The profile in APP2 chunks, sometimes numbered wrongly."""
    chunks = [profile[at : at + 65519] for at in range(0, len(profile), 65519)] or [b""]
    misnumbered = draw(st.integers(0, 4)) == 0
    out = b""
    for number, chunk in enumerate(chunks, 1):
        sequence = bytes([0 if misnumbered else number, len(chunks) % 256])
        out += app_segment(0xE2, b"ICC_PROFILE\0" + sequence + chunk)
    return out


@st.composite
def jpeg_files(draw: st.DrawFn) -> bytes:
    width, height = draw(sizes())
    kind = draw(st.sampled_from(["gray", "rgb", "rgb", "cmyk", "cmyk-ink"]))
    progressive = draw(st.booleans())
    if kind == "cmyk":  # Pillow writes Adobe's marker and inverted values
        buffer = io.BytesIO()
        cmyk = Image.fromarray(pixels(draw, width, height, 4, np.uint8), "CMYK")
        cmyk.save(buffer, "JPEG", quality=80, progressive=progressive)
        data = buffer.getvalue()
    elif kind == "cmyk-ink":
        ink = pixels(draw, width, height, 4, np.uint8)
        encoded_ink = imagecodecs.jpeg8_encode(
            ink, level=80, colorspace="CMYK", outcolorspace="CMYK"
        )
        data = without_adobe_marker(bytes(encoded_ink))
    else:
        image = pixels(draw, width, height, 1 if kind == "gray" else 3, np.uint8)
        params = [cv2.IMWRITE_JPEG_QUALITY, 80, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
        ok, encoded = cv2.imencode(".jpg", image, params)
        assert ok
        data = encoded.tobytes()
    segments = b""
    if draw(st.booleans()):
        segments += exif_segment(draw(st.integers(0, 9)), draw(st.sampled_from([3, 3, 3, 4])))
    profile = draw(profiles())
    if profile is not None:
        segments += icc_segments(profile, draw)
    return data[:2] + segments + data[2:]


def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """Some bytes overwritten (most often in the headers), perhaps cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        reach = len(out) if draw(st.booleans()) else min(len(out), 2048)
        out[draw(st.integers(0, reach - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0:
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


@st.composite
def render_inputs(draw: st.DrawFn) -> bytes:
    data = draw(st.one_of(jpeg_files(), png_files()))
    return damaged(draw, data) if draw(st.booleans()) else data


@st.composite
def rendition_sets(draw: st.DrawFn) -> tuple[Rendition, ...]:
    count = draw(st.integers(1, 4))
    chosen = []
    for index in range(count):
        image_format = draw(st.sampled_from(FORMATS))
        mode = draw(st.sampled_from(["gray", "color"]))
        width = draw(st.sampled_from([1, 7, 48, 200, 800]))
        chosen.append(Rendition(f"r{index}", width, mode, image_format, QUALITY[image_format]))
    return tuple(chosen)


def gray_jpeg(width: int, height: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", np.full((height, width), 128, np.uint8))
    assert ok
    return encoded.tobytes()


# --- the property -----------------------------------------------------------------------------


def check_render(data: bytes, renditions: tuple[Rendition, ...]) -> str:
    """Render; the outcome's kind ("made" or "rejected"). Anything else raised fails the test."""
    try:
        rendered = render_renditions(
            data, renditions, max_pixels=MAX_PIXELS, max_decode_bytes=MAX_DECODE_BYTES
        )
    except ImageRejected as exc:
        assert str(exc), "a rejection must say why"
        return "rejected"
    assert [image.name for image in rendered.images] == [r.name for r in renditions]
    for image, rendition in zip(rendered.images, renditions, strict=True):
        assert image.data and 1 <= image.width <= max(rendition.width, 1)
        assert image.height >= 1
    return "made"


# Crashes the fuzzer found, kept as regressions (see the module docstring).
@SUITE_SETTINGS
@given(data=render_inputs(), renditions=rendition_sets())
@example(  # a 1x20000 strip: its WebP rendition is past libwebp's limit
    data=bytes(imagecodecs.png_encode(np.zeros((20000, 1), np.uint8))),
    renditions=(Rendition("r0", 200, "color", "webp", 80),),
)
@example(  # a 1x1000 JPEG was decoded at 1/8 (its width covered), 125 rows for 1000
    data=gray_jpeg(1, 1000), renditions=(Rendition("r0", 1, "gray", "png"),)
)
@example(  # 1/2 covers 1599 px wide for 800, but 1599 of 3198 rows fall short of 1600
    data=gray_jpeg(1599, 3198), renditions=(Rendition("r0", 800, "color", "webp", 80),)
)
def test_any_file_against_any_renditions_renders_or_is_rejected_with_a_reason(
    data: bytes, renditions: tuple[Rendition, ...]
) -> None:
    check_render(data, renditions)


@pytest.mark.skipif(not LONG_RUN, reason="a long run: set RENDER_FUZZ_EXAMPLES")
@pytest.mark.timeout(0)  # as long as its examples take
def test_a_long_random_fuzz_run_renders_or_rejects_every_input() -> None:
    outcomes: dict[str, int] = {}
    started = time.perf_counter()

    @LONG_SETTINGS
    @given(data=render_inputs(), renditions=rendition_sets())
    def explore(data: bytes, renditions: tuple[Rendition, ...]) -> None:
        kind = check_render(data, renditions)
        outcomes[kind] = outcomes.get(kind, 0) + 1

    explore()
    elapsed = time.perf_counter() - started
    print(f"\nrender fuzz: {sum(outcomes.values())} examples in {elapsed:.0f} s: {outcomes}")
