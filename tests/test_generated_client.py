"""A Python client generated from the served OpenAPI document (openapi-python-client) uploads
images one by one and in bulk, reads their status back and creates a batch, with typed models for
every answer."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.support import StackProbe, jpeg, png, served_api

PACKAGE = "pixelmill_client"


@pytest.fixture(scope="module")
def served(
    env: dict[str, str], worker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The API under real gunicorn, with a worker so that uploads complete."""
    log = tmp_path_factory.mktemp("client-api") / "api.log"
    with served_api(env, log, "--workers", "1", "--threads", "4") as (base, _):
        yield base


def generate_client(base: str, workdir: Path) -> None:
    document = workdir / "openapi.json"
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=10) as response:
        document.write_bytes(response.read())
    # The generator knows binary bodies as application/octet-stream only: a ZIP is one.
    config = workdir / "generator.yaml"
    config.write_text("content_type_overrides:\n  application/zip: application/octet-stream\n")
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(document)]
    command += ["--meta", "none", "--output-path", str(workdir / PACKAGE), "--fail-on-warning"]
    command += ["--config", str(config)]
    # The generator formats its output with ruff, found on PATH beside this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        command,
        cwd=workdir,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def generated(served: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The generated package, imported from a temporary directory and forgotten afterwards."""
    workdir = tmp_path_factory.mktemp("generated")
    generate_client(served, workdir)
    sys.path.insert(0, str(workdir))
    try:
        modules = {
            name: importlib.import_module(f"{PACKAGE}.{name}")
            for name in ("client", "models", "types")
        }
        operations = {
            name: importlib.import_module(f"{PACKAGE}.api.default.{name}")
            for name in (
                "upload_image",
                "upload_images",
                "get_image",
                "list_images",
                "create_batch",
                "get_batch",
            )
        }
        yield SimpleNamespace(**modules, **operations)
    finally:
        sys.path.remove(str(workdir))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


@pytest.fixture
def client(generated: SimpleNamespace, served: str, issuer: Any, user_id: str) -> Any:
    token = issuer.mint_token(user_id, ("user",))
    # Long enough for the long poll below.
    timeout = httpx.Timeout(60.0)
    return generated.client.AuthenticatedClient(base_url=served, token=token, timeout=timeout)


def image_file(generated: SimpleNamespace, data: bytes, name: str, mime: str) -> Any:
    return generated.types.File(payload=io.BytesIO(data), file_name=name, mime_type=mime)


def wait_until_done(generated: SimpleNamespace, client: Any, image_id: uuid.UUID) -> Any:
    """The image once its status is terminal, read with the long poll."""
    models = generated.models
    for _ in range(10):
        image = generated.get_image.sync(image_id, client=client, wait=30)
        assert isinstance(image, models.Image)
        if image.status in (models.ImageStatus.COMPLETED, models.ImageStatus.FAILED):
            return image
    raise AssertionError(f"{image_id} did not finish")


def test_generated_client_uploads_one_image_and_reads_its_result(
    generated: SimpleNamespace, client: Any, user_id: str, probe: StackProbe
) -> None:
    models = generated.models
    form = models.UploadForm(image=image_file(generated, jpeg(1600, 900), "wide.jpg", "image/jpeg"))
    answer = generated.upload_image.sync_detailed(client=client, body=form)
    assert answer.status_code == 201
    created = answer.parsed
    assert isinstance(created, models.Image)
    assert created.status == models.ImageStatus.PENDING
    assert created.content_type == models.ImageContentType.IMAGEJPEG
    assert (created.filename, created.width, created.height) == ("wide.jpg", 1600, 900)
    assert created.result is None

    done = wait_until_done(generated, client, created.id)
    assert done.status == models.ImageStatus.COMPLETED
    assert isinstance(done.result, models.ImageResult)
    assert (done.result.width, done.result.height) == (800, 450)
    assert isinstance(done.download_url, str)
    assert [row[0] for row in probe.rows_for(user_id)] == [created.id]


def test_generated_client_uploads_in_bulk_and_reads_refusals_and_statuses_as_models(
    generated: SimpleNamespace, client: Any, user_id: str, probe: StackProbe
) -> None:
    models = generated.models
    files = [
        image_file(generated, jpeg(320, 240), "a.jpg", "image/jpeg"),
        image_file(generated, png(200, 100), "b.png", "image/png"),
        image_file(generated, b"just words", "c.txt", "text/plain"),
    ]
    answer = generated.upload_images.sync_detailed(
        client=client, body=models.BulkUploadForm(image=files)
    )
    assert answer.status_code == 207
    bulk = answer.parsed
    assert isinstance(bulk, models.BulkAnswer)
    assert (bulk.accepted, bulk.rejected) == (2, 1)
    first, second, refused = bulk.items
    assert all(isinstance(item, models.BulkItem) for item in bulk.items)
    assert isinstance(first.image, models.Image) and isinstance(second.image, models.Image)
    assert (first.image.filename, second.image.content_type) == (
        "a.jpg",
        models.ImageContentType.IMAGEPNG,
    )
    assert isinstance(refused.error, models.ErrorDetail)
    assert (refused.status, refused.error.code) == (415, "unsupported_media_type")
    assert isinstance(refused.id, generated.types.Unset)

    ids = [first.id, second.id]
    for image_id in ids:
        assert wait_until_done(generated, client, image_id).status == models.ImageStatus.COMPLETED
    listed = generated.list_images.sync(client=client, ids=ids)
    assert isinstance(listed, models.ImageList)
    assert {image.id for image in listed.items} == set(ids)
    assert {image.status for image in listed.items} == {models.ImageStatus.COMPLETED}
    assert {row[0] for row in probe.rows_for(user_id)} == set(ids)


def test_generated_client_creates_a_batch_naming_its_renditions_and_reads_them_back(
    generated: SimpleNamespace, client: Any
) -> None:
    models = generated.models
    body = models.NewBatch(name="typed", renditions=[models.NewBatchRenditionsType0Item.DEFAULT])
    created = generated.create_batch.sync(client=client, body=body)
    assert isinstance(created, models.CreatedBatch)
    assert created.renditions == ["default"]

    read = generated.get_batch.sync(created.id, client=client)
    assert isinstance(read, models.Batch)
    assert (read.name, read.renditions) == ("typed", ["default"])


def test_generated_client_reads_a_refusal_as_the_error_model(
    generated: SimpleNamespace, client: Any
) -> None:
    models = generated.models
    answer = generated.get_image.sync_detailed(uuid.uuid4(), client=client)
    assert answer.status_code == 404
    assert isinstance(answer.parsed, models.Error)
    assert isinstance(answer.parsed.error, models.ErrorDetail)
    assert answer.parsed.error.code == "not_found"
