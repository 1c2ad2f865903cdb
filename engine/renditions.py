"""Every rendition of an image from one decode: encoded bytes in, one encoded output per rendition.

The file is decoded once, at the DCT scale the largest rendition needs (gray straight from the
JPEG when no rendition is in colour and no profile must be converted: the kernel's fast path;
otherwise in colour, converted to sRGB), and each rendition is resized from the nearest larger
one already made, so the cost of a second or third rendition is a small resize and an encode.
Gray outputs of a colour decode are computed from the sRGB values at their own size. Outputs
carry no metadata from the source (no EXIF, GPS or XMP): the EXIF orientation is applied to the
pixels. Pure functions, like `engine.kernel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import imagecodecs
import numpy as np

from common.decode_budget import over_budget_reason
from common.formats import CONTENT_TYPE_BY_FORMAT
from common.imageinfo import ImageHeader
from common.renditions import Rendition, oversized_reason, target_size
from engine.colour import source_colour, srgb_profile
from engine.kernel import (
    ImageRejected,
    decode_colour,
    decode_gray,
    encode_avif,
    encode_jxl,
    encoded_view,
    library_errors_rejected,
    orient,
    read_header,
    resize_stored,
)
from engine.pngwrite import encode_png_gray, encode_png_rgb

# libwebp's method 2 makes files about 6 % larger than its default 4 in about 60 % of the time
# (400 px photos); `lossless=False` must be said, or imagecodecs writes a lossless file.
WEBP_METHOD = 2


@dataclass(frozen=True)
class RenditionImage:
    """One encoded output."""

    name: str
    data: bytes
    width: int
    height: int
    content_type: str


@dataclass(frozen=True)
class RenderedSet:
    """The outputs, in the order asked for, and the displayed size of their source."""

    images: tuple[RenditionImage, ...]
    source_width: int
    source_height: int


def render_renditions(
    data: bytes | memoryview | np.ndarray,
    renditions: Sequence[Rendition],
    *,
    max_pixels: int = 100_000_000,
    max_decode_bytes: int | None = None,
) -> RenderedSet:
    """Decode `data` (a JPEG or PNG file) once and encode every rendition of `renditions`.

    Raises `engine.kernel.ImageRejected` for input that cannot or must not be processed (an
    output past its format's size limit included: refused before decoding; whatever a decoder,
    colour transform, resize or encoder raises about this image is turned into it), and
    ValueError when `renditions` is empty.
    """
    if not renditions:
        raise ValueError("at least one rendition is needed")
    encoded = encoded_view(data)
    header = read_header(encoded, max_pixels)
    reason = oversized_reason(*header.display_size, renditions)
    if reason is not None:
        raise ImageRejected(reason)
    colour = source_colour(encoded, header)
    if colour.refusal is not None:
        raise ImageRejected(colour.refusal)
    largest = max(r.width for r in renditions)
    all_gray = all(r.gray for r in renditions)
    colour_decode = not (all_gray and not colour.needs_colour_decode)
    if max_decode_bytes is not None:
        reason = over_budget_reason(header, max_decode_bytes, colour=colour_decode)
        if reason is not None:
            raise ImageRejected(reason)
    with library_errors_rejected("decoding it"):
        if not colour_decode:
            decoded = decode_gray(encoded, header, largest)
        else:
            decoded = decode_colour(encoded, header, largest, colour)
            if all_gray and decoded.ndim == 3:
                decoded = cv2.cvtColor(decoded, cv2.COLOR_RGB2GRAY)
    made = _fan_out(decoded, header, renditions)
    return RenderedSet(tuple(made), *header.display_size)


def _fan_out(
    decoded: np.ndarray, header: ImageHeader, renditions: Sequence[Rendition]
) -> list[RenditionImage]:
    """Largest first, each rendition resized from the smallest image already made that covers
    it. A gray rendition of a colour image is grayed before it is resized (a third of the
    work), so a large gray rendition costs the small colour ones nothing."""
    sizes = {r.name: target_size(*header.display_size, r.width) for r in renditions}
    by_size = sorted(renditions, key=lambda r: sizes[r.name][0] * sizes[r.name][1], reverse=True)
    made = [decoded]  # stored orientation: 2-D gray or HxWx3 colour
    outputs: dict[str, RenditionImage] = {}
    for rendition in by_size:
        width, height = sizes[rendition.name]
        stored_width, stored_height = (
            (height, width) if header.orientation >= 5 else (width, height)
        )
        image = _made_for(made, rendition.gray, stored_width, stored_height)
        with library_errors_rejected(f"resizing it for its {rendition.name!r} rendition"):
            if image.ndim == 3 and rendition.gray:
                image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
                made.append(image)
            if image.shape[:2] != (stored_height, stored_width):
                image = _resized(image, header.orientation, width, height)
                made.append(image)
            displayed = orient(image, header.orientation)
        with library_errors_rejected(
            f"encoding its {rendition.name!r} rendition ({width}x{height} "
            f"{rendition.format.upper()})"
        ):
            data = encode_rendition(displayed, rendition)
        outputs[rendition.name] = RenditionImage(
            rendition.name, data, width, height, CONTENT_TYPE_BY_FORMAT[rendition.format]
        )
    return [outputs[r.name] for r in renditions]


def _resized(image: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """Gray: the kernel's own resize (the single default rendition stays byte for byte what it
    was). Colour: 2x2 box halvings while the result still covers the target, then one small
    INTER_AREA step. OpenCV's INTER_AREA is fast for integer factors only, and on three
    channels a general factor costs 3-5x the halvings; the wider effective filter this gives
    small renditions is well inside the tests' tolerance."""
    if image.ndim == 2:
        return resize_stored(image, orientation, width, height)
    stored_width, stored_height = (height, width) if orientation >= 5 else (width, height)
    while image.shape[1] // 2 >= stored_width and image.shape[0] // 2 >= stored_height:
        even = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
        image = cv2.resize(even, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    if image.shape[:2] == (stored_height, stored_width):
        return image
    return cv2.resize(image, (stored_width, stored_height), interpolation=cv2.INTER_LINEAR)


def _made_for(made: list[np.ndarray], gray: bool, width: int, height: int) -> np.ndarray:
    """The smallest image made so far that covers width x height (in colour for a colour
    rendition when there is one; a gray one of the same size is preferred for a gray one)."""
    covering = [m for m in made if m.shape[1] >= width and m.shape[0] >= height]
    if not gray and any(m.ndim == 3 for m in covering):
        covering = [m for m in covering if m.ndim == 3]
    return min(covering, key=lambda m: (m.shape[0] * m.shape[1], m.ndim != 2 if gray else 0))


def encode_rendition(image: np.ndarray, rendition: Rendition) -> bytes:
    """Encode displayed pixels (2-D gray or HxWx3 sRGB in R, G, B order) as `rendition` says."""
    if rendition.gray:
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return _encode_gray(np.ascontiguousarray(gray), rendition)
    rgb = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return _encode_colour(np.ascontiguousarray(rgb), rendition)


def _encode_gray(gray: np.ndarray, rendition: Rendition) -> bytes:
    if rendition.format == "png":
        return encode_png_gray(gray)
    return _encode_lossy(gray, rendition)


def _encode_colour(rgb: np.ndarray, rendition: Rendition) -> bytes:
    if rendition.format == "png":
        return encode_png_rgb(rgb)
    return _encode_lossy(rgb, rendition)


def _encode_lossy(pixels: np.ndarray, rendition: Rendition) -> bytes:
    quality = rendition.quality
    colour = pixels.ndim == 3
    if rendition.format == "jpeg":
        return _encode_jpeg(pixels, quality, colour)
    if rendition.format == "webp":
        data = imagecodecs.webp_encode(
            pixels if colour else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB),
            level=quality,
            lossless=False,
            method=WEBP_METHOD,
            numthreads=1,
        )
        return _tag_webp_srgb(bytes(data), colour)
    if rendition.format == "avif":
        return encode_avif(pixels, quality)
    return encode_jxl(pixels, quality)


