"""Image header probe: format, stored size, EXIF orientation and decoded sample layout of a JPEG
or PNG, without decoding.

Used at upload time to accept or refuse a file by its content (never its name) and by the engine
to size its decode before touching pixel data. Every read is bounds-checked: hostile bytes give
None (or orientation 1), never an exception.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass, field

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"

# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) share the range.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..RST7 (SOI is consumed before the walk).
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_END_OF_HEADERS = frozenset({0xD9, 0xDA})  # EOI, SOS: no frame header can follow in time
_JPEG_SOS = 0xDA
# SOF2, SOF6, SOF10, SOF14: progressive frames, decoded through a whole-image coefficient buffer.
_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_APP1 = 0xE1
_EXIF_PREFIX = b"Exif\x00\x00"
_EXIF_ORIENTATION_TAG = 0x0112
_TIFF_SHORT = 3
_TIFF_BYTE_ORDERS = {b"II": "<", b"MM": ">"}

# Allowed PNG bit depths per colour type (PNG spec, table 11.1).
_PNG_BIT_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
_PNG_MAX_DIMENSION = 2**31 - 1
# Samples per pixel as decoded (palette expanded to RGB); a tRNS chunk adds an alpha channel.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_TRNS_GAINS_ALPHA = frozenset({0, 2, 3})
# Chunks or segments walked past the frame header before assuming the costlier layout (alpha,
# whole-image coefficients): bounds the work a hostile file of tiny chunks can cause.
_MAX_LAYOUT_WALK = 1000


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: format, stored size (before EXIF rotation) and EXIF orientation."""

    format: str  # "jpeg" | "png"
    width: int
    height: int
    orientation: int = 1  # EXIF 1..8; 1 when absent or unreadable
    # How the decoder will hold the pixels (see common.decode_budget); not part of equality.
    channels: int = field(default=1, compare=False)  # samples per pixel once decoded
    sample_bytes: int = field(default=1, compare=False)  # 2 for 16-bit PNG samples
    # JPEG only: (horizontal, vertical) sampling factors of each component.
    sampling: tuple[tuple[int, int], ...] = field(default=(), compare=False)
    # JPEG only: progressive or multi-scan, so libjpeg keeps every DCT coefficient at once.
    whole_image_coefficients: bool = field(default=False, compare=False)

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown to a viewer: orientations 5-8 swap the stored axes."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe(data: bytes | memoryview) -> ImageHeader | None:
    """Return the header of a JPEG or PNG recognised by its magic bytes, or None for anything else.

    None also covers files truncated before their dimensions and headers that are malformed.
    """
    view = _byte_view(data)
    if view is None:
        return None
    if view[:8] == PNG_SIGNATURE:
        return _probe_png(view)
    if view[:3] == JPEG_SOI:
        return _probe_jpeg(view)
    return None


def _byte_view(data: bytes | memoryview) -> memoryview | None:
    try:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError):
        return None
    return view


def _probe_png(view: memoryview) -> ImageHeader | None:
    """Validate the IHDR chunk that must follow the signature, CRC included."""
    chunk = view[8:33]  # length (4) + type (4) + 13 data bytes + CRC (4)
    if len(chunk) < 25:
        return None
    length, chunk_type = struct.unpack_from(">I4s", chunk)
    if length != 13 or chunk_type != b"IHDR":
        return None
    (crc,) = struct.unpack_from(">I", chunk, 21)
    if zlib.crc32(chunk[4:21]) != crc:
        return None
    width, height, bit_depth, colour_type = struct.unpack_from(">IIBB", chunk, 8)
    if not (0 < width <= _PNG_MAX_DIMENSION and 0 < height <= _PNG_MAX_DIMENSION):
        return None
    if bit_depth not in _PNG_BIT_DEPTHS.get(colour_type, ()):
        return None
    channels = _PNG_CHANNELS[colour_type]
    if colour_type in _PNG_TRNS_GAINS_ALPHA and _png_has_transparency(view):
        channels += 1
    return ImageHeader(
        "png", width, height, channels=channels, sample_bytes=2 if bit_depth == 16 else 1
    )


