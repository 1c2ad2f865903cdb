"""The format table (`common.formats`) and the parts that read it: the kernel's labels, result
keys, the upload client's file names, `OUTPUT_FORMAT` and which uploads the API recognises.

No services: these are the contracts between parts, checked where each part applies them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from common.config import ConfigError, Settings
from common.formats import FORMATS, OUTPUT_FORMATS, UPLOAD_CONTENT_TYPE_BY_FORMAT, ImageFormat
from common.imageinfo import probe
from common.storage import result_key
from engine.kernel import render_grayscale
from ingest.client import FileResult, result_names
from ingest.upload_reader import UploadedImage
from tests.support import jpeg, png

# Known independently of the table: the first bytes each encoder writes.
MAGIC = {
    "png": lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"),
    "jpeg": lambda data: data.startswith(b"\xff\xd8\xff"),
    "webp": lambda data: data[:4] == b"RIFF" and data[8:12] == b"WEBP",
    "avif": lambda data: data[4:12] == b"ftypavif",
    "jxl": lambda data: data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")),
}


def _ids(image_format: ImageFormat) -> str:
    return image_format.name


def test_the_table_names_each_format_content_type_and_extension_once() -> None:
    for column in ("name", "content_type", "extension"):
        values = [getattr(f, column) for f in FORMATS]
        assert len(values) == len(set(values)), column


def test_result_keys_and_downloads_keep_the_extensions_already_in_use() -> None:
    # Stored result keys and the client's downloaded file names depend on these.
    assert {f.content_type: f.extension for f in FORMATS} == {
        "image/png": "png",
        "image/jpeg": "jpg",
        "image/webp": "webp",
        "image/avif": "avif",
        "image/jxl": "jxl",
    }


@pytest.mark.parametrize("image_format", FORMATS, ids=_ids)
def test_kernel_labels_its_output_with_the_content_type_of_the_bytes_it_wrote(
    image_format: ImageFormat,
) -> None:
    rendered = render_grayscale(png(64, 48), target_width=32, output_format=image_format.name)

    assert rendered.content_type == image_format.content_type
    assert MAGIC[image_format.name](rendered.data)
    others = [name for name in MAGIC if name != image_format.name]
    assert not any(MAGIC[name](rendered.data) for name in others)


def test_kernel_refuses_a_format_the_table_does_not_have() -> None:
    with pytest.raises(ValueError, match="'gif' is not one of"):
        render_grayscale(png(8, 8), target_width=4, output_format="gif")


@pytest.mark.parametrize("image_format", FORMATS, ids=_ids)
def test_result_key_and_client_download_name_share_the_extension(
    image_format: ImageFormat,
) -> None:
    image_id = uuid.uuid4()
    item = FileResult(
        path=Path("in/holiday.jpeg"),
        filename="holiday.jpeg",
        sha256="0" * 64,
        size_bytes=1,
        outcome="completed",
        image_id=str(image_id),
        result_content_type=image_format.content_type,
    )

    [(_, name)] = result_names([item])

    assert result_key(image_id, image_format.content_type) == (
        f"results/{image_id}.{image_format.extension}"
    )
    assert name == f"holiday.{image_format.extension}"


def test_result_key_refuses_a_content_type_outside_the_table() -> None:
    with pytest.raises(KeyError):
        result_key(uuid.uuid4(), "image/gif")


@pytest.mark.parametrize("name", OUTPUT_FORMATS)
def test_output_format_setting_accepts_every_format_in_the_table(name: str) -> None:
    assert (
        Settings.from_env(
            {"PIXELMILL_ENV": "local", "OUTPUT_FORMAT": name.upper()}
        ).engine.output_format
        == name
    )


def test_output_format_setting_names_the_variable_and_the_choices_for_other_values() -> None:
    with pytest.raises(ConfigError, match="OUTPUT_FORMAT='gif' must be one of png, jpeg, webp"):
        Settings.from_env({"PIXELMILL_ENV": "local", "OUTPUT_FORMAT": "gif"})


@pytest.mark.parametrize(
    ("upload", "content_type"), [(jpeg(16, 12), "image/jpeg"), (png(16, 12), "image/png")]
)
def test_an_upload_in_an_uploadable_format_is_recorded_with_its_content_type(
    upload: bytes, content_type: str
) -> None:
    header = probe(upload)

    assert header is not None
    assert UploadedImage("a", upload, header, "0" * 64).content_type == content_type


def test_only_formats_the_kernel_decodes_are_uploadable() -> None:
    webp = render_grayscale(png(16, 12), target_width=8, output_format="webp").data

    assert set(UPLOAD_CONTENT_TYPE_BY_FORMAT) == {"jpeg", "png"}
    assert probe(webp) is None
