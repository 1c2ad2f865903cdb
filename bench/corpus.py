"""Deterministic corpus of photo-like test images, and the manifest that describes it.

Images are synthetic but shaped like photographs: smooth gradients, anti-aliased shapes with hard
edges, and fine grain, so that their JPEG sizes sit in the range of real photos. The same seed
always yields byte-identical files, so benchmark runs on different days compare like with like.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import imagecodecs
import numpy as np

MANIFEST_NAME = "manifest.json"
JPEG_QUALITY = 90
PNG_COMPRESSION = 3
# Real photos at JPEG quality 90 land roughly here (bits per source pixel).
PHOTO_BPP_RANGE = (1.5, 4.0)


@dataclass(frozen=True)
class ImageClass:
    """One kind of input image: its size, container format and encoder options."""

    name: str
    width: int
    height: int
    extension: str
    progressive: bool = False
    alpha: bool = False
    # CMYK as Photoshop writes it (YCCK-coded, Adobe's inverted values), without a profile.
    cmyk: bool = False
    # EXIF orientation written into the file (6: a phone held upright); 1 writes no EXIF.
    orientation: int = 1

    @property
    def is_jpeg(self) -> bool:
        return self.extension == ".jpg"


IMAGE_CLASSES: dict[str, ImageClass] = {
    spec.name: spec
    for spec in (
        ImageClass("jpeg-12mp", 4032, 3024, ".jpg"),
        ImageClass("jpeg-2mp", 1920, 1080, ".jpg"),
        ImageClass("png-2mp", 1920, 1080, ".png"),
        ImageClass("jpeg-small", 640, 480, ".jpg"),
        ImageClass("jpeg-progressive", 1920, 1080, ".jpg", progressive=True),
        ImageClass("png-alpha", 1024, 768, ".png", alpha=True),
        ImageClass("jpeg-cmyk-12mp", 4032, 3024, ".jpg", cmyk=True),
        ImageClass("jpeg-exif-rotated-12mp", 4032, 3024, ".jpg", orientation=6),
        ImageClass("jpeg-progressive-12mp", 4032, 3024, ".jpg", progressive=True),
    )
}


@dataclass(frozen=True)
class CorpusEntry:
    """One file of the corpus as recorded in the manifest (file is relative to the corpus dir)."""

    image_class: str
    file: str
    width: int
    height: int
    bytes: int
    sha256: str

    @property
    def bits_per_pixel(self) -> float:
        return self.bytes * 8 / (self.width * self.height)

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def image_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
    """Random generator for one image, independent of which other classes are generated."""
    return np.random.default_rng([seed, zlib.crc32(class_name.encode()), index])


def _smooth_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Low-resolution float image: a tilted two-colour gradient with soft colour blobs."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1.0) / 2.0
    top, bottom = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    image = bottom + (top - bottom) * ramp[..., None]
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.1, 0.5) * max(width, height)
        weight = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * radius**2))
        image += weight[..., None] * rng.uniform(-60, 60, size=3).astype(np.float32)
    return image


def _draw_shapes(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Draw anti-aliased filled ellipses and polygons in place: the hard edges of objects."""
    height, width = image.shape[:2]
    for _ in range(count):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        if rng.random() < 0.5:
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(4, width // 4)), int(rng.integers(4, height // 4)))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(image, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        else:
            points = rng.integers(0, (width, height), size=(int(rng.integers(3, 7)), 2))
            cv2.fillPoly(image, [points.astype(np.int32)], colour, cv2.LINE_AA)


def _grain(rng: np.random.Generator, width: int, height: int, strength: float) -> np.ndarray:
    """Fine sensor-like grain: half-resolution noise scaled up, plus a small per-pixel tile."""
    half = rng.normal(0, strength, size=((height + 1) // 2, (width + 1) // 2, 1)).astype(np.float32)
    coarse = cv2.resize(half, (width, height), interpolation=cv2.INTER_LINEAR)
    tile = rng.normal(0, strength / 2, size=(64, 64)).astype(np.float32)
    fine = np.tile(tile, ((height + 63) // 64, (width + 63) // 64))[:height, :width]
    return (coarse + fine)[..., None]


def synthesize_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like BGR uint8 image: built at 1/8 scale, upscaled, then detailed at full size."""
    small_w, small_h = max(8, width // 8), max(8, height // 8)
    base = _smooth_background(rng, small_w, small_h)
    _draw_shapes(rng, base, count=int(rng.integers(6, 14)))
    base = cv2.GaussianBlur(base, (0, 0), 0.8)
    image = cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)
    _draw_shapes(rng, image, count=int(rng.integers(4, 10)))
    image += _grain(rng, width, height, strength=float(rng.uniform(7.0, 10.0)))
    return np.clip(image, 0, 255).astype(np.uint8)


def _alpha_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An alpha channel: opaque subject with a soft-edged cut-out and a transparent corner."""
    alpha = np.full((height, width), 255, dtype=np.uint8)
    centre = (int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(0, height)))
    axes = (int(rng.integers(width // 8, width // 3)), int(rng.integers(height // 8, height // 3)))
    cv2.ellipse(alpha, centre, axes, 0.0, 0, 360, 0, -1, cv2.LINE_AA)
    alpha[: height // 5, : width // 5] = 0
    return cv2.GaussianBlur(alpha, (0, 0), 2.0)


def to_adobe_cmyk(bgr: np.ndarray) -> np.ndarray:
    """The naive separation (black where the three inks overlap), stored as Adobe's files
    store it: 255 for no ink."""
    brightest = bgr.max(axis=2)
    paper = np.maximum(brightest, 1).astype(np.uint16)[..., None]
    # 255 - ink, for C, M, Y: (255 - k) x (1 - ink) = the channel scaled by 255 / brightest.
    cmy = (bgr[..., ::-1].astype(np.uint16) * 255 + paper // 2) // paper
    return np.dstack([cmy.astype(np.uint8), brightest])


def exif_orientation_segment(orientation: int) -> bytes:
    """An APP1 segment whose EXIF holds only the Orientation tag."""
    ifd = struct.pack("<HHHIHH", 1, 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def encode_image(image: np.ndarray, spec: ImageClass) -> bytes:
    """Encode with explicit, fixed encoder parameters so output bytes are reproducible."""
    if spec.cmyk:
        cmyk = to_adobe_cmyk(image)
        return bytes(
            imagecodecs.jpeg8_encode(
                cmyk, level=JPEG_QUALITY, colorspace="CMYK", outcolorspace="YCCK"
            )
        )
    if spec.orientation != 1:
        plain = encode_image(image, dataclasses.replace(spec, orientation=1))
        return plain[:2] + exif_orientation_segment(spec.orientation) + plain[2:]
    if spec.is_jpeg:
        params = [
            cv2.IMWRITE_JPEG_QUALITY,
            JPEG_QUALITY,
            cv2.IMWRITE_JPEG_PROGRESSIVE,
            int(spec.progressive),
            cv2.IMWRITE_JPEG_OPTIMIZE,
            0,
        ]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    ok, encoded = cv2.imencode(spec.extension, image, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {spec.name} image")
    return encoded.tobytes()


def generate_image_bytes(spec: ImageClass, seed: int, index: int) -> bytes:
    """The encoded bytes of image `index` of class `spec` for `seed`."""
    rng = image_rng(seed, spec.name, index)
    image = synthesize_photo(rng, spec.width, spec.height)
    if spec.alpha:
        image = np.dstack([image, _alpha_mask(rng, spec.width, spec.height)])
    return encode_image(image, spec)


def write_corpus(
    out_dir: Path, count: int, seed: int, class_names: list[str] | None = None
) -> list[CorpusEntry]:
    """Generate `count` images per class into `out_dir` and write the manifest; return it."""
    names = class_names or list(IMAGE_CLASSES)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in names:
        spec = IMAGE_CLASSES[name]
        for index in range(count):
            payload = generate_image_bytes(spec, seed, index)
            relative = f"{name}/{name}-{index:03d}{spec.extension}"
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / relative).write_bytes(payload)
            digest = hashlib.sha256(payload).hexdigest()
            entries.append(
                CorpusEntry(name, relative, spec.width, spec.height, len(payload), digest)
            )
    write_manifest(out_dir, entries, seed)
    return entries


def write_manifest(out_dir: Path, entries: list[CorpusEntry], seed: int) -> None:
    """Write manifest.json listing every file with its class, size and digest."""
    document = {"seed": seed, "images": [asdict(entry) for entry in entries]}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def read_manifest(corpus_dir: Path) -> list[CorpusEntry]:
    """The entries of a corpus directory's manifest."""
    document = json.loads((corpus_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    return [CorpusEntry(**item) for item in document["images"]]


def bpp_by_class(entries: list[CorpusEntry]) -> dict[str, float]:
    """Mean bits per pixel of each class (the photo-likeness measure for JPEG classes)."""
    totals: dict[str, list[float]] = {}
    for entry in entries:
        totals.setdefault(entry.image_class, []).append(entry.bits_per_pixel)
    return {name: sum(values) / len(values) for name, values in totals.items()}


def is_photo_like(bits_per_pixel: float) -> bool:
    """Whether a JPEG's size per pixel is in the range of real photos at quality 90."""
    low, high = PHOTO_BPP_RANGE
    return low <= bits_per_pixel <= high
