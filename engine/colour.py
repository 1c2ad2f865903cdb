"""Colour management for the kernel: what colour space a file's pixels are in, and sRGB from it.

Reads the embedded ICC profile (JPEG APP2 `ICC_PROFILE` segments, PNG `iCCP`), the JPEG frame's
component count and Adobe marker (CMYK files), and converts pixels to sRGB with lcms2 (through
imagecodecs). An RGB profile whose colorants are sRGB's is treated as untagged, so the many
sRGB-tagged files keep the kernel's gray fast path. Every read is bounds-checked: a damaged
profile or segment reads as "no profile", never as an exception; a profile over
MAX_PROFILE_BYTES is a `refusal` of the image.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import imagecodecs
import numpy as np

from common.imageinfo import ImageHeader

_ICC_PREFIX = b"ICC_PROFILE\x00"
_ADOBE_PREFIX = b"Adobe"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# The largest embedded profile read, in JPEG and PNG alike (real ones are under 1 MB; a CMYK
# profile with a 17-point grid is about 600 KB).
MAX_PROFILE_BYTES = 4 * 1024 * 1024
_MIB = 1024 * 1024
# sRGB's colorants adapted to D50 (ICC v4 spec, annex; lcms2's built-in sRGB), in s15Fixed16.
_SRGB_COLORANTS = {
    b"rXYZ": (0.4361, 0.2225, 0.0139),
    b"gXYZ": (0.3851, 0.7169, 0.0971),
    b"bXYZ": (0.1431, 0.0606, 0.7141),
}
_COLORANT_TOLERANCE = 0.003


@dataclass(frozen=True)
class SourceColour:
    """How a file's pixels are coded: `profile` is set only when they need converting to sRGB
    (a non-sRGB RGB profile, or a CMYK one); `cmyk` for four-component JPEGs, whose values are
    stored inverted when `adobe_inverted`."""

    profile: bytes | None = None
    cmyk: bool = False
    adobe_inverted: bool = False
    # PNG colour type (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA); -1 for JPEG.
    png_colour_type: int = -1
    # Why the image must not be processed (an embedded profile over MAX_PROFILE_BYTES).
    refusal: str | None = None

    @property
    def needs_colour_decode(self) -> bool:
        """Whether even a gray output must be computed from converted colour values (a CMYK
        file stored as Adobe writes it, without a profile, converts inside libjpeg's own
        decode, gray or colour: see `decoded_by_opencv`)."""
        return self.profile is not None or (self.cmyk and not self.adobe_inverted)

    @property
    def decoded_by_opencv(self) -> bool:
        """Whether OpenCV's decode gives the right pixels, at a reduced DCT scale: anything but
        CMYK that needs its profile or stores ink uninverted (OpenCV reads every CMYK file as
        Adobe's, 255 for no ink, and ignores its profile)."""
        return not self.cmyk or (self.adobe_inverted and self.profile is None)

    @property
    def is_gray(self) -> bool:
        return self.png_colour_type in (0, 4)


def source_colour(encoded: memoryview, header: ImageHeader) -> SourceColour:
    """The colour facts of a probed JPEG or PNG (see `SourceColour`)."""
    if header.format == "jpeg":
        profile, components, adobe = _jpeg_colour(bytes(encoded[: _jpeg_header_end(encoded)]))
        cmyk = components == 4
        return SourceColour(
            _conversion_profile(profile, cmyk),
            cmyk,
            cmyk and adobe,
            refusal=_profile_refusal(profile),
        )
    colour_type = encoded[25] if len(encoded) > 25 else 0
    profile = _png_profile(encoded)
    return SourceColour(
        _conversion_profile(profile, False),
        png_colour_type=colour_type,
        refusal=_profile_refusal(profile),
    )


def _profile_refusal(profile: bytes | None) -> str | None:
    """A PNG's profile is inflated one byte past the limit, so that is all that is known."""
    if profile is None or len(profile) <= MAX_PROFILE_BYTES:
        return None
    return (
        f"its embedded ICC colour profile is larger than the {MAX_PROFILE_BYTES // _MIB} MB limit"
    )


def to_srgb(
    pixels: np.ndarray, profile: bytes, colorspace: str, out: np.ndarray | None = None
) -> np.ndarray | None:
    """`pixels` (HxWx3 'rgb' or 'bgr', HxWx4 'cmyk'; 8 or 16 bits) converted to 8-bit sRGB in
    R, G, B order, perceptual intent, into `out` if given (HxWx3 uint8). None when lcms2
    cannot use the profile (damaged, or of a kind it does not take), found before a pixel is
    written: the caller renders the values unconverted, as browsers do."""
    try:
        return imagecodecs.cms_transform(
            pixels,
            profile,
            srgb_profile(),
            colorspace=colorspace,
            outcolorspace="rgb",
            outdtype=np.uint8,
            out=out,  # type: ignore[arg-type]
        )
    except (imagecodecs.CmsError, ValueError, TypeError):
        return None


@lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    """lcms2's built-in sRGB profile (under 600 bytes), embedded in outputs that carry one."""
    return bytes(imagecodecs.cms_profile("srgb"))


def is_srgb(profile: bytes) -> bool:
    """An RGB profile whose red, green and blue colorants are sRGB's (its curves are not read:
    sRGB profiles spell the same curve in several ways)."""
    if len(profile) < 132 or profile[16:20] != b"RGB ":
        return False
    (count,) = struct.unpack_from(">I", profile, 128)
    tags = {}
    for index in range(min(count, 200)):
        at = 132 + 12 * index
        if at + 12 > len(profile):
            return False
        signature, offset, size = struct.unpack_from(">4sII", profile, at)
        tags[signature] = (offset, size)
    for signature, expected in _SRGB_COLORANTS.items():
        offset, size = tags.get(signature, (0, 0))
        if size < 20 or offset + 20 > len(profile):
            return False
        values = struct.unpack_from(">3i", profile, offset + 8)
        errors = (abs(v / 65536 - e) for v, e in zip(values, expected, strict=True))
        if any(error > _COLORANT_TOLERANCE for error in errors):
            return False
    return True


def _conversion_profile(profile: bytes | None, cmyk: bool) -> bytes | None:
    if profile is None or len(profile) < 132:
        return None
    space = profile[16:20]
    if cmyk:
        return profile if space == b"CMYK" else None
    if space != b"RGB " or is_srgb(profile):
        return None
    return profile


def _jpeg_header_end(encoded: memoryview) -> int:
    """Offset of the first scan (SOS), or the file's end: every marker we read comes before."""
    at = 2
    while at + 4 <= len(encoded):
        if encoded[at] != 0xFF:
            return at
        marker = encoded[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker == 0xDA or marker == 0xD9:
            return at
        at += 2 + (encoded[at + 2] << 8 | encoded[at + 3])
    return min(at, len(encoded))


def _jpeg_colour(head: bytes) -> tuple[bytes | None, int, bool]:
    """(ICC profile, frame component count, Adobe marker present) from a JPEG's headers."""
    chunks: dict[int, bytes] = {}
    components, adobe, at = 3, False, 2
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker = head[at + 1]
        if marker == 0xFF or marker in _JPEG_STANDALONE:
            at += 1 if marker == 0xFF else 2
            continue
        length = head[at + 2] << 8 | head[at + 3]
        body = head[at + 4 : at + 2 + length]
        if marker == 0xE2 and body.startswith(_ICC_PREFIX) and len(body) > 14:
            chunks[body[12]] = body[14:]
        elif marker == 0xEE and body.startswith(_ADOBE_PREFIX):
            adobe = True
        elif marker in _JPEG_SOF and len(body) >= 6:
            components = body[5]
        at += 2 + length
    profile = b"".join(chunks[k] for k in sorted(chunks)) if chunks else None
    return profile, components, adobe


def _png_profile(encoded: memoryview) -> bytes | None:
    """The decompressed `iCCP` profile, if one comes before the image data."""
    at = 8
    while at + 8 <= len(encoded):
        length, chunk_type = struct.unpack_from(">I4s", encoded, at)
        if chunk_type in (b"IDAT", b"IEND"):
            return None
        if chunk_type == b"iCCP":
            body = bytes(encoded[at + 8 : at + 8 + length])
            name_end = body.find(b"\x00")
            if name_end < 0 or name_end + 2 > len(body):
                return None
            try:
                inflater = zlib.decompressobj()
                profile = inflater.decompress(body[name_end + 2 :], MAX_PROFILE_BYTES + 1)
            except zlib.error:
                return None
            return profile
        at += 12 + length
    return None