def _encode_jpeg(pixels: np.ndarray, quality: int, colour: bool) -> bytes:
    image = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if colour else pixels
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {pixels.shape} image as JPEG")
    data = buffer.tobytes()
    return _with_jpeg_profile(data) if colour else data


def _with_jpeg_profile(data: bytes) -> bytes:
    """The JPEG with lcms2's sRGB profile in an APP2 segment right after SOI."""
    profile = srgb_profile()
    body = b"ICC_PROFILE\x00\x01\x01" + profile
    segment = b"\xff\xe2" + (len(body) + 2).to_bytes(2, "big") + body
    return data[:2] + segment + data[2:]


def _tag_webp_srgb(data: bytes, colour: bool) -> bytes:
    """Rewrite a simple (VP8 or VP8L) WebP as an extended one carrying the sRGB profile."""
    if not colour or data[12:16] not in (b"VP8 ", b"VP8L"):
        return data
    width, height = _webp_size(data)
    profile = srgb_profile()
    flags = 0x20  # ICC profile present
    vp8x = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    chunks = _riff_chunk(b"VP8X", vp8x) + _riff_chunk(b"ICCP", profile) + data[12:]
    return b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WEBP" + chunks


def _webp_size(data: bytes) -> tuple[int, int]:
    if data[12:16] == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    # VP8 key frame: 3-byte frame tag, 3-byte start code, then 14-bit width and height.
    width = int.from_bytes(data[26:28], "little") & 0x3FFF
    height = int.from_bytes(data[28:30], "little") & 0x3FFF
    return width, height


def _riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    pad = b"\x00" if len(payload) % 2 else b""
    return fourcc + len(payload).to_bytes(4, "little") + payload + pad
