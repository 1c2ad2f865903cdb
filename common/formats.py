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


FORMATS = (
    ImageFormat("png", "image/png", "png", uploadable=True),
    ImageFormat("jpeg", "image/jpeg", "jpg", uploadable=True),
    ImageFormat("webp", "image/webp", "webp", uploadable=False),
    ImageFormat("avif", "image/avif", "avif", uploadable=False),
    ImageFormat("jxl", "image/jxl", "jxl", uploadable=False),
)

# Formats whose encoder takes a quality (0-100); the others are lossless.
LOSSY_FORMATS = ("jpeg", "webp", "avif", "jxl")

# Every format can be a result; the order is the one `OUTPUT_FORMAT`'s error message lists.
OUTPUT_FORMATS = tuple(f.name for f in FORMATS)
CONTENT_TYPE_BY_FORMAT = {f.name: f.content_type for f in FORMATS}
UPLOAD_CONTENT_TYPE_BY_FORMAT = {f.name: f.content_type for f in FORMATS if f.uploadable}
EXTENSION_BY_CONTENT_TYPE = {f.content_type: f.extension for f in FORMATS}
