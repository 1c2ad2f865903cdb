"""Intake's one clean-up path, driven in process against the session's real services: whichever
step fails, the request leaves no original, row, intent, stored answer or job message behind."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from common.broker import JobPublisher, ensure_topology, queue_depth
from common.config import QueueSettings, Settings
from common.errors import BadRequest, DependencyUnavailable
from common.storage import ObjectStore
from db import images
from ingest.intake import IdempotencyClaim, ImageIntake
from ingest.upload_reader import BulkPart, UploadedImage, validate_image
from tests.support import StackProbe, jpeg


class StoreFailingPut:
    """The real object store, except that the `fail_at`-th original put (from 1) fails."""

    def __init__(self, store: ObjectStore, fail_at: int) -> None:
        self._store = store
        self._fail_at = fail_at
        self.puts = 0

    def put_original(self, key: str, data: bytes, content_type: str) -> None:
        self.puts += 1
        if self.puts == self._fail_at:
            raise DependencyUnavailable("object storage")
        self._store.put_original(key, data, content_type)

    def delete_original(self, key: str) -> None:
        self._store.delete_original(key)


class PublisherThatFails:
    """A broker that never confirms: nothing is queued and `publish` raises."""

    def publish(self, jobs: Any) -> None:
        raise DependencyUnavailable("message broker")


@pytest.fixture
def queue(private_queue: Settings) -> QueueSettings:
    """A job queue of this test's own, so its messages can be counted."""
    ensure_topology(private_queue.queue)
    return private_queue.queue


@pytest.fixture
def publisher(queue: QueueSettings) -> Iterator[JobPublisher]:
    publisher = JobPublisher(queue)
    yield publisher
    publisher.close()


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings.storage)


def upload(seed: int, name: str = "photo.jpg") -> UploadedImage:
    return validate_image(name, jpeg(48, 32, seed=seed))


def queued(queue: QueueSettings) -> int:
    """Job messages waiting, in every lane."""
    return queue_depth(queue)


def stored_answers(settings: Settings, owner: str) -> list[str]:
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute("SELECT key FROM idempotency_keys WHERE owner = %s", (owner,))
        return [row[0] for row in rows]


@dataclasses.dataclass
class Witness:
    """What a test's requests left in the stack, relative to the moment it was made."""

    probe: StackProbe
    queue: QueueSettings
    owner: str
    originals_before: set[str]
    intents_before: set[uuid.UUID]

    def left_behind(self) -> dict[str, object]:
        return {
            "originals": self.probe.originals() - self.originals_before,
            "rows": self.probe.rows_for(self.owner),
            "intents": self.probe.upload_intents() - self.intents_before,
            "answers": stored_answers(self.probe.settings, self.owner),
            "messages": queued(self.queue),
        }


NOTHING = {"originals": set(), "rows": [], "intents": set(), "answers": [], "messages": 0}


@pytest.fixture
def witness(probe: StackProbe, queue: QueueSettings, user_id: str) -> Witness:
    return Witness(probe, queue, user_id, probe.originals(), probe.upload_intents())


def bulk_parts(count: int) -> list[BulkPart]:
    return [BulkPart(i, f"{i}.jpg", sha256=f"digest-{i}") for i in range(count)]


def test_committed_request_keeps_originals_rows_answer_and_jobs_and_releases_its_intents(
    database, store, publisher, witness: Witness, user_id: str
) -> None:
    """The control case: the witness sees what a request leaves when it is kept."""
    intake = ImageIntake(database, store, publisher)
    claim = IdempotencyClaim("kept-1", "hash")
    with intake.begin(user_id) as batch:
        for seed in range(3):
            batch.stage(upload(seed))
        answer = batch.commit("req-kept", bulk_parts(3), claim=claim)
    assert answer.status_code == 207 and answer.body["accepted"] == 3
    ids = {item["id"] for item in answer.body["items"]}
    left = witness.left_behind()
    assert left["originals"] == {f"originals/{i}" for i in ids}
    assert {str(row[0]) for row in left["rows"]} == ids  # type: ignore[union-attr]
    assert left["answers"] == ["kept-1"]
    assert left["messages"] == 3
    assert left["intents"] == set()


def test_failed_original_put_leaves_nothing_behind(
    database, store, publisher, witness: Witness, user_id: str
) -> None:
    faulty = StoreFailingPut(store, fail_at=2)
    intake = ImageIntake(database, faulty, publisher)  # type: ignore[arg-type]
    with pytest.raises(DependencyUnavailable), intake.begin(user_id) as batch:
        for seed in range(3):
            batch.stage(upload(10 + seed))
        batch.commit("req-put", bulk_parts(3), claim=IdempotencyClaim("put-1", "hash"))
    assert faulty.puts == 3
    assert witness.left_behind() == NOTHING


