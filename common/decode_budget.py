"""The decode budget: how many bytes decoding an image holds at once, from its header alone.

The API refuses an upload over the budget (422) and the engine checks again before decoding, so
one small file cannot take a CPU process, or the node it shares memory with, past its limit. The
arithmetic follows what the kernel's decoders allocate:

- PNG: libpng's full image, width x height x channels x bytes per sample (palette and tRNS
  expanded); the kernel then converts it to gray in place, strip by strip.
- JPEG: the output, at most width x height bytes for gray (a reduced DCT scale only makes it
  smaller) and a byte per component and pixel for colour renditions, plus, for progressive or
  multi-scan files, libjpeg's whole-image buffer of DCT coefficients: 64 two-byte coefficients
  per 8x8 block of every component.
"""

from __future__ import annotations

from common.imageinfo import ImageHeader

MIB = 1024 * 1024
# MAX_DECODE_MB's default: every 8-bit image of up to 100 MP (RGBA: 381.5 MB) and a 100 MP 4:2:0
# progressive JPEG (381.5 MB) fit; 16-bit colour at that size does not. README: memory arithmetic.
DEFAULT_MAX_DECODE_MB = 384
_BLOCK = 8
_COEFFICIENT_BYTES_PER_BLOCK = 64 * 2


def decode_bytes(header: ImageHeader, *, colour: bool = False) -> int:
    """Bytes the decoder holds for this image at its peak, as the header declares it; `colour`
    when a colour rendition makes the kernel decode the JPEG in colour rather than gray."""
    pixels = header.width * header.height
    if header.format == "png":
        return pixels * header.channels * header.sample_bytes
    coefficients = jpeg_coefficient_bytes(header) if header.whole_image_coefficients else 0
    output_channels = max(1, header.channels) if colour else 1
    return pixels * output_channels + coefficients


def jpeg_coefficient_bytes(header: ImageHeader) -> int:
    """libjpeg's whole-image coefficient arrays: per component, its blocks (rounded up to whole
    MCUs, as libjpeg allocates them) times 128 bytes."""
    if not header.sampling:
        return 0
    max_h = max(h for h, _v in header.sampling)
    max_v = max(v for _h, v in header.sampling)
    total = 0
    for h, v in header.sampling:
        blocks_wide = _ceil(_ceil(header.width * h, max_h), _BLOCK)
        blocks_high = _ceil(_ceil(header.height * v, max_v), _BLOCK)
        total += _round_up(blocks_wide, h) * _round_up(blocks_high, v)
    return total * _COEFFICIENT_BYTES_PER_BLOCK


def over_budget_reason(
    header: ImageHeader, max_decode_bytes: int, *, colour: bool = False
) -> str | None:
    """Why this image must not be decoded under `max_decode_bytes`, or None when it may."""
    needed = decode_bytes(header, colour=colour)
    if needed <= max_decode_bytes:
        return None
    return (
        f"decoding this {header.width}x{header.height} {header.format.upper()} would need "
        f"{_ceil(needed, MIB)} MB of memory, over the limit of {max_decode_bytes // MIB} MB"
    )


def _ceil(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _round_up(value: int, multiple: int) -> int:
    return _ceil(value, multiple) * multiple
