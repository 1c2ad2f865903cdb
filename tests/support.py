"""Test helpers: building multipart bodies and images, calling the API, inspecting the stack."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import falcon.testing
import numpy as np
import psycopg
from minio import Minio

from common.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BASE_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
S3_ACCESS_KEY = "pixelmill-test"
S3_SECRET_KEY = "pixelmill-test-secret"
# What an operator must set before `docker compose` accepts compose.yaml (its comment lists them).
COMPOSE_SECRETS = {
    name: f"test-{name.lower().replace('_', '-')}-0f3c9a"
    for name in (
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "RABBITMQ_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "MINIO_APP_SECRET_KEY",
        "MINIO_PRESIGN_SECRET_KEY",
        "KEYCLOAK_ADMIN_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    )
}


def multipart(parts: list[tuple[str, str | None, bytes, str]], boundary: str = "pmboundary42"):
    """Encode (field, filename, data, content type) parts; filename None makes a plain field."""
    chunks: list[bytes] = []
    for name, filename, data, content_type in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {content_type}\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def photo(width: int, height: int, seed: int = 1) -> np.ndarray:
    """A BGR image with gradients, shapes and texture, so codecs behave as on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [x / max(width, 1) * 255, y / max(height, 1) * 255, (x + y) / max(width + height, 1) * 255],
        axis=-1,
    )
    image += rng.normal(0, 6, image.shape)
    out = np.clip(image, 0, 255).astype(np.uint8)
    cv2.circle(out, (width // 2, height // 2), max(1, min(width, height) // 4), (20, 200, 60), -1)
    return out


def jpeg(width: int, height: int, seed: int = 1) -> bytes:
    ok, encoded = cv2.imencode(".jpg", photo(width, height, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def png(width: int, height: int, *, alpha: bool = False, seed: int = 1) -> bytes:
    image = photo(width, height, seed)
    if alpha:
        transparency = np.full((height, width, 1), 255, np.uint8)
        transparency[:, : width // 2] = 0
        image = np.concatenate([image, transparency], axis=-1)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


class ApiClient:
    """The Falcon app driven through falcon.testing, with a bearer token."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.client = falcon.testing.TestClient(app)
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**headers, **(extra or {})}

    def upload(self, data: bytes, filename: str = "photo.jpg", field: str = "image"):
        body, content_type = multipart([(field, filename, data, "application/octet-stream")])
        return self.post_raw("/api/v1/upload", body, content_type)

    def post_raw(self, path: str, body: bytes, content_type: str, **headers: str):
        return self.client.simulate_post(
            path, body=body, headers=self.headers({"Content-Type": content_type, **headers})
        )

    def get(self, path: str, **params: Any):
        return self.client.simulate_get(path, headers=self.headers(), params=params or None)

    def delete(self, path: str):
        return self.client.simulate_delete(path, headers=self.headers())


class StackProbe:
    """Looks directly at the database, buckets and queue, as a test's witness."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        s = settings.storage
        self.s3 = Minio(s.endpoint, s.access_key, s.secret_key, secure=s.secure, region=s.region)

    def rows_for(self, owner: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.postgres_url) as conn:
            return conn.execute(
                "SELECT id, status, error, result_key FROM images WHERE owner = %s", (owner,)
            ).fetchall()

    def status(self, image_id: str | uuid.UUID) -> str | None:
        with psycopg.connect(self.settings.postgres_url) as conn:
            row = conn.execute("SELECT status FROM images WHERE id = %s", (image_id,)).fetchone()
        return None if row is None else row[0]

    def updated_at(self, image_id: str | uuid.UUID) -> Any:
        with psycopg.connect(self.settings.postgres_url) as conn:
            row = conn.execute(
                "SELECT updated_at FROM images WHERE id = %s", (image_id,)
            ).fetchone()
        return None if row is None else row[0]

    def object_keys(self, bucket: str) -> set[str]:
        return {o.object_name for o in self.s3.list_objects(bucket, recursive=True)}

    def originals(self) -> set[str]:
        return self.object_keys(self.settings.storage.raw_bucket)

    def results(self) -> set[str]:
        return self.object_keys(self.settings.storage.processed_bucket)

    def result_bytes(self, key: str) -> bytes:
        response = self.s3.get_object(self.settings.storage.processed_bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def served_api(
    env: dict[str, str], log_path: Path, *args: str, **overrides: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real gunicorn (`python -m ingest.serve ARGS`) on a free port; stopped with SIGTERM,
    which must end it cleanly."""
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ingest.serve", "--bind", f"127.0.0.1:{port}", *args],
            cwd=ROOT,
            env={**os.environ, **env, **overrides},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"{base}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the API did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def database_schema(conninfo: str, name: str) -> Iterator[str]:
    """A PostgreSQL schema of its own for a test module or session, dropped afterwards."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def start_worker(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_worker(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