def test_failed_row_insert_leaves_nothing_behind(
    database, store, publisher, witness: Witness, user_id: str, monkeypatch
) -> None:
    real_insert = images.insert_images

    def insert_then_lose_the_connection(conn, new):
        real_insert(conn, new)  # the rows are written, then must be rolled back
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(images, "insert_images", insert_then_lose_the_connection)
    intake = ImageIntake(database, store, publisher)
    with pytest.raises(DependencyUnavailable), intake.begin(user_id) as batch:
        for seed in range(2):
            batch.stage(upload(20 + seed))
        batch.commit("req-insert", bulk_parts(2), claim=IdempotencyClaim("insert-1", "hash"))
    assert witness.left_behind() == NOTHING


def test_request_losing_the_idempotency_race_returns_the_winners_answer_and_keeps_nothing(
    database, store, publisher, witness: Witness, user_id: str, monkeypatch
) -> None:
    """A concurrent request with the same key commits between this one's replay check and its
    own answer: this one rolls back, removes its originals and answers with the winner's."""
    intake = ImageIntake(database, store, publisher)
    claim = IdempotencyClaim("race-1", "hash")
    real_insert = images.insert_images
    winner: list[Any] = []

    def let_the_other_request_commit_first(conn, new):
        if not winner:
            winner.append(None)
            with intake.begin(user_id) as other:
                other.stage(upload(31))
                winner[0] = other.commit("req-winner", claim=claim)
        return real_insert(conn, new)

    monkeypatch.setattr(images, "insert_images", let_the_other_request_commit_first)
    with intake.begin(user_id) as batch:
        batch.stage(upload(30))
        answer = batch.commit("req-loser", claim=claim)

    assert answer == winner[0]
    left = witness.left_behind()
    assert left["originals"] == {f"originals/{answer.body['id']}"}
    assert [str(row[0]) for row in left["rows"]] == [answer.body["id"]]  # type: ignore[union-attr]
    assert left["answers"] == ["race-1"]
    assert left["messages"] == 1
    assert left["intents"] == set()


def test_failed_publish_takes_back_rows_answer_and_originals(
    database, store, witness: Witness, user_id: str
) -> None:
    intake = ImageIntake(database, store, PublisherThatFails())  # type: ignore[arg-type]
    with pytest.raises(DependencyUnavailable), intake.begin(user_id) as batch:
        for seed in range(3):
            batch.stage(upload(40 + seed))
        batch.commit("req-publish", bulk_parts(3), claim=IdempotencyClaim("publish-1", "hash"))
    assert witness.left_behind() == NOTHING


@pytest.mark.parametrize(
    "failure",
    [BadRequest("malformed multipart body"), SystemExit(1)],
    ids=["refused_request", "graceful_timeout_exit"],
)
def test_request_failing_after_staging_removes_what_it_stored(
    failure: BaseException, database, store, publisher, witness: Witness, user_id: str
) -> None:
    """A request that fails while its body is still being read (or that gunicorn ends with
    SystemExit past its graceful timeout) never reaches commit."""
    intake = ImageIntake(database, store, publisher)
    with pytest.raises(type(failure)), intake.begin(user_id) as batch:
        for seed in range(2):
            batch.stage(upload(50 + seed))
        raise failure
    assert witness.left_behind() == NOTHING


def test_replayed_answer_keeps_nothing_of_the_retry(
    database, store, publisher, witness: Witness, user_id: str
) -> None:
    intake = ImageIntake(database, store, publisher)
    claim = IdempotencyClaim("retry-1", "hash")
    with intake.begin(user_id) as batch:
        batch.stage(upload(60))
        first = batch.commit("req-first", claim=claim)
    kept = witness.left_behind()
    with intake.begin(user_id) as batch:
        batch.stage(upload(60))
        again = batch.commit("req-retry", claim=claim)
    assert again == first
    assert witness.left_behind() == kept


def test_deduplicated_copies_leave_neither_their_originals_nor_their_intents(
    database, store, publisher, witness: Witness, user_id: str
) -> None:
    intake = ImageIntake(database, store, publisher)
    with intake.begin(user_id) as batch:
        batch.stage(upload(70))
        first = batch.commit("req-original")
    with intake.begin(user_id) as batch:
        batch.stage(upload(70, "again.jpg"))
        batch.stage(upload(71))
        batch.stage(upload(71, "twice.jpg"))
        answer = batch.commit("req-copies", bulk_parts(3), dedupe=True)
    items = answer.body["items"]
    assert [i["deduplicated"] for i in items] == [True, False, True]
    assert items[0]["id"] == first.body["id"] and items[1]["id"] == items[2]["id"]
    left = witness.left_behind()
    assert left["originals"] == {f"originals/{first.body['id']}", f"originals/{items[1]['id']}"}
    assert len(left["rows"]) == 2  # type: ignore[arg-type]
    assert left["messages"] == 2
    assert left["intents"] == set()
