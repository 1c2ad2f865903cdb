"""Download URLs are signed with a key that can only read the results bucket, so a URL signed
with it never opens an original, whatever object key it names."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3
from minio import Minio

from common.config import Settings
from common.storage import ObjectStore
from ops.s3server import LocalS3Server, ReadOnlyKey, pick_free_s3_port
from tests.support import S3_ACCESS_KEY, S3_SECRET_KEY

READER = ReadOnlyKey("results-reader", "results-reader-secret-42", "processed-presign")
RAW_BUCKET = "raw-presign"


@pytest.fixture(scope="module")
def s3_with_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    server = LocalS3Server(
        tmp_path_factory.mktemp("s3-reader"),
        port=pick_free_s3_port(),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        reader=READER,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(s3_with_reader: LocalS3Server) -> ObjectStore:
    settings = Settings.from_env(
        {
            "PIXELMILL_ENV": "local",
            "MINIO_ENDPOINT": s3_with_reader.endpoint,
            "MINIO_ACCESS_KEY": S3_ACCESS_KEY,
            "MINIO_SECRET_KEY": S3_SECRET_KEY,
            "MINIO_PRESIGN_ACCESS_KEY": READER.access_key,
            "MINIO_PRESIGN_SECRET_KEY": READER.secret_key,
            "MINIO_RAW_BUCKET": RAW_BUCKET,
            "MINIO_PROCESSED_BUCKET": READER.bucket,
        }
    )
    store = ObjectStore(settings.storage)
    store.ensure_buckets()
    return store


def _reader_client(server: LocalS3Server) -> Minio:
    return Minio(
        server.endpoint,
        access_key=READER.access_key,
        secret_key=READER.secret_key,
        secure=False,
        region="us-east-1",  # no bucket-location request: the reader may not make one
        http_client=urllib3.PoolManager(retries=False),
    )


def _status_of(url: str, method: str = "GET", body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return refused.code


def _body_of(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def test_download_url_is_signed_by_the_presign_key_and_opens_the_result(
    store: ObjectStore,
) -> None:
    key = f"results/{uuid.uuid4()}.png"
    store.put_result(key, b"result-bytes", "image/png")

    url = store.presigned_result_url(key)

    credential = parse_qs(urlsplit(url).query)["X-Amz-Credential"][0]
    assert credential.startswith(f"{READER.access_key}/")
    assert _body_of(url) == b"result-bytes"


def test_url_for_an_original_signed_with_the_presign_key_is_refused(
    store: ObjectStore, s3_with_reader: LocalS3Server
) -> None:
    image_id = uuid.uuid4()
    store.put_original(f"originals/{image_id}", b"the-private-original", "image/jpeg")
    reader = _reader_client(s3_with_reader)

    original_url = reader.presigned_get_object(RAW_BUCKET, f"originals/{image_id}")
    upload_url = reader.presigned_put_object(READER.bucket, f"results/{image_id}.png")

    assert _status_of(original_url) == 403
    assert _status_of(upload_url, "PUT", b"overwritten") == 403
    # The original is intact and still readable with the main key, and nothing was written.
    assert store.get_original(f"originals/{image_id}") == b"the-private-original"
    assert _status_of(store.presigned_result_url(f"results/{image_id}.png")) == 404


def test_local_stack_gives_seaweedfs_the_reader_when_a_presign_key_is_configured(
    tmp_path: Path,
) -> None:
    from ops.stack import LocalStack, StatePaths

    local = {"PIXELMILL_ENV": "local", "MINIO_PROCESSED_BUCKET": "done"}
    shared = LocalStack(Settings.from_env(local), StatePaths(tmp_path), child_env={})
    separate = LocalStack(
        Settings.from_env(
            {
                **local,
                "MINIO_PRESIGN_ACCESS_KEY": "reader",
                "MINIO_PRESIGN_SECRET_KEY": "reader-secret",
            }
        ),
        StatePaths(tmp_path),
        child_env={},
    )

    assert shared.storage() is not None and shared.storage().reader is None  # type: ignore[union-attr]
    assert separate.storage().reader == ReadOnlyKey("reader", "reader-secret", "done")  # type: ignore[union-attr]
