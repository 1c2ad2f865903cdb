"""Renditions: `RENDITIONS`, every output of an image from one decode, colour management, and the
API that asks for, lists, serves and deletes them.

Pixel tolerance: each output is compared with a reference made by Pillow from the same file (EXIF
orientation applied, ICC profile converted to sRGB by ImageCms, alpha composited onto white, one
box-filter resize to the output size). Lossless outputs (PNG) must be within a mean absolute
difference of 2 levels per channel and a worst pixel of 64; lossy ones (JPEG, WebP, AVIF, JPEG
XL) within a mean of 4 and a worst pixel of 128. The worst pixels lie on the hard edges of the
test photos, where a reduced-scale DCT decode and 2x2 box halvings place an edge a little
differently from one box resize. A missing colour conversion, a swapped channel, a wrong
orientation or black behind alpha moves the mean by far more (the Display P3 test shows it).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageOps

from common.config import ConfigError, Settings
from common.renditions import Rendition, parse_renditions
from engine import renditions as renditions_module
from engine.colour import is_srgb
from engine.kernel import ImageRejected, render_grayscale, target_size
from engine.renditions import RenditionImage, render_renditions
from tests.support import (
    API_RENDITIONS,
    ApiClient,
    StackProbe,
    completed_image,
    jpeg,
    multipart,
    renditions_once_made,
    tall_strip_png,
    without_adobe_marker,
)
from tests.test_imageinfo import exif_app1, with_segment
from tests.test_kernel import jpeg_of, photo_rgb, pillow_bytes

LOSSLESS = (2.0, 64)  # (mean absolute difference, worst pixel)
LOSSY = (4.0, 128)
THREE = parse_renditions("default:800:gray:png, mid:400:color:webp:80, small:160:color:jpeg:85")
DISPLAY_P3 = [0.680, 0.320, 0.265, 0.690, 0.150, 0.060]
D65 = [0.3127, 0.3290]


# --- profiles and files ----------------------------------------------------------------------


def display_p3_profile() -> bytes:
    """Display P3's primaries and white point, a 2.2 gamma curve: built by lcms2."""
    return bytes(imagecodecs.cms_profile("rgb", primaries=DISPLAY_P3, whitepoint=D65, gamma=2.2))


def cmyk_profile() -> bytes:
    """A small ICC v2 input profile CMYK -> Lab (lut8, 5 grid points per ink) modelling inks
    that are not the naive complement of RGB: the cyan ink leaks into green."""
    grid = np.linspace(0.0, 1.0, 5)
    c, m, y, k = np.meshgrid(grid, grid, grid, grid, indexing="ij")
    red = (1 - c) * (1 - k)
    green = (1 - m) * (1 - 0.35 * c) * (1 - k)
    blue = (1 - y) * (1 - k)
    lab = _srgb_to_lab(np.stack([red, green, blue], axis=-1).reshape(-1, 3))
    encoded = np.empty_like(lab)
    encoded[:, 0] = lab[:, 0] * 255 / 100
    encoded[:, 1:] = lab[:, 1:] + 128
    clut = np.clip(np.rint(encoded), 0, 255).astype(np.uint8).tobytes()
    ramp = bytes(range(256))
    identity = struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)
    lut = b"mft1" + b"\0" * 4 + bytes([4, 3, 5, 0]) + identity + ramp * 4 + clut + ramp * 3
    white = b"XYZ " + b"\0" * 4 + struct.pack(">3i", 63190, 65536, 54061)
    return _icc(b"scnr", b"CMYK", b"Lab ", {b"A2B0": lut, b"wtpt": white})


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz_d50 = np.array(
        [[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606], [0.0139, 0.0971, 0.7141]]
    )
    xyz = linear @ to_xyz_d50.T / np.array([0.9642, 1.0, 0.8249])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=-1
    )


