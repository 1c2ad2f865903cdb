"""The helpers that tests and benchmarks share: waiting, queue inspection and clean-up,
throwaway schemas and the multipart encoder, each checked against the real thing."""

from __future__ import annotations

import io
import uuid

import pika
import pika.exceptions
import psycopg
import pytest
from falcon.media.multipart import MultipartFormHandler

from common.broker import delete_topology, ensure_topology, queue_counts, queue_depth
from common.config import QueueSettings
from common.waiting import wait_for
from db.schemas import throwaway_schema, with_search_path
from ingest.client import FormPart, encode_multipart
from tests.support import BASE_POSTGRES_URL, RABBITMQ_URL, multipart

# --- waiting ------------------------------------------------------------------------------------


def test_wait_for_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, "", "ready", "later"])

    assert wait_for(lambda: next(answers), timeout=30, interval=0) == "ready"
    assert next(answers) == "later", "the predicate is not called once it held"


def test_wait_for_gives_up_naming_what_it_waited_for_in_its_last_state() -> None:
    checks: list[int] = []

    def never() -> bool:
        checks.append(1)
        return False

    with pytest.raises(TimeoutError) as gave_up:
        wait_for(never, timeout=0.05, interval=0.01, what=lambda: f"a miracle after {len(checks)}")
    # The description was asked for at the deadline, after every check.
    assert str(gave_up.value) == f"gave up waiting for a miracle after {len(checks)} after 0.05 s"


# --- queues -------------------------------------------------------------------------------------


@pytest.fixture
def queue(run_id: str) -> QueueSettings:
    name = f"pm-test-{run_id}-helpers-{uuid.uuid4().hex[:6]}"
    return QueueSettings(url=RABBITMQ_URL, queue=name, dead_letter_queue=f"{name}.dead")


def _exists(queue: QueueSettings, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(queue.url))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_queue_counts_see_ready_messages_and_delete_topology_removes_both_queues(
    queue: QueueSettings,
) -> None:
    ensure_topology(queue)
    try:
        connection = pika.BlockingConnection(pika.URLParameters(queue.url))
        channel = connection.channel()
        channel.confirm_delivery()
        for body in (b"one", b"two"):
            channel.basic_publish("", queue.queue, body)
        channel.basic_publish("", queue.dead_letter_queue, b"dead")
        connection.close()

        assert queue_counts(queue).ready == 2 and queue_counts(queue).consumers == 0
        assert queue_depth(queue) == 2
        assert queue_depth(queue, queue.dead_letter_queue) == 1
    finally:
        delete_topology(queue)
    assert not _exists(queue, queue.queue)
    assert not _exists(queue, queue.dead_letter_queue)
    delete_topology(queue)  # nothing left to delete is not an error


# --- schemas ------------------------------------------------------------------------------------


def _schemas(conninfo: str, name: str) -> list[str]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name = %s", (name,)
        ).fetchall()
    return [row[0] for row in rows]


def test_throwaway_schema_holds_the_tables_of_its_search_path_and_is_dropped_after() -> None:
    name = f"pm_helpers_{uuid.uuid4().hex[:8]}"
    with throwaway_schema(BASE_POSTGRES_URL, name):
        with psycopg.connect(with_search_path(BASE_POSTGRES_URL, name)) as conn:
            conn.execute("CREATE TABLE scratch (n int)")
            conn.execute("INSERT INTO scratch VALUES (1)")
        with psycopg.connect(BASE_POSTGRES_URL) as conn:
            row = conn.execute(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'scratch'"
                " AND table_schema = %s",
                (name,),
            ).fetchone()
        assert row == (name,)
    assert _schemas(BASE_POSTGRES_URL, name) == []


@pytest.mark.parametrize("name", ["Upper", "two words", "x;DROP SCHEMA public", "", "1st"])
def test_schema_names_that_are_not_plain_identifiers_are_refused(name: str) -> None:
    with pytest.raises(ValueError), throwaway_schema(BASE_POSTGRES_URL, name):
        pass
    with pytest.raises(ValueError):
        with_search_path(BASE_POSTGRES_URL, name)


# --- multipart ----------------------------------------------------------------------------------


def _parse(body: bytes, content_type: str) -> list[tuple[str, str | None, str, bytes]]:
    form = MultipartFormHandler().deserialize(io.BytesIO(body), content_type, len(body))
    return [(p.name, p.filename, p.content_type, p.data) for p in form]


def test_encoded_multipart_parts_read_back_exactly() -> None:
    image = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n"
    chunks, content_type = encode_multipart(
        [
            FormPart("image", image, "a.jpg", "image/jpeg"),
            FormPart("note", b"plain field", content_type="text/plain"),
        ]
    )

    assert chunks[1] is image, "a part's data is sent as it is, not copied"
    assert _parse(b"".join(chunks), content_type) == [
        ("image", "a.jpg", "image/jpeg", image),
        ("note", None, "text/plain", b"plain field"),
    ]


def test_a_filename_cannot_break_out_of_its_header() -> None:
    body, content_type = multipart(
        [("image", 'x".jpg\r\nContent-Type: text/html', b"data", "image/jpeg")]
    )

    [(name, filename, part_type, data)] = _parse(body, content_type)
    assert (name, part_type, data) == ("image", "image/jpeg", b"data")
    assert filename == "x%22.jpgContent-Type: text/html"


def test_each_encoded_body_gets_its_own_boundary_unless_one_is_given() -> None:
    assert encode_multipart([])[1] != encode_multipart([])[1]
    assert multipart([])[1] == "multipart/form-data; boundary=pmboundary42"