def _png_has_transparency(view: memoryview) -> bool:
    """Whether a tRNS chunk comes before the image data (where the spec puts it); past
    _MAX_LAYOUT_WALK chunks without reaching the data, assume it does."""
    pos = 33  # after the signature and IHDR
    for _ in range(_MAX_LAYOUT_WALK):
        if pos + 8 > len(view):
            return False
        length, chunk_type = struct.unpack_from(">I4s", view, pos)
        if chunk_type == b"tRNS":
            return True
        if chunk_type in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length  # length, type, data, CRC
    return True


def _probe_jpeg(view: memoryview) -> ImageHeader | None:
    """Walk the marker segments after SOI up to the first frame header (SOFn)."""
    orientation = 1
    seen_exif = False
    pos = 2
    while True:
        marker, pos = _next_jpeg_marker(view, pos)
        if marker is None or marker in _JPEG_END_OF_HEADERS:
            return None
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if pos + 2 > len(view):
            return None
        (length,) = struct.unpack_from(">H", view, pos)
        segment = view[pos + 2 : pos + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker in _JPEG_SOF_MARKERS:
            header = _jpeg_frame_header(segment, orientation)
            if header is None or marker in _JPEG_PROGRESSIVE_SOF:
                return header
            return _with_scan_layout(header, view, pos + length)
        if marker == _JPEG_APP1 and not seen_exif and segment[:6] == _EXIF_PREFIX:
            seen_exif = True
            orientation = exif_orientation(segment[6:])
        pos += length


def _next_jpeg_marker(view: memoryview, pos: int) -> tuple[int | None, int]:
    """Return (marker byte, position after it); fill bytes 0xFF before a marker are skipped."""
    if pos >= len(view) or view[pos] != 0xFF:
        return None, pos
    while pos < len(view) and view[pos] == 0xFF:
        pos += 1
    if pos >= len(view) or view[pos] == 0x00:
        return None, pos
    return view[pos], pos + 1


def _jpeg_frame_header(segment: memoryview, orientation: int) -> ImageHeader | None:
    if len(segment) < 6:
        return None
    _precision, height, width, components = struct.unpack_from(">BHHB", segment)
    if width == 0 or height == 0 or components == 0:
        return None  # height 0 means "defined later by DNL", which decoders here do not support
    if len(segment) < 6 + 3 * components:
        return None
    # Each component: id, sampling factors (high nibble horizontal), quantisation table.
    factors = [segment[6 + 3 * index + 1] for index in range(components)]
    sampling = tuple((max(1, f >> 4), max(1, f & 0x0F)) for f in factors)
    return ImageHeader(
        "jpeg",
        width,
        height,
        orientation,
        channels=components,
        sampling=sampling,
        whole_image_coefficients=True,  # until the first scan shows otherwise
    )


def _with_scan_layout(header: ImageHeader, view: memoryview, pos: int) -> ImageHeader:
    """A sequential JPEG whose first scan carries every component decodes row by row; one
    whose scans split the components keeps every coefficient (as does a file cut short)."""
    for _ in range(_MAX_LAYOUT_WALK):
        marker, pos = _next_jpeg_marker(view, pos)
        if marker is None or marker == 0xD9:
            return header
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if pos + 3 > len(view):
            return header
        length, scan_components = struct.unpack_from(">HB", view, pos)
        if marker == _JPEG_SOS:
            interleaved = scan_components >= header.channels
            return dataclasses.replace(header, whole_image_coefficients=not interleaved)
        pos += length
    return header


def exif_orientation(tiff: bytes | memoryview) -> int:
    """Return the Orientation tag (1..8) of IFD0 in a TIFF-structured EXIF block, else 1."""
    header = bytes(tiff[:8])
    if len(header) < 8 or header[:2] not in _TIFF_BYTE_ORDERS:
        return 1
    order = _TIFF_BYTE_ORDERS[header[:2]]
    magic, ifd_offset = struct.unpack(order + "HI", header[2:8])
    if magic != 42 or ifd_offset + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd_offset)
    for index in range(count):
        entry = ifd_offset + 2 + 12 * index
        if entry + 12 > len(tiff):
            return 1
        tag, value_type, value_count = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == _EXIF_ORIENTATION_TAG:
            if value_type != _TIFF_SHORT or value_count < 1:
                return 1
            (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
            return value if 1 <= value <= 8 else 1
    return 1