def _icc(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    table_size = 4 + 12 * len(tags)
    offset, entries, bodies = 128 + table_size, b"", b""
    for signature, body in tags.items():
        body += b"\0" * (-len(body) % 4)
        entries += struct.pack(">4sII", signature, offset + len(bodies), len(body))
        bodies += body
    size = 128 + table_size + len(bodies)
    header = struct.pack(">I4sI4s4s4s", size, b"lcms", 0x02100000, device_class, space, pcs)
    header += b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
    header += struct.pack(">3i", 63190, 65536, 54061) + b"\0" * 48
    return header + struct.pack(">I", len(tags)) + entries + bodies


def tagged_png(rgb: np.ndarray, profile: bytes) -> bytes:
    return pillow_bytes(Image.fromarray(rgb), "PNG", icc_profile=profile)


def tagged_jpeg(rgb: np.ndarray, profile: bytes) -> bytes:
    return pillow_bytes(Image.fromarray(rgb), "JPEG", quality=95, icc_profile=profile)


# --- reference and comparison ----------------------------------------------------------------


def reference(data: bytes, width: int, gray: bool) -> np.ndarray:
    """Pillow's rendering of `data` at `width`: oriented, converted to sRGB, on white, boxed."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert image is not None
    profile = image.info.get("icc_profile")
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        if profile:
            colour = _to_srgb(rgba.convert("RGB"), profile)
            rgba = Image.merge("RGBA", (*colour.split(), rgba.getchannel("A")))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    elif profile:
        image = _to_srgb(image, profile)
    else:
        image = image.convert("RGB")
    size = target_size(image.width, image.height, width)
    image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image.convert("L") if gray else image)


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    converted = ImageCms.profileToProfile(
        image, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
    )
    assert converted is not None
    return converted


def pixels(output: RenditionImage) -> np.ndarray:
    """The output decoded: 2-D for gray, HxWx3 R, G, B for colour."""
    if output.content_type == "image/jxl":
        decoded = imagecodecs.jpegxl_decode(output.data)
    else:
        decoded = np.asarray(Image.open(io.BytesIO(output.data)))
    assert decoded.shape[:2] == (output.height, output.width)
    return decoded


def differences(actual: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    if actual.ndim == 3 and expected.ndim == 2:  # gray WebP decodes as RGB
        actual = cv2.cvtColor(actual, cv2.COLOR_RGB2GRAY)
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    return float(difference.mean()), int(difference.max())


def assert_matches(output: RenditionImage, data: bytes, rendition: Rendition) -> None:
    expected = reference(data, rendition.width, rendition.gray)
    mean, worst = differences(pixels(output), expected)
    mean_bound, worst_bound = LOSSLESS if rendition.format == "png" else LOSSY
    assert mean <= mean_bound and worst <= worst_bound, (rendition.name, mean, worst)


# --- configuration ---------------------------------------------------------------------------


def local(**variables: str) -> Settings:
    return Settings.from_env({"PIXELMILL_ENV": "local", **variables})


def test_unset_renditions_is_one_gray_rendition_of_target_width_and_output_format() -> None:
    engine = local(TARGET_WIDTH="640", OUTPUT_FORMAT="jpeg").engine

    assert engine.renditions == (Rendition("default", 640, "gray", "jpeg", 85),)


def test_renditions_setting_reads_name_width_mode_format_and_quality() -> None:
    spec = "default:800:gray:png, thumb:200:color:webp:80, preview:1600:COLOR:avif"

    engine = local(RENDITIONS=spec).engine

    assert engine.renditions == (
        Rendition("default", 800, "gray", "png"),
        Rendition("thumb", 200, "color", "webp", 80),
        Rendition("preview", 1600, "color", "avif", 60),
    )


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("a:800:gray", "is not name:width"),
        ("a:0:gray:png", "width must be"),
        ("a:800:sepia:png", "is not gray or color"),
        ("a:800:gray:gif", "format must be one of"),
        ("a:800:gray:png:80", "lossless and takes no quality"),
        ("a:800:gray:jpeg:101", "quality must be 1-100"),
        ("a:800:gray:png, a:200:color:png", "names a more than once"),
        ("A b:800:gray:png", "name must be"),
        ("a:20000:color:webp", "webp images are at most 16382 pixels wide"),
    ],
)
def test_a_malformed_renditions_setting_is_refused_naming_the_variable(
    spec: str, complaint: str
) -> None:
    with pytest.raises(ConfigError, match=f"^RENDITIONS .*{complaint}"):
        local(RENDITIONS=spec)


# --- one decode, every rendition --------------------------------------------------------------


@pytest.mark.parametrize("source", ["jpeg", "png"])
def test_the_default_rendition_is_byte_for_byte_the_gray_render(source: str) -> None:
    rgb = photo_rgb(1200, 900)
    data = jpeg_of(rgb) if source == "jpeg" else pillow_bytes(Image.fromarray(rgb), "PNG")
    only = local().engine.renditions

    [output] = render_renditions(data, only).images

    assert output.data == render_grayscale(data).data


def test_every_rendition_of_an_srgb_jpeg_matches_pillow() -> None:
    data = jpeg_of(photo_rgb(2400, 1600), [cv2.IMWRITE_JPEG_QUALITY, 95])
    wanted = (*THREE, Rendition("png", 300, "color", "png"))

    rendered = render_renditions(data, wanted)

    assert [o.name for o in rendered.images] == [r.name for r in wanted]
    assert [(o.width, o.height) for o in rendered.images] == [
        (800, 533),
        (400, 267),
        (160, 107),
        (300, 200),
    ]
    for output, rendition in zip(rendered.images, wanted, strict=True):
        assert_matches(output, data, rendition)


def test_renditions_come_from_one_decode_at_the_largest_ones_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decodes: list[tuple[int, ...]] = []
    real = renditions_module.decode_colour

    def counted(*args: Any) -> np.ndarray:
        image = real(*args)
        decodes.append(image.shape)
        return image

    monkeypatch.setattr(renditions_module, "decode_colour", counted)
    data = jpeg_of(photo_rgb(3200, 2400))

    render_renditions(data, THREE)

    # One decode, at 1/4 scale: 800 px wide, the most the 800 px rendition needs.
    assert decodes == [(600, 800, 3)]


def test_renditions_wider_than_the_source_keep_its_size() -> None:
    data = jpeg_of(photo_rgb(300, 200))

    rendered = render_renditions(data, THREE)

    assert [(o.width, o.height) for o in rendered.images] == [(300, 200), (300, 200), (160, 107)]


@pytest.mark.parametrize("image_format", ["avif", "jxl"])
def test_avif_and_jpeg_xl_renditions_match_pillow(image_format: str) -> None:
    data = jpeg_of(photo_rgb(1200, 800), [cv2.IMWRITE_JPEG_QUALITY, 95])
    rendition = Rendition("modern", 300, "color", image_format, 90)

    [output] = render_renditions(data, [rendition]).images

    assert output.content_type == f"image/{image_format}"
    assert_matches(output, data, rendition)


# --- colour management ------------------------------------------------------------------------


def adobe_rgb_profile() -> bytes:
    return bytes(imagecodecs.cms_profile("adobergb"))


@pytest.mark.parametrize("profile", [display_p3_profile, adobe_rgb_profile])
def test_wide_gamut_png_is_converted_to_srgb_for_colour_and_gray_outputs(
    profile: Any,
) -> None:
    rgb = photo_rgb(1000, 700)
    data = tagged_png(rgb, profile())
    wanted = (Rendition("colour", 500, "color", "png"), Rendition("gray", 250, "gray", "png"))

    rendered = render_renditions(data, wanted)

    for output, rendition in zip(rendered.images, wanted, strict=True):
        assert_matches(output, data, rendition)
    # Without the conversion the colours are visibly off: the test can tell.
    unconverted = np.asarray(Image.fromarray(rgb).resize((500, 350), Image.Resampling.BOX))
    assert differences(pixels(rendered.images[0]), unconverted)[0] > 3 * LOSSLESS[0]


def test_a_gray_only_deployment_converts_a_display_p3_jpeg_before_graying() -> None:
    rgb = photo_rgb(1600, 1200)
    data = tagged_jpeg(rgb, display_p3_profile())
    [gray] = local().engine.renditions

    [output] = render_renditions(data, [gray]).images

    assert_matches(output, data, gray)
    assert output.data != render_renditions(jpeg_of(rgb), [gray]).images[0].data


def test_cmyk_jpeg_with_its_profile_matches_pillow_imagecms() -> None:
    cmyk = Image.fromarray(photo_rgb(900, 600)).convert("CMYK")
    data = pillow_bytes(cmyk, "JPEG", quality=95, icc_profile=cmyk_profile())
    wanted = (Rendition("colour", 450, "color", "png"), Rendition("gray", 300, "gray", "png"))

    rendered = render_renditions(data, wanted)

    for output, rendition in zip(rendered.images, wanted, strict=True):
        assert_matches(output, data, rendition)


@pytest.mark.parametrize("adobe", [True, False], ids=["adobe-inverted", "ink"])
def test_cmyk_jpeg_without_a_profile_matches_pillows_naive_conversion(adobe: bool) -> None:
    rgb = photo_rgb(900, 600)
    pillows = pillow_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    # Pillow stores Adobe's inverted values, and reads every CMYK JPEG so; without the Adobe
    # marker the values are ink (libjpeg's and libvips' reading too): the same picture.
    ink = np.dstack([255 - rgb, np.zeros(rgb.shape[:2], np.uint8)])
    encoded = imagecodecs.jpeg8_encode(ink, level=95, colorspace="CMYK", outcolorspace="CMYK")
    data = pillows if adobe else without_adobe_marker(bytes(encoded))
    wanted = (Rendition("colour", 450, "color", "png"), Rendition("gray", 300, "gray", "png"))

    rendered = render_renditions(data, wanted)

    for output, rendition in zip(rendered.images, wanted, strict=True):
        assert_matches(output, pillows, rendition)


def icc_segments(profile: bytes) -> bytes:
    """`profile` in as many APP2 ICC_PROFILE segments as it needs (65519 bytes each)."""
    chunks = [profile[at : at + 65519] for at in range(0, len(profile), 65519)]
    segments = b""
    for number, chunk in enumerate(chunks, 1):
        body = b"ICC_PROFILE\x00" + bytes([number, len(chunks)]) + chunk
        segments += b"\xff\xe2" + struct.pack(">H", len(body) + 2) + body
    return segments


def huge_profile(size: int) -> bytes:
    """An RGB display profile header padded to `size` bytes."""
    return _icc(b"mntr", b"RGB ", b"XYZ ", {b"pad ": b"\0" * (size - 144)})


def test_a_jpeg_or_png_whose_icc_profile_is_over_4_mb_is_refused_with_the_reason() -> None:
    small = jpeg_of(photo_rgb(64, 48))
    over = 4 * 1024 * 1024 + 1024
    tagged_jpeg_file = small[:2] + icc_segments(huge_profile(over)) + small[2:]
    iccp = b"srgb\x00\x00" + zlib.compress(huge_profile(over))
    plain_png = pillow_bytes(Image.fromarray(photo_rgb(64, 48)), "PNG")
    chunk = struct.pack(">I", len(iccp)) + b"iCCP" + iccp
    chunk += struct.pack(">I", zlib.crc32(b"iCCP" + iccp))
    tagged_png_file = plain_png[:33] + chunk + plain_png[33:]
    near = small[:2] + icc_segments(huge_profile(4 * 1024 * 1024 - 4096)) + small[2:]

    for data in (tagged_jpeg_file, tagged_png_file):
        with pytest.raises(ImageRejected, match="ICC colour profile is larger than the 4 MB limit"):
            render_renditions(data, BOTH)
    assert len(render_renditions(near, BOTH).images) == 2  # under the cap: rendered


def test_colour_outputs_are_tagged_srgb_in_each_formats_own_way() -> None:
    data = jpeg_of(photo_rgb(600, 400))
    wanted = parse_renditions(
        "p:100:color:png, j:100:color:jpeg, w:100:color:webp, a:100:color:avif"
    )

    png, jpeg, webp, avif = render_renditions(data, wanted).images

    assert b"sRGB" in png.data[: png.data.index(b"IDAT")]
    for tagged in (jpeg, webp):
        profile = Image.open(io.BytesIO(tagged.data)).info["icc_profile"]
        description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile)))
        assert "sRGB" in description
    # AVIF: an nclx colour box with BT.709 primaries (1) and the sRGB transfer (13).
    colr = avif.data.index(b"colrnclx")
    assert struct.unpack(">HH", avif.data[colr + 8 : colr + 12]) == (1, 13)


# --- orientation, alpha, depth, metadata ------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_to_every_rendition(orientation: int) -> None:
    stored = photo_rgb(1200, 700, seed=orientation)
    data = with_segment(jpeg_of(stored, [cv2.IMWRITE_JPEG_QUALITY, 95]), exif_app1(orientation))
    wanted = (Rendition("colour", 300, "color", "png"), Rendition("gray", 150, "gray", "png"))

    rendered = render_renditions(data, wanted)

    for output, rendition in zip(rendered.images, wanted, strict=True):
        assert_matches(output, data, rendition)
    expected_size = (300, 514) if orientation >= 5 else (300, 175)
    assert (rendered.images[0].width, rendered.images[0].height) == expected_size


def test_alpha_is_composited_onto_white_in_colour_renditions() -> None:
    rgba = np.dstack([photo_rgb(800, 600), np.zeros((600, 800), np.uint8)])
    rgba[:, 400:, 3] = 255
    rgba[:, 300:400, 3] = np.linspace(0, 255, 100, dtype=np.uint8)
    data = tagged_png(rgba, display_p3_profile())
    rendition = Rendition("colour", 400, "color", "png")

    [output] = render_renditions(data, [rendition]).images

    assert_matches(output, data, rendition)
    assert pixels(output)[:, :140].min() >= 250  # transparent: white, not black


def test_16_bit_display_p3_png_matches_its_8_bit_rendering() -> None:
    rgb8 = photo_rgb(900, 600)
    rgb16 = rgb8.astype(np.uint16) * 257
    profile = display_p3_profile()
    data16 = bytes(imagecodecs.png_encode(rgb16))
    chunk = _png_chunk(b"iCCP", b"p3\x00\x00" + zlib.compress(profile))
    data16 = data16[:33] + chunk + data16[33:]  # right after IHDR
    rendition = Rendition("colour", 300, "color", "png")

    [output] = render_renditions(data16, [rendition]).images

    expected = reference(tagged_png(rgb8, profile), 300, gray=False)
    mean, worst = differences(pixels(output), expected)
    assert mean <= LOSSLESS[0] and worst <= LOSSLESS[1], (mean, worst)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_16_bit_png_keeps_its_colours_in_colour_renditions() -> None:
    rgb8 = photo_rgb(900, 600)
    # Low bytes that must not matter (rounding to 8 bits keeps the high byte's value).
    rgb16 = rgb8.astype(np.uint16) * 257 + np.where(rgb8 < 255, 100, 0).astype(np.uint16)
    data = bytes(imagecodecs.png_encode(rgb16))
    rendition = Rendition("colour", 300, "color", "png")

    [output] = render_renditions(data, [rendition]).images

    expected = np.asarray(Image.fromarray(rgb8).resize((300, 200), Image.Resampling.BOX))
    mean, worst = differences(pixels(output), expected)
    assert mean <= LOSSLESS[0] and worst <= LOSSLESS[1], (mean, worst)


def test_no_output_carries_exif_gps_or_xmp() -> None:
    source = Image.fromarray(photo_rgb(800, 600))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation
    exif[0x010F] = "PhoneMaker"
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}  # GPS latitude
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">secret-place</x:xmpmeta>'
    data = pillow_bytes(
        source, "JPEG", exif=exif.tobytes(), xmp=xmp, icc_profile=display_p3_profile()
    )
    wanted = parse_renditions(
        "a:200:gray:png, b:200:color:png, c:200:color:jpeg, d:200:color:webp, "
        "e:200:color:avif, f:200:color:jxl, g:200:gray:jpeg"
    )

    for output in render_renditions(data, wanted).images:
        for marker in (b"Exif", b"PhoneMaker", b"secret-place", b"xmpmeta"):
            assert marker not in output.data, (output.name, marker)


# --- hostile colour metadata -----------------------------------------------------------------

COLOUR_SEEDS = [
    tagged_jpeg(photo_rgb(96, 64), display_p3_profile()),
    tagged_png(photo_rgb(96, 64), display_p3_profile()),
    pillow_bytes(
        Image.fromarray(photo_rgb(96, 64)).convert("CMYK"), "JPEG", icc_profile=cmyk_profile()
    ),
    tagged_png(np.dstack([photo_rgb(96, 64), photo_rgb(96, 64)[:, :, 0]]), display_p3_profile()),
]
BOTH = parse_renditions("g:48:gray:png, c:32:color:webp:80")


@st.composite
def mutated_colour_image(draw: st.DrawFn) -> bytes:
    """A colour-managed file with bytes changed in its headers (where the profile lies)."""
    data = bytearray(draw(st.sampled_from(COLOUR_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, min(len(data) - 1, 1200)))
        data[position] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_colour_image())
def test_damaged_profiles_and_headers_only_render_or_raise_image_rejected(data: bytes) -> None:
    try:
        rendered = render_renditions(data, BOTH, max_pixels=4_000_000)
    except ImageRejected as exc:
        assert str(exc)
        return
    for output in rendered.images:
        assert pixels(output).shape[:2] == (output.height, output.width)


def test_a_profile_lcms2_cannot_use_renders_the_values_unconverted() -> None:
    rgb = photo_rgb(600, 400)
    profile = bytearray(display_p3_profile())
    profile[128:132] = (1).to_bytes(4, "big")  # one tag left: the colorants and curves are gone
    broken = tagged_png(rgb, bytes(profile))
    wanted = (Rendition("colour", 300, "color", "png"),)

    [output] = render_renditions(broken, wanted).images

    [plain] = render_renditions(pillow_bytes(Image.fromarray(rgb), "PNG"), wanted).images
    assert np.array_equal(pixels(output), pixels(plain))


def test_an_srgb_tagged_file_keeps_the_gray_fast_path() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = tagged_jpeg(photo_rgb(1200, 900), srgb)
    [gray] = local().engine.renditions

    [output] = render_renditions(data, [gray]).images

    assert is_srgb(srgb) and not is_srgb(display_p3_profile())
    # Byte for byte the JPEG decoded straight to gray: no colour decode, no conversion.
    assert output.data == render_grayscale(data).data


# --- the image row ----------------------------------------------------------------------------


def _claimed_image(conn: Any, requested: str | None) -> Any:
    from db import images

    image_id = uuid.uuid4()
    new = images.NewImage(
        image_id, "renditions-test", "a.jpg", "image/jpeg", 10, "x", 4, 4, f"originals/{image_id}"
    )
    images.insert_images(conn, [dataclasses.replace(new, requested_renditions=requested)])
    images.mark_enqueued(conn, [image_id])
    [claimed] = images.claim_batch(conn, [image_id])
    return claimed


def _completed(record: Any) -> Any:
    from db.images import Outcome, StoredRendition

    thumb = StoredRendition("thumb", f"results/{record.id}/thumb.webp", "image/webp", 4, 4, 9)
    return Outcome(
        record.id,
        "completed",
        result_key=thumb.key,
        result_content_type=thumb.content_type,
        result_width=4,
        result_height=4,
        renditions=(thumb,),
        requested_renditions=record.requested_renditions,
    )


@pytest.mark.parametrize("widened", [False, True])
def test_an_image_asked_for_more_renditions_while_processed_is_queued_again(
    settings: Settings, widened: bool
) -> None:
    import psycopg

    from db import images

    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        record = _claimed_image(conn, "thumb")
        if widened:  # a deduplicated upload asked for `default` meanwhile
            images.request_renditions(conn, record.id, "thumb,default")

        assert images.commit_batch(conn, [_completed(record)]) == {record.id}

        row = images.get_image(conn, record.id)
    assert row is not None
    assert [r.name for r in row.stored_renditions] == ["thumb"]
    if widened:
        assert (row.status, row.enqueued_at, row.requested) == (
            "pending",
            None,
            ("thumb", "default"),
        )
    else:
        assert row.status == "completed" and row.enqueued_at is not None


def test_results_completed_before_renditions_become_the_default_rendition() -> None:
    import psycopg

    from db import images
    from db.schemas import throwaway_schema, with_search_path
    from tests.support import BASE_POSTGRES_URL

    migrations = sorted(Path(images.__file__).parent.joinpath("migrations").glob("*.sql"))
    before = [m for m in migrations if m.name < "0005"]
    renditions = next(m for m in migrations if m.name == "0005_image_renditions.sql")
    later = [m for m in migrations if m.name > renditions.name]
    with (
        throwaway_schema(BASE_POSTGRES_URL, f"pm_rend_{uuid.uuid4().hex[:8]}") as schema,
        psycopg.connect(with_search_path(BASE_POSTGRES_URL, schema), autocommit=True) as conn,
    ):
        for migration in before:
            conn.execute(migration.read_text())
        image_id = uuid.uuid4()
        conn.execute(
            """INSERT INTO images (id, owner, filename, content_type, size_bytes, sha256,
                   source_width, source_height, status, original_key, result_key,
                   result_content_type, result_width, result_height)
               VALUES (%s, 'o', 'a.jpg', 'image/jpeg', 1, 'x', 8, 6, 'completed',
                       'originals/x', %s, 'image/png', 4, 3)""",
            (image_id, f"results/{image_id}.png"),
        )
        conn.execute(renditions.read_text())
        for migration in later:
            conn.execute(migration.read_text())
        record = images.get_image(conn, image_id)

    assert record is not None
    assert record.stored_renditions == (
        images.StoredRendition("default", f"results/{image_id}.png", "image/png", 4, 3, None),
    )


# --- through the API and a worker -------------------------------------------------------------


def upload(api: ApiClient, data: bytes, query: str = "") -> Any:
    body, content_type = multipart([("image", "photo.jpg", data, "image/jpeg")])
    return api.post_raw(f"/api/v1/upload{query}", body, content_type)


def fetched(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers["Content-Type"], response.read()


def test_upload_gets_every_configured_rendition_listed_served_and_deleted(
    renditions_service: ApiClient,
    issuer: Any,
    probe: StackProbe,
    app: Any,
) -> None:
    admin = ApiClient(app, issuer.mint_token(f"admin-{uuid.uuid4()}", ("user", "admin")))
    api = renditions_service
    image_id = upload(api, jpeg_of(photo_rgb(1600, 1200))).json["id"]
    body = completed_image(api, image_id)

    listed = {r["name"]: r for r in body["renditions"]}
    assert list(listed) == ["default", "thumb", "preview"]
    assert body["result"]["key"] == f"results/{image_id}.png"
    assert fetched(body["download_url"])[0] == "image/png"
    for name, size, content_type in (
        ("default", (800, 600), "image/png"),
        ("thumb", (200, 150), "image/webp"),
        ("preview", (1000, 750), "image/jpeg"),
    ):
        rendition = listed[name]
        assert (rendition["width"], rendition["height"]) == size
        served_type, data = fetched(rendition["url"])
        assert served_type == rendition["content_type"] == content_type
        assert len(data) == rendition["bytes"]
        redirect = api.get(f"/api/v1/images/{image_id}/renditions/{name}")
        assert redirect.status_code == 302
        assert fetched(redirect.headers["Location"])[1] == data
    assert api.get(f"/api/v1/images/{image_id}/renditions/nope").status_code == 404
    keys = {r["key"] for r in body["renditions"]}
    assert keys <= probe.results()

    assert admin.delete(f"/api/v1/images/{image_id}").status_code == 204
    assert not keys & probe.results()


def test_a_subset_is_made_alone_and_a_deduplicated_upload_adds_what_it_lacks(
    renditions_service: ApiClient,
    probe: StackProbe,
) -> None:
    data = jpeg_of(photo_rgb(1200, 900, seed=7))
    api = renditions_service
    refused = upload(api, data, "?renditions=thumb,poster")
    assert refused.status_code == 400 and "poster" in refused.json["error"]["message"]
    twice = upload(api, data, "?renditions=thumb&renditions=thumb")
    assert twice.status_code == 400 and "once" in twice.json["error"]["message"]

    image_id = upload(api, data, "?renditions=thumb").json["id"]
    first = completed_image(api, image_id)
    assert [r["name"] for r in first["renditions"]] == ["thumb"]
    assert first["result"]["key"] == f"results/{image_id}/thumb.webp"
    missing = api.get(f"/api/v1/images/{image_id}/renditions/default")
    assert missing.status_code == 404

    again = upload(api, data, "?renditions=default&dedupe=true")
    assert again.status_code == 200 and again.json["id"] == image_id

    assert renditions_once_made(api, image_id, 2) == ["default", "thumb"]
    keys = {f"results/{image_id}.png", f"results/{image_id}/thumb.webp"}
    assert keys <= probe.results()
    assert not any(k.startswith(f"results/{image_id}/preview") for k in probe.results())


def test_the_openapi_document_lists_the_configured_rendition_names() -> None:
    from ingest.openapi import openapi_document

    own = dataclasses.replace(local(), engine=local(RENDITIONS=API_RENDITIONS).engine)
    document = openapi_document(own)
    upload_parameters = document["paths"]["/api/v1/upload"]["post"]["parameters"]
    new_batch = document["components"]["schemas"]["NewBatch"]["properties"]

    [parameter] = [p for p in upload_parameters if p["name"] == "renditions"]
    assert parameter["schema"]["items"]["enum"] == ["default", "thumb", "preview"]
    assert new_batch["renditions"]["items"]["enum"] == ["default", "thumb", "preview"]


def test_an_upload_whose_webp_rendition_would_be_past_webps_size_limit_is_422_and_others_complete(
    renditions_service: ApiClient, issuer: Any, probe: StackProbe, user_id: str
) -> None:
    hostile = renditions_service
    other_user = f"other-{uuid.uuid4()}"
    other = ApiClient(hostile.client.app, issuer.mint_token(other_user, ("user",)))
    strip = tall_strip_png()  # its 200 px WebP thumb would be 200x20000

    refused = upload(hostile, strip)
    body, content_type = multipart(
        [("image", "strip.png", strip, ""), ("image", "ok.jpg", jpeg(640, 480), "")]
    )
    bulk = hostile.post_raw("/api/v1/uploads", body, content_type)
    ordinary = [upload(other, jpeg(900, 600, seed=seed)).json["id"] for seed in (1, 2, 3)]

    assert refused.status_code == 422, refused.text
    message = refused.json["error"]["message"]
    assert "'thumb' rendition would be 200x20000 pixels" in message
    assert "over the WEBP limit of 16382 pixels per side" in message
    assert bulk.status_code == 207
    strip_part, ok_part = bulk.json["items"]
    assert strip_part["status"] == 422 and "WEBP limit" in strip_part["error"]["message"]
    assert [str(row[0]) for row in probe.rows_for(user_id)] == [ok_part["id"]]
    for image_id in (*ordinary, ok_part["id"]):
        client = hostile if image_id == ok_part["id"] else other
        assert [r["name"] for r in completed_image(client, image_id)["renditions"]] == [
            "default",
            "thumb",
            "preview",
        ]
        assert probe.attempts(image_id) == 1  # never requeued with a failing batch
    # Without the WebP rendition the same file is accepted and made.
    subset = upload(hostile, strip, "?renditions=default,preview").json["id"]
    made = {r["name"]: r for r in completed_image(hostile, subset)["renditions"]}
    assert (made["default"]["width"], made["default"]["height"]) == (200, 20000)
