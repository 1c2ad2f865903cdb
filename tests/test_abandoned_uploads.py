"""Originals whose upload request died before their rows: announced before they are stored,
removed by the worker node's abandoned-upload sweeper, and never one that has a row."""

from __future__ import annotations

import socket
import urllib.request
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest

from common.config import Settings
from common.errors import DependencyUnavailable
from common.storage import ObjectStore
from db.pool import Database
from engine.abandoned_uploads import AbandonedUploadSweeper
from ingest.intake import ImageIntake
from ingest.upload_reader import validate_image
from tests.support import (
    StackProbe,
    jpeg,
    kill_tree,
    multipart,
    served_api,
    start_worker,
    stop_worker,
    wait_for,
)

BOUNDARY = "pmboundary42"


class NoPublisher:
    """For tests that never get as far as publishing."""

    def publish(self, jobs: object) -> None:
        raise AssertionError("nothing may be published")


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings.storage)


def rows_exist(settings: Settings, keys: set[str]) -> set[str]:
    """Which of the original keys `keys` belong to an image row."""
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute(
            "SELECT original_key FROM images WHERE original_key = ANY(%s)", (list(keys),)
        )
        return {row[0] for row in rows}


def test_sweep_leaves_the_originals_of_young_requests_alone(
    database, store, probe: StackProbe, user_id: str
) -> None:
    """A request still in progress (its intent younger than the age) keeps what it stored."""
    intake = ImageIntake(database, store, NoPublisher())  # type: ignore[arg-type]
    before = probe.originals()
    with pytest.raises(RuntimeError), intake.begin(user_id) as batch:
        batch.stage(validate_image("a.jpg", jpeg(48, 32, seed=1)))
        batch.stage(validate_image("b.jpg", jpeg(48, 32, seed=2)))
        wait_for(lambda: len(probe.originals() - before) == 2)
        sweeper = AbandonedUploadSweeper(database, store, age_seconds=3600)
        assert sweeper.sweep_once() == 0
        assert len(probe.originals() - before) == 2
        raise RuntimeError("the request ends")
    assert probe.originals() == before


def test_sweep_never_removes_an_original_that_has_a_row(
    own_database: Settings, store, probe: StackProbe, user_id: str
) -> None:
    """Even an old intent left next to a committed row (announced again by hand here, as a
    publish failure that could not be rolled back leaves it) only loses the intent. In a schema
    of its own: at age 0 the sweep would take any other test's request in flight too."""
    database = Database(own_database.postgres_url, max_size=2)
    try:
        intake = ImageIntake(database, store, _Recording())  # type: ignore[arg-type]
        with intake.begin(user_id) as batch:
            batch.stage(validate_image("kept.jpg", jpeg(48, 32, seed=3)))
            image_id = batch.commit("req-kept").body["id"]
        with psycopg.connect(own_database.postgres_url) as conn:
            conn.execute("INSERT INTO upload_intents (image_id) VALUES (%s)", (image_id,))
        sweeper = AbandonedUploadSweeper(database, store, age_seconds=0)
        assert sweeper.sweep_once() == 0
    finally:
        database.close()
    assert f"originals/{image_id}" in probe.originals()
    with psycopg.connect(own_database.postgres_url) as conn:
        intents = conn.execute("SELECT count(*) FROM upload_intents").fetchone()
    assert intents == (0,)


def test_request_that_outlived_the_age_is_refused_once_its_originals_were_swept(
    own_database: Settings, store, probe: StackProbe, user_id: str
) -> None:
    """The sweeper took the request's intents first: the request must not commit rows whose
    originals are gone. In a schema of its own, as above."""
    database = Database(own_database.postgres_url, max_size=2)
    intake = ImageIntake(database, store, NoPublisher())  # type: ignore[arg-type]
    before = probe.originals()
    try:
        with pytest.raises(DependencyUnavailable), intake.begin(user_id) as batch:
            batch.stage(validate_image("slow.jpg", jpeg(48, 32, seed=4)))
            wait_for(lambda: len(probe.originals() - before) == 1)
            sweeper = AbandonedUploadSweeper(database, store, age_seconds=0)
            assert sweeper.sweep_once() == 1
            assert probe.originals() == before
            batch.commit("req-slow")
        with psycopg.connect(own_database.postgres_url) as conn:
            rows = conn.execute("SELECT count(*) FROM images").fetchone()
    finally:
        database.close()
    assert rows == (0,)
    assert probe.originals() == before


class _Recording:
    def __init__(self) -> None:
        self.jobs: list[object] = []

    def publish(self, jobs: list[object]) -> None:
        self.jobs.extend(jobs)


def _send_upload(base: str, token: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(f"{base}/api/v1/upload", data=body, method="POST")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


@pytest.mark.slow
def test_api_killed_mid_bulk_upload_leaves_no_original_without_a_row(
    env: dict[str, str], settings: Settings, probe: StackProbe, issuer, tmp_path, user_id: str
) -> None:
    token = issuer.mint_token(user_id, ("user",))
    before = probe.originals()
    # Parts of about 90 KB each, so what the API reads in 32 KB chunks ends well past the third.
    parts = [("image", f"{i}.jpg", jpeg(800, 600, seed=100 + i), "image/jpeg") for i in range(6)]
    body, content_type = multipart(parts, BOUNDARY)
    # Up to the start of the fifth part, and no further until the API is killed.
    cut = body.index(b'name="image"; filename="4.jpg"')
    with served_api(env, tmp_path / "api.log", "--workers", "1", "--threads", "2") as (base, api):
        kept, kept_type = multipart([("image", "kept.jpg", jpeg(64, 48, seed=99), "image/jpeg")])
        assert _send_upload(base, token, kept, kept_type) == 201
        port = urlsplit(base).port
        with socket.create_connection(("127.0.0.1", port or 0), timeout=30) as client:
            head = (
                f"POST /api/v1/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            client.sendall(head + body[:cut])
            wait_for(lambda: len(probe.originals() - before) >= 1 + 3, timeout=60)
            kill_tree(api)
    stored = probe.originals() - before
    with_rows = rows_exist(settings, stored)
    assert len(with_rows) == 1 and len(stored - with_rows) >= 3, "the kill must strand originals"

    worker = start_worker(
        {**env, "ABANDONED_UPLOAD_AGE_SECONDS": "1", "ABANDONED_UPLOAD_SWEEP_SECONDS": "0.2"},
        tmp_path / "worker.log",
    )
    try:
        wait_for(lambda: probe.originals() - before == with_rows, timeout=90)
    finally:
        stop_worker(worker)
    assert rows_exist(settings, probe.originals() - before) == with_rows
    assert probe.upload_intents().isdisjoint(
        uuid.UUID(key.removeprefix("originals/")) for key in stored
    )
