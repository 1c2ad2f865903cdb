"""The image formats pixelmill reads and writes: each one's name, content type and file extension.

Every part that names a format reads this table: the API (which uploads it accepts and the
content type it records), the engine (the type it labels a result with), object storage (result
keys), configuration (`OUTPUT_FORMAT`, `RENDITIONS`) and the upload client (result file
names). Standard library only, because the upload client imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    """`name` is how `OUTPUT_FORMAT` and `common.imageinfo` spell it; `extension` has no dot."""

    name: str
    content_type: str
    extension: str
    # Whether the API accepts it as an upload: the kernel decodes only these.
    uploadable: bool
    # The widest or tallest image its encoder here writes (see the README's renditions).
    max_dimension: int


# Largest dimensions: PNG's 2^31 - 1 (its spec); libjpeg's JPEG_MAX_DIMENSION, 65500; libwebp's
# 16383, less one, as imagecodecs' WebP encoder refuses 16383 itself; AV1's 65536 (libavif refuses
# more); JPEG XL's 2^30 (libjxl at level 10).
FORMATS = (
    ImageFormat("png", "image/png", "png", uploadable=True, max_dimension=2**31 - 1),
    ImageFormat("jpeg", "image/jpeg", "jpg", uploadable=True, max_dimension=65500),
    ImageFormat("webp", "image/webp", "webp", uploadable=False, max_dimension=16382),
    ImageFormat("avif", "image/avif", "avif", uploadable=False, max_dimension=65536),
    ImageFormat("jxl", "image/jxl", "jxl", uploadable=False, max_dimension=2**30),
)

# Formats whose encoder takes a quality (0-100); the others are lossless.
LOSSY_FORMATS = ("jpeg", "webp", "avif", "jxl")

# Every format can be a result; the order is the one `OUTPUT_FORMAT`'s error message lists.
OUTPUT_FORMATS = tuple(f.name for f in FORMATS)
CONTENT_TYPE_BY_FORMAT = {f.name: f.content_type for f in FORMATS}
MAX_DIMENSION_BY_FORMAT = {f.name: f.max_dimension for f in FORMATS}
UPLOAD_CONTENT_TYPE_BY_FORMAT = {f.name: f.content_type for f in FORMATS if f.uploadable}
EXTENSION_BY_CONTENT_TYPE = {f.content_type: f.extension for f in FORMATS}
