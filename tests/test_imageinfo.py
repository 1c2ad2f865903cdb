"""Tests for common.imageinfo: format, stored size and EXIF orientation read from headers only."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.imageinfo import ImageHeader, exif_orientation, probe


def photo_bgr(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    image = np.dstack([x * 255 // max(1, width), y * 255 // max(1, height), (x + y) % 256])
    return image.astype(np.uint8)


def encode(extension: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(extension, image, params or [])
    assert ok
    return buffer.tobytes()


def exif_app1(orientation: int, byte_order: str = "<", value_type: int = 3) -> bytes:
    """A minimal APP1 Exif segment: TIFF header + IFD0 holding one Orientation entry."""
    mark = b"II" if byte_order == "<" else b"MM"
    value = struct.pack(byte_order + "HH", orientation, 0)
    entry = struct.pack(byte_order + "HHI", 0x0112, value_type, 1) + value
    tiff = mark + struct.pack(byte_order + "HIH", 42, 8, 1) + entry + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def with_segment(jpeg: bytes, segment: bytes) -> bytes:
    """Insert a marker segment right after SOI (and after APP0 JFIF when present)."""
    position = 2
    if jpeg[2:4] == b"\xff\xe0":
        position = 4 + struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:position] + segment + jpeg[position:]


def png_ihdr_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


def test_jpeg_probe_reads_stored_size_and_defaults_orientation_to_1() -> None:
    header = probe(encode(".jpg", photo_bgr(321, 123)))
    assert header == ImageHeader("jpeg", 321, 123, 1)
    assert header.display_size == (321, 123)


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_probe_reads_exif_orientation_in_both_byte_orders(
    orientation: int, byte_order: str
) -> None:
    jpeg = with_segment(encode(".jpg", photo_bgr(300, 200)), exif_app1(orientation, byte_order))
    header = probe(jpeg)
    assert header is not None
    assert (header.width, header.height, header.orientation) == (300, 200, orientation)
    assert header.display_size == ((200, 300) if orientation >= 5 else (300, 200))


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_out_of_range_orientation_reads_as_1(orientation: int) -> None:
    jpeg = with_segment(encode(".jpg", photo_bgr(30, 20)), exif_app1(orientation))
    assert probe(jpeg) == ImageHeader("jpeg", 30, 20, 1)


def test_orientation_with_a_non_short_type_reads_as_1() -> None:
    assert exif_orientation(exif_app1(6, value_type=4)[10:]) == 1
    assert exif_orientation(exif_app1(6)[10:]) == 6


def test_progressive_jpeg_is_read_from_its_sof2_header() -> None:
    jpeg = encode(".jpg", photo_bgr(64, 48), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert b"\xff\xc2" in jpeg
    assert probe(jpeg) == ImageHeader("jpeg", 64, 48, 1)


def test_frame_header_after_large_app_segments_and_fill_bytes_is_found() -> None:
    jpeg = encode(".jpg", photo_bgr(77, 55))
    filler = b"\xff\xe2" + struct.pack(">H", 65535) + bytes(65533)
    jpeg = with_segment(jpeg, filler + filler + b"\xff\xff\xff" + exif_app1(8)[1:])
    assert probe(jpeg) == ImageHeader("jpeg", 77, 55, 8)


def test_png_probe_reads_ihdr_and_accepts_memoryview() -> None:
    png = encode(".png", photo_bgr(640, 2))
    assert probe(png) == ImageHeader("png", 640, 2, 1)
    assert probe(memoryview(png)) == ImageHeader("png", 640, 2, 1)
    assert probe(np.frombuffer(png, np.uint8).data) == ImageHeader("png", 640, 2, 1)


def test_png_with_bad_ihdr_crc_zero_size_or_bad_depth_is_none() -> None:
    good = png_ihdr_only(10, 10)
    assert probe(good) == ImageHeader("png", 10, 10, 1)
    assert probe(good[:-1] + bytes([good[-1] ^ 1])) is None
    assert probe(png_ihdr_only(0, 10)) is None
    assert probe(png_ihdr_only(10, 0)) is None
    assert probe(png_ihdr_only(10, 10, bit_depth=3)) is None
    assert probe(png_ihdr_only(10, 10, colour_type=5)) is None


def other_formats() -> dict[str, bytes]:
    image = photo_bgr(32, 24)
    jpeg = encode(".jpg", image)
    sof = jpeg.index(b"\xff\xc0")
    return {
        "gif": b"GIF89a" + struct.pack("<HH", 32, 24) + bytes(20),
        "webp": encode(".webp", image),
        "tiff": encode(".tiff", image),
        "bmp": encode(".bmp", image),
        "pdf": b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "text": b"hello, this is not an image",
        "empty": b"",
        "jpeg truncated before sof": jpeg[:sof],
        "jpeg truncated inside sof": jpeg[: sof + 6],
        "png signature only": b"\x89PNG\r\n\x1a\n",
        "png truncated ihdr": png_ihdr_only(10, 10)[:20],
        "jpeg sos before sof": b"\xff\xd8\xff\xda\x00\x08" + bytes(6),
    }


@pytest.mark.parametrize("name", sorted(other_formats()))
def test_anything_but_jpeg_or_png_is_none(name: str) -> None:
    assert probe(other_formats()[name]) is None


def test_recognition_is_by_content_not_extension() -> None:
    png = encode(".png", photo_bgr(5, 4))
    jpeg_named_like_png = encode(".jpg", photo_bgr(5, 4))
    assert probe(png) is not None and probe(png).format == "png"  # type: ignore[union-attr]
    assert probe(jpeg_named_like_png).format == "jpeg"  # type: ignore[union-attr]


SEEDS = [
    encode(".jpg", photo_bgr(40, 30)),
    with_segment(encode(".jpg", photo_bgr(40, 30)), exif_app1(6, ">")),
    encode(".png", photo_bgr(40, 30)),
]


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS))[:400])
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated_seed(), st.binary(max_size=200)))
def test_probe_never_raises_on_mutated_or_random_bytes(data: bytes) -> None:
    header = probe(data)
    if header is not None:
        assert header.format in ("jpeg", "png")
        assert header.width > 0 and header.height > 0
        assert 1 <= header.orientation <= 8
