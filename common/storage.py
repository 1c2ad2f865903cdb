"""Object storage: originals and results in S3-compatible buckets, keyed by image id."""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from common import formats
from common.config import StorageSettings
from common.errors import DependencyUnavailable, ObjectMissing, ObjectTooLarge, StorageRefused

DEPENDENCY = "object storage"
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
# S3 codes that say "try again", not "you may not": throttling and the server's own trouble.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed"}
)


def original_key(image_id: uuid.UUID) -> str:
    """Where an upload's original bytes live; never derived from the client's filename."""
    return f"originals/{image_id}"


def result_key(image_id: uuid.UUID, content_type: str) -> str:
    """Deterministic, so a redelivered job overwrites rather than duplicates its result."""
    return f"results/{image_id}.{formats.EXTENSION_BY_CONTENT_TYPE[content_type]}"


def rendition_key(image_id: uuid.UUID, name: str, content_type: str, *, first: bool) -> str:
    """Where a rendition lives: the deployment's first rendition at `result_key` (the key
    results had before renditions), every other one at `results/<id>/<name>.<ext>`.
    Deterministic for the same reason as `result_key`."""
    if first:
        return result_key(image_id, content_type)
    return f"results/{image_id}/{name}.{formats.EXTENSION_BY_CONTENT_TYPE[content_type]}"


def _client(endpoint: str, settings: StorageSettings, access_key: str, secret_key: str) -> Minio:
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3.0, read=30.0),
        maxsize=32,
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
    )
    return Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=settings.secure,
        region=settings.region,
        http_client=http,
    )


@contextlib.contextmanager
def _translated_errors() -> Iterator[None]:
    """The S3 client's exceptions as the project's own, so no caller knows which client it is.

    A missing object is `ObjectMissing`; a request the store refuses is `StorageRefused`;
    anything else (no answer, a 5xx, throttling, or an HTML error page from a proxy in front of
    the store, which the client cannot parse) is `DependencyUnavailable`."""
    try:
        yield
    except S3Error as exc:
        if exc.code in _MISSING_CODES:
            raise ObjectMissing(f"no stored object {exc.object_name}") from exc
        if exc.code in _TRANSIENT_CODES:
            raise DependencyUnavailable(DEPENDENCY) from exc
        raise StorageRefused(DEPENDENCY, exc.code or "no reason given") from exc
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise DependencyUnavailable(DEPENDENCY) from exc


class ObjectStore:
    """The two buckets of pixelmill behind one small interface.

    Create one per process (after fork): the underlying HTTP pool is not fork-safe.
    Every method raises only the project's errors: `ObjectMissing`, `ObjectTooLarge`,
    `StorageRefused` or `DependencyUnavailable("object storage")`.
    """

    dependency = DEPENDENCY

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self._client = _client(
            settings.endpoint, settings, settings.access_key, settings.secret_key
        )
        # Presigned URLs must name the host clients reach, which may differ from the internal one,
        # and are signed with a key that can only read results: a URL is a bearer credential.
        public = settings.public_endpoint or settings.endpoint
        self._presigner = _client(
            public, settings, settings.presign_access_key, settings.presign_secret_key
        )

    def ensure_buckets(self) -> None:
        for bucket in (self.settings.raw_bucket, self.settings.processed_bucket):
            with _translated_errors():
                try:
                    if not self._client.bucket_exists(bucket):
                        self._client.make_bucket(bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def put_original(self, key: str, data: bytes, content_type: str) -> None:
        self._put(self.settings.raw_bucket, key, data, content_type)

    def put_result(self, key: str, data: bytes | memoryview, content_type: str) -> None:
        self._put(self.settings.processed_bucket, key, data, content_type)

    def get_original(self, key: str) -> bytes:
        return self._get(self.settings.raw_bucket, key)

    def read_original_into(self, key: str, buffer: memoryview) -> int:
        """Stream an original into `buffer` and return its length; ObjectTooLarge if it does not
        fit, ObjectMissing if there is none."""
        with _translated_errors():
            response = self._client.get_object(self.settings.raw_bucket, key)
            try:
                filled = 0
                for chunk in response.stream(256 * 1024):
                    end = filled + len(chunk)
                    if end > len(buffer):
                        raise ObjectTooLarge(
                            f"object {key} is larger than its {len(buffer)}-byte slot"
                        )
                    buffer[filled:end] = chunk
                    filled = end
                return filled
            finally:
                response.close()
                response.release_conn()

    def delete_image_objects(self, original: str, results: str | Sequence[str] | None) -> None:
        """Delete an original and its results (one key, or every rendition's)."""
        keys = [results] if isinstance(results, str) else list(results or ())
        with _translated_errors():
            self._client.remove_object(self.settings.raw_bucket, original)
            for key in keys:
                self._client.remove_object(self.settings.processed_bucket, key)

    def delete_result(self, key: str) -> None:
        with _translated_errors():
            self._client.remove_object(self.settings.processed_bucket, key)

    def delete_original(self, key: str) -> None:
        self.delete_image_objects(key, None)

    def presigned_result_url(self, key: str) -> str:
        return self._presigner.presigned_get_object(
            self.settings.processed_bucket,
            key,
            expires=timedelta(seconds=self.settings.presign_seconds),
        )

    def inventory(self) -> tuple[dict[str, int], dict[str, int]]:
        """(originals, results): every stored key with its size in bytes, for audits that
        compare the buckets with the rows (the chaos benchmark)."""
        with _translated_errors():
            return (
                self._sizes(self.settings.raw_bucket),
                self._sizes(self.settings.processed_bucket),
            )

    def _sizes(self, bucket: str) -> dict[str, int]:
        listed = self._client.list_objects(bucket, recursive=True)
        return {o.object_name: int(o.size or 0) for o in listed if o.object_name is not None}

    def check(self) -> None:
        """Raise DependencyUnavailable unless the raw bucket answers (readiness probe)."""
        with _translated_errors():
            self._client.bucket_exists(self.settings.raw_bucket)

    def _put(self, bucket: str, key: str, data: bytes | memoryview, content_type: str) -> None:
        # A refused write (credentials, missing bucket) is the store's problem, not the
        # caller's: StorageRefused is a DependencyUnavailable.
        with _translated_errors():
            self._client.put_object(
                bucket, key, io.BytesIO(data), length=len(data), content_type=content_type
            )

    def _get(self, bucket: str, key: str) -> bytes:
        with _translated_errors():
            response = self._client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
