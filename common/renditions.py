"""Renditions: the named outputs a deployment makes of every image, as `RENDITIONS` spells them.

`RENDITIONS=default:800:gray:png, thumb:200:color:webp:80` names each output as
`name:width:gray|color:format[:quality]`. The first rendition is the image's main result (its
`download_url`, its `results/<id>.<ext>` key); the others are stored beside it. Standard library
only: configuration, the API, the engine and the upload client all read it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.formats import LOSSY_FORMATS, MAX_DIMENSION_BY_FORMAT, OUTPUT_FORMATS

MODES = ("gray", "color")
DEFAULT_QUALITY = {"jpeg": 85, "webp": 85, "avif": 60, "jxl": 80}
MAX_RENDITIONS = 8
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class RenditionSpecError(ValueError):
    """A rendition list that cannot be read; the message says which part and why."""


@dataclass(frozen=True)
class Rendition:
    """One output: `width` is a maximum (never upscaled, aspect kept); `quality` only for the
    lossy formats (0 for the others)."""

    name: str
    width: int
    mode: str
    format: str
    quality: int = 0

    @property
    def gray(self) -> bool:
        return self.mode == "gray"

    def spelled(self) -> str:
        """The rendition as `RENDITIONS` spells it."""
        tail = f":{self.quality}" if self.format in LOSSY_FORMATS else ""
        return f"{self.name}:{self.width}:{self.mode}:{self.format}{tail}"


def target_size(width: int, height: int, target_width: int) -> tuple[int, int]:
    """Return the output size: `target_width` wide with the aspect kept, never upscaled.

    Images narrower than the target keep their size; the height is rounded and never 0.
    """
    if width < 1 or height < 1 or target_width < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height} -> {target_width}")
    if width <= target_width:
        return width, height
    scaled_height = (2 * height * target_width + width) // (2 * width)  # round half up, exact
    return target_width, max(1, scaled_height)


def oversized_reason(width: int, height: int, renditions: Iterable[Rendition]) -> str | None:
    """Why an image displayed at width x height cannot have one of `renditions`: that output
    would be past its format's largest dimension (a WebP thumbnail of a very tall strip).
    None when every output fits. The API refuses such an upload (422) and the engine the image,
    before anything is decoded."""
    for rendition in renditions:
        out_width, out_height = target_size(width, height, rendition.width)
        limit = MAX_DIMENSION_BY_FORMAT[rendition.format]
        if max(out_width, out_height) > limit:
            return (
                f"image is {width}x{height}: its {rendition.name!r} rendition would be "
                f"{out_width}x{out_height} pixels, over the {rendition.format.upper()} limit "
                f"of {limit} pixels per side"
            )
    return None


def default_renditions(target_width: int, output_format: str) -> tuple[Rendition, ...]:
    """What a deployment without `RENDITIONS` makes: one gray image, as before renditions."""
    return (_rendition("default", target_width, "gray", output_format, None),)


def parse_renditions(spec: str) -> tuple[Rendition, ...]:
    """Read a comma-separated rendition list; RenditionSpecError names the faulty entry."""
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not entries:
        raise RenditionSpecError("names no rendition")
    if len(entries) > MAX_RENDITIONS:
        raise RenditionSpecError(f"names {len(entries)} renditions, at most {MAX_RENDITIONS}")
    renditions = tuple(_parse_entry(entry) for entry in entries)
    names = [r.name for r in renditions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RenditionSpecError(f"names {', '.join(duplicates)} more than once")
    return renditions


def select(renditions: Sequence[Rendition], names: Iterable[str] | None) -> tuple[Rendition, ...]:
    """The renditions among `renditions` named in `names` (all of them for None), in
    configuration order. Unknown names raise RenditionSpecError."""
    if names is None:
        return tuple(renditions)
    wanted = set(names)
    unknown = wanted - {r.name for r in renditions}
    if unknown:
        known = ", ".join(r.name for r in renditions)
        raise RenditionSpecError(
            f"no rendition named {', '.join(sorted(unknown))} (known: {known})"
        )
    return tuple(r for r in renditions if r.name in wanted)


def _parse_entry(entry: str) -> Rendition:
    parts = entry.split(":")
    if len(parts) not in (4, 5):
        raise RenditionSpecError(f"{entry!r} is not name:width:gray|color:format[:quality]")
    name, width, mode, image_format = (p.strip().lower() for p in parts[:4])
    quality = parts[4].strip() if len(parts) == 5 else None
    if not width.isdigit():
        raise RenditionSpecError(f"{entry!r}: width {width!r} is not a positive integer")
    if quality is not None and not quality.isdigit():
        raise RenditionSpecError(f"{entry!r}: quality {quality!r} is not an integer 1-100")
    return _rendition(
        name, int(width), mode, image_format, None if quality is None else int(quality), entry
    )


def _rendition(
    name: str, width: int, mode: str, image_format: str, quality: int | None, entry: str = ""
) -> Rendition:
    where = f"{entry or name!r}: "
    if not _NAME.match(name):
        raise RenditionSpecError(f"{where}name must be a-z, 0-9, - or _ (a letter first)")
    if not 1 <= width <= 65535:
        raise RenditionSpecError(f"{where}width must be 1-65535")
    if mode not in MODES:
        raise RenditionSpecError(f"{where}{mode!r} is not gray or color")
    if image_format not in OUTPUT_FORMATS:
        raise RenditionSpecError(f"{where}format must be one of {', '.join(OUTPUT_FORMATS)}")
    if width > MAX_DIMENSION_BY_FORMAT[image_format]:
        limit = MAX_DIMENSION_BY_FORMAT[image_format]
        raise RenditionSpecError(f"{where}{image_format} images are at most {limit} pixels wide")
    if image_format not in LOSSY_FORMATS:
        if quality is not None:
            raise RenditionSpecError(f"{where}{image_format} is lossless and takes no quality")
        return Rendition(name, width, mode, image_format)
    if quality is None:
        quality = DEFAULT_QUALITY[image_format]
    if not 1 <= quality <= 100:
        raise RenditionSpecError(f"{where}quality must be 1-100")
    return Rendition(name, width, mode, image_format, quality)
