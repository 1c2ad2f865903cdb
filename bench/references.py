"""Reference pipelines the engine's kernel is measured against, each bytes in, bytes out.

Every reference does the job the way a straightforward program would with its library: decode,
shrink to the target width (aspect kept, never upscaled), convert to 8-bit grayscale, encode.
Libraries are imported inside each builder so that a benchmark child process imports only the
one it measures, after its thread settings are in place.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

Renderer = Callable[[bytes], bytes]

# Same quality as engine.kernel.JPEG_QUALITY, so JPEG output sizes and costs compare fairly.
JPEG_OUTPUT_QUALITY = 85
# vips thumbnail fits a width x height box; a huge height makes the width the only constraint.
_UNBOUNDED_HEIGHT = 10_000_000


def scaled_height(width: int, height: int, target_width: int) -> int:
    """Output height for a width-limited shrink that keeps the aspect ratio."""
    return max(1, round(height * target_width / width))


def pillow_renderer(target_width: int, output_format: str) -> Renderer:
    """Pillow, naive: full decode, LANCZOS resize, convert to L, save."""
    from PIL import Image

    pil_format = {"png": "PNG", "jpeg": "JPEG"}[output_format]
    options = {"quality": JPEG_OUTPUT_QUALITY} if output_format == "jpeg" else {}

    def render(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as source:
            image: Image.Image = source
            if image.width > target_width:
                size = (target_width, scaled_height(image.width, image.height, target_width))
                image = image.resize(size, Image.Resampling.LANCZOS)
            gray = image.convert("L")
        out = io.BytesIO()
        gray.save(out, format=pil_format, **options)
        return out.getvalue()

    return render


def vips_renderer(target_width: int, output_format: str) -> Renderer:
    """libvips: thumbnail_buffer (shrink-on-load), colourspace b-w, write to buffer."""
    import pyvips

    # The operation cache would return earlier results for repeated inputs; measure real work.
    pyvips.cache_set_max(0)
    suffix = ".png" if output_format == "png" else f".jpg[Q={JPEG_OUTPUT_QUALITY}]"

    def render(data: bytes) -> bytes:
        image = pyvips.Image.thumbnail_buffer(
            data, target_width, height=_UNBOUNDED_HEIGHT, size="down"
        )
        gray = image.colourspace("b-w")
        if gray.bands > 1:
            gray = gray.extract_band(0)  # drop alpha: the output is plain 8-bit grayscale
        return bytes(gray.write_to_buffer(suffix))

    return render


def opencv_naive_renderer(target_width: int, output_format: str) -> Renderer:
    """OpenCV, naive: full colour decode, cvtColor to gray, INTER_AREA resize, imencode."""
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    extension = ".png" if output_format == "png" else ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_OUTPUT_QUALITY] if output_format == "jpeg" else []

    def render(data: bytes) -> bytes:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError("OpenCV could not decode the image")
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        height, width = gray.shape
        if width > target_width:
            size = (target_width, scaled_height(width, height, target_width))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(extension, gray, params)
        if not ok:
            raise ValueError("OpenCV could not encode the image")
        return encoded.tobytes()

    return render


def vips_renditions_renderer(spec: str) -> Renderer:
    """libvips making the same renditions from one load: thumbnail_buffer to the largest width
    (shrink-on-load, the embedded profile converted to sRGB), then each smaller rendition
    resized from the one before; gray ones through colourspace b-w."""
    import pyvips

    from common.renditions import parse_renditions

    pyvips.cache_set_max(0)
    renditions = sorted(parse_renditions(spec), key=lambda r: r.width, reverse=True)

    def render(data: bytes) -> bytes:
        largest = pyvips.Image.thumbnail_buffer(
            data, renditions[0].width, height=_UNBOUNDED_HEIGHT, size="down"
        )
        if largest.hasalpha():
            largest = largest.flatten(background=[255, 255, 255])
        # Held in memory: every rendition reads it, and the load streams sequentially.
        largest = largest.copy_memory()
        outputs, current = [], largest
        for rendition in renditions:
            if current.width > rendition.width:
                current = current.resize(rendition.width / current.width)
            image = current.colourspace("b-w") if rendition.gray else current
            outputs.append(bytes(image.write_to_buffer(_vips_suffix(rendition))))
        return b"".join(outputs)

    return render


def _vips_suffix(rendition: Any) -> str:
    """libvips's save options for `rendition`: its quality, and for WebP the encoder effort
    pixelmill uses (libwebp's `method`), so the two encoders do the same work."""
    from engine.renditions import WEBP_METHOD

    if rendition.format == "png":
        return ".png"
    if rendition.format == "webp":
        return f".webp[Q={rendition.quality},effort={WEBP_METHOD}]"
    extension = {"jpeg": ".jpg", "avif": ".avif", "jxl": ".jxl"}
    return f"{extension[rendition.format]}[Q={rendition.quality}]"


RENDITION_RENDERERS: dict[str, Callable[[str], Renderer]] = {"vips": vips_renditions_renderer}

REFERENCE_RENDERERS: dict[str, Callable[[int, str], Renderer]] = {
    "pillow": pillow_renderer,
    "vips": vips_renderer,
    "opencv-naive": opencv_naive_renderer,
}
