"""Batches through the real API and worker nodes: joining, closing, finishing, retrying,
cancelling, reading and listing, who may see what, and the renditions a batch gives its images."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from common.config import Settings
from tests.support import (
    API_RENDITIONS,
    ApiClient,
    OwnStack,
    StackProbe,
    api_for,
    completed_image,
    create_batch,
    jpeg,
    multipart,
    renditions_once_made,
    wait_for,
)

pytestmark = pytest.mark.slow


def upload_into(
    api: ApiClient, batch_id: str, data: bytes, name: str = "a.jpg", query: str = "", **headers: str
):
    """`query`: more of the query string, `&renditions=...` for instance."""
    body, content_type = multipart([("image", name, data, "image/jpeg")])
    return api.post_raw(f"/api/v1/upload?batch={batch_id}{query}", body, content_type, **headers)


def bulk_into(
    api: ApiClient, batch_id: str, files: list[tuple[str, bytes]], query: str = "", **headers: str
):
    body, content_type = multipart([("image", name, data, "image/jpeg") for name, data in files])
    return api.post_raw(f"/api/v1/uploads?batch={batch_id}{query}", body, content_type, **headers)


def post(api: ApiClient, path: str):
    return api.client.simulate_post(path, headers=api.headers())


def truncated_jpeg(seed: int) -> bytes:
    """Accepted at upload (its header is whole), failed by the worker (its data is cut)."""
    data = jpeg(320, 240, seed=seed)
    return data[: len(data) // 2]


def batch_of(api: ApiClient, batch_id: str) -> dict[str, Any]:
    response = api.get(f"/api/v1/batches/{batch_id}")
    assert response.status_code == 200, response.text
    return response.json


def test_created_batch_is_open_and_empty_and_its_secret_is_shown_only_once(
    api: ApiClient, settings: Any
) -> None:
    created = create_batch(api, name="holiday", callback_url="http://127.0.0.1:9/hook")
    assert created["status"] == "open"
    assert created["webhook_secret"].startswith("whsec_")
    read = batch_of(api, created["id"])
    assert "webhook_secret" not in read
    assert read["total"] == 0
    assert read["counts"] == dict.fromkeys(
        ("pending", "processing", "completed", "failed", "cancelled"), 0
    )
    with psycopg.connect(settings.postgres_url) as conn:
        [stored] = conn.execute(
            "SELECT webhook_secret FROM batches WHERE id = %s", (created["id"],)
        ).fetchone()
    assert stored and created["webhook_secret"] not in stored, "the secret is stored encrypted"


def test_closed_batch_finishes_when_its_last_image_is_done_with_counts_from_both_routes(
    own_stack: OwnStack, probe: StackProbe
) -> None:
    api = own_stack.api
    batch = create_batch(api, name="two routes")
    single = upload_into(api, batch["id"], jpeg(300, 200, seed=1))
    assert single.status_code == 201, single.text
    assert single.json["batch_id"] == batch["id"]
    many = bulk_into(api, batch["id"], [("b.jpg", jpeg(300, 200, seed=2)), ("c.jpg", b"junk")])
    assert many.json["accepted"] == 1
    assert many.json["items"][0]["image"]["batch_id"] == batch["id"]
    before_close = batch_of(api, batch["id"])
    assert (before_close["status"], before_close["total"]) == ("open", 2)
    assert before_close["counts"]["pending"] == 2
    assert before_close["bytes_in"] > 0

    own_stack.start_node("--processes", "1")
    wait_for(lambda: batch_of(api, batch["id"])["counts"]["completed"] == 2, timeout=90)
    assert batch_of(api, batch["id"])["status"] == "open", "an open batch never finishes"

    closed = post(api, f"/api/v1/batches/{batch['id']}/close")
    assert closed.status_code == 200, closed.text
    done = batch_of(api, batch["id"])
    assert done["status"] == "finished"
    assert done["finished_at"] is not None and done["eta_seconds"] == 0
    assert done["bytes_out"] > 0


def test_uploads_into_unknown_or_another_users_batch_are_404_and_into_closed_409_storing_nothing(
    api: ApiClient, app: Any, issuer: Any, probe: StackProbe, user_id: str
) -> None:
    other = ApiClient(app, issuer.mint_token(f"other-{uuid.uuid4()}", ("user",)))
    theirs = create_batch(other)
    mine = create_batch(api)
    assert post(api, f"/api/v1/batches/{mine['id']}/close").status_code == 200
    originals = probe.originals()

    assert upload_into(api, str(uuid.uuid4()), jpeg(64, 64)).status_code == 404
    assert upload_into(api, theirs["id"], jpeg(64, 64)).status_code == 404
    refused = bulk_into(api, mine["id"], [("a.jpg", jpeg(64, 64, seed=3))])
    assert refused.status_code == 409, refused.text
    assert upload_into(api, mine["id"], jpeg(64, 64, seed=4)).status_code == 409

    assert probe.rows_for(user_id) == []
    assert probe.originals() == originals
    assert api.get(f"/api/v1/batches/{theirs['id']}").status_code == 404


def test_retried_upload_replays_after_close_and_the_same_key_with_another_batch_is_409(
    api: ApiClient, probe: StackProbe, user_id: str
) -> None:
    first_batch, second_batch = create_batch(api), create_batch(api)
    data = jpeg(120, 80, seed=5)
    first = upload_into(api, first_batch["id"], data, **{"Idempotency-Key": "joined-1"})
    assert first.status_code == 201
    assert post(api, f"/api/v1/batches/{first_batch['id']}/close").status_code == 200

    replay = upload_into(api, first_batch["id"], data, **{"Idempotency-Key": "joined-1"})
    assert (replay.status_code, replay.json) == (201, first.json)
    elsewhere = upload_into(api, second_batch["id"], data, **{"Idempotency-Key": "joined-1"})
    assert elsewhere.status_code == 409
    assert len(probe.rows_for(user_id)) == 1
    assert batch_of(api, second_batch["id"])["total"] == 0


def test_retry_requeues_failed_images_and_the_batch_finishes_again(
    own_stack: OwnStack, settings: Any
) -> None:
    api = own_stack.api
    batch = create_batch(api)
    good = upload_into(api, batch["id"], jpeg(200, 100, seed=6)).json["id"]
    bad = upload_into(api, batch["id"], truncated_jpeg(7), "cut.jpg").json["id"]
    post(api, f"/api/v1/batches/{batch['id']}/close")
    own_stack.start_node("--processes", "1")
    wait_for(lambda: batch_of(api, batch["id"])["status"] == "finished", timeout=90)
    failed = api.get(f"/api/v1/batches/{batch['id']}/images", status="failed").json
    assert [i["id"] for i in failed["items"]] == [bad]
    assert failed["items"][0]["error"]
    first_finish = batch_of(api, batch["id"])["finished_at"]

    retried = post(api, f"/api/v1/batches/{batch['id']}/retry")
    assert (retried.status_code, retried.json) == (202, {"requeued": 1})
    assert batch_of(api, batch["id"])["status"] in ("closed", "finished")
    wait_for(
        lambda: batch_of(api, batch["id"])["finished_at"] not in (None, first_finish), timeout=90
    )
    again = batch_of(api, batch["id"])
    assert again["status"] == "finished"
    assert again["counts"] | {"failed": 0} == {
        "pending": 0,
        "processing": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
    }
    assert again["counts"]["failed"] == 1, "a truncated image fails again"
    assert api.get(f"/api/v1/images/{good}").json["status"] == "completed"
    with psycopg.connect(settings.postgres_url) as conn:
        [attempts] = conn.execute("SELECT attempts FROM images WHERE id = %s", (bad,)).fetchone()
    assert attempts == 1, "processed again, once, its attempts counted afresh by the retry"


def test_retry_of_a_batch_without_failures_requeues_nothing(api: ApiClient) -> None:
    batch = create_batch(api)
    post(api, f"/api/v1/batches/{batch['id']}/close")
    for _ in range(2):
        retried = post(api, f"/api/v1/batches/{batch['id']}/retry")
        assert (retried.status_code, retried.json) == (202, {"requeued": 0})
    assert batch_of(api, batch["id"])["status"] == "finished"


def test_cancel_ends_waiting_images_cancelled_and_workers_ack_them_without_results(
    own_stack: OwnStack, probe: StackProbe
) -> None:
    api = own_stack.api
    batch = create_batch(api)
    ids = [upload_into(api, batch["id"], jpeg(200, 100, seed=10 + i)).json["id"] for i in range(3)]
    results_before = probe.results()

    cancelled = post(api, f"/api/v1/batches/{batch['id']}/cancel")
    assert (cancelled.status_code, cancelled.json) == (202, {"cancelled": 3})
    assert upload_into(api, batch["id"], jpeg(64, 64, seed=20)).status_code == 409
    assert post(api, f"/api/v1/batches/{batch['id']}/retry").status_code == 409

    own_stack.start_node("--processes", "1")
    from common.broker import queue_depth

    wait_for(lambda: queue_depth(own_stack.settings.queue) == 0, timeout=60)
    assert [api.get(f"/api/v1/images/{i}").json["status"] for i in ids] == ["cancelled"] * 3
    assert probe.results() == results_before, "no result object for a cancelled image"
    document = batch_of(api, batch["id"])
    assert document["status"] == "cancelled"
    assert document["counts"]["cancelled"] == 3 and document["counts"]["completed"] == 0
    again = post(api, f"/api/v1/batches/{batch['id']}/cancel")
    assert (again.status_code, again.json) == (202, {"cancelled": 0})


def test_images_of_a_cancel_cut_short_end_cancelled_when_their_jobs_arrive(
    own_stack: OwnStack, probe: StackProbe
) -> None:
    """The cancel marks the batch, then its waiting images, in two transactions: an API process
    killed between them leaves `pending` images of a cancelled batch. A worker's claim ends them
    `cancelled`, so none stays pending."""
    from db import batches
    from db.pool import Database

    api = own_stack.api
    batch = create_batch(api)
    ids = [upload_into(api, batch["id"], jpeg(200, 100, seed=30 + i)).json["id"] for i in range(2)]
    db = Database(own_stack.settings.postgres_url, max_size=1)
    try:
        with db.transaction() as conn:
            assert batches.mark_cancelled(conn, uuid.UUID(batch["id"]))
    finally:
        db.close()
    assert [probe.status(i) for i in ids] == ["pending", "pending"]

    own_stack.start_node("--processes", "1")
    from common.broker import queue_depth

    wait_for(lambda: queue_depth(own_stack.settings.queue) == 0, timeout=60)
    wait_for(lambda: [probe.status(i) for i in ids] == ["cancelled"] * 2, timeout=30)
    document = batch_of(api, batch["id"])
    assert document["status"] == "cancelled"
    assert document["counts"]["cancelled"] == 2 and document["counts"]["pending"] == 0


def test_batches_are_listed_to_their_owner_and_to_admins_by_owner(
    api: ApiClient, app: Any, issuer: Any, user_id: str
) -> None:
    made = [create_batch(api, name=f"b{i}")["id"] for i in range(3)]
    other = ApiClient(app, issuer.mint_token(f"other-{uuid.uuid4()}", ("user",)))
    create_batch(other)

    first = api.get("/api/v1/batches", limit=2).json
    second = api.get("/api/v1/batches", limit=2, cursor=first["next_cursor"]).json
    listed = [b["id"] for b in first["items"] + second["items"]]
    assert listed == list(reversed(made))
    assert second["next_cursor"] is None

    admin = ApiClient(app, issuer.mint_token("an-admin", ("admin",)))
    by_owner = admin.get("/api/v1/batches", owner=user_id).json["items"]
    assert [b["id"] for b in by_owner] == list(reversed(made))
    assert admin.get(f"/api/v1/batches/{made[0]}").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"events": ["image"]},
        {"name": 5},
        {"surprise": True},
        {"callback_url": "ftp://example.invalid/hook"},
        {"renditions": ["poster"]},
        {"renditions": []},
        {"renditions": "default"},
        {"renditions": ["default", "default"]},
        {"renditions": [7]},
    ],
)
def test_invalid_batch_creation_is_400_and_creates_nothing(
    api: ApiClient, body: dict[str, Any]
) -> None:
    response = api.client.simulate_post("/api/v1/batches", json=body, headers=api.headers())
    assert response.status_code == 400, response.text
    assert api.get("/api/v1/batches").json["items"] == []


def test_concurrent_uploads_into_one_batch_are_all_accepted_and_counted(
    api: ApiClient, probe: StackProbe, user_id: str
) -> None:
    """Each upload locks the batch row once, as the counters' trigger does: uploads queue for
    it instead of deadlocking each other (which would surface as 503s)."""
    batch = create_batch(api)
    answers: list[Any] = []

    def send(worker: int) -> None:
        for round_ in range(3):
            seed = worker * 100 + round_ * 10
            files = [(f"{seed + i}.jpg", jpeg(48, 32, seed=seed + i)) for i in range(4)]
            answers.append(bulk_into(api, batch["id"], files))

    # As many at once as one user may send (MAX_UPLOADS_PER_USER).
    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    refused = [a.text for a in answers if a.status_code != 207]
    assert (len(answers), refused) == (12, [])
    assert len(probe.rows_for(user_id)) == 48
    assert batch_of(api, batch["id"])["total"] == 48


# --- the renditions a batch gives its images ----------------------------------------------------


@pytest.fixture
def renditions_api(
    env: dict[str, str], private_queue: Settings, issuer: Any, user_id: str
) -> Iterator[ApiClient]:
    """The API (as `user_id`) with API_RENDITIONS configured; its jobs wait on a queue of this
    test that nothing consumes."""
    own = Settings.from_env(
        {
            **env,
            "RABBITMQ_QUEUE": private_queue.queue.queue,
            "REDIS_PREFIX": private_queue.redis_prefix,
            "RENDITIONS": API_RENDITIONS,
        }
    )
    with api_for(own, issuer.mint_token(user_id, ("user",))) as api:
        yield api


def requested_renditions(settings: Settings, image_ids: list[str]) -> list[str | None]:
    """The `requested_renditions` of each image row, in the order of `image_ids`."""
    with psycopg.connect(settings.postgres_url) as conn:
        rows = dict(
            conn.execute(
                "SELECT id::text, requested_renditions FROM images WHERE id = ANY(%s::uuid[])",
                (image_ids,),
            ).fetchall()
        )
    return [rows[i] for i in image_ids]


def stored_keys_of(probe: StackProbe, image_id: str) -> set[str]:
    """Every result object stored for the image, whatever its rendition."""
    return {key for key in probe.results() if image_id in key}


def test_a_batchs_renditions_are_kept_in_configuration_order_and_shown_in_its_document(
    renditions_api: ApiClient,
) -> None:
    api = renditions_api
    chosen = create_batch(api, renditions=["preview", "thumb"])
    every = create_batch(api)
    explicit_null = create_batch(api, renditions=None)

    assert chosen["renditions"] == ["thumb", "preview"]
    assert batch_of(api, chosen["id"])["renditions"] == ["thumb", "preview"]
    assert every["renditions"] is None and batch_of(api, every["id"])["renditions"] is None
    assert explicit_null["renditions"] is None
    listed = {b["id"]: b["renditions"] for b in api.get("/api/v1/batches").json["items"]}
    assert listed == {
        chosen["id"]: ["thumb", "preview"],
        every["id"]: None,
        explicit_null["id"]: None,
    }


@pytest.mark.parametrize(
    ("renditions", "complaint"),
    [
        (["thumb", "poster"], "no rendition named poster (known: default, thumb, preview)"),
        ([], "renditions must name at least one rendition"),
        (["thumb", "thumb"], "renditions must name each rendition once"),
    ],
)
def test_a_batch_naming_an_unknown_rendition_or_none_is_400_saying_why_and_no_row_is_made(
    renditions_api: ApiClient,
    settings: Settings,
    user_id: str,
    renditions: list[str],
    complaint: str,
) -> None:
    response = renditions_api.client.simulate_post(
        "/api/v1/batches", json={"renditions": renditions}, headers=renditions_api.headers()
    )

    assert response.status_code == 400, response.text
    assert response.json["error"]["code"] == "bad_request"
    assert complaint in response.json["error"]["message"]
    with psycopg.connect(settings.postgres_url) as conn:
        [count] = conn.execute(
            "SELECT count(*) FROM batches WHERE owner = %s", (user_id,)
        ).fetchone()
    assert count == 0


def test_uploads_into_a_batch_ask_for_its_renditions_on_both_routes_unless_they_name_their_own(
    renditions_api: ApiClient, settings: Settings
) -> None:
    api = renditions_api
    batch = create_batch(api, renditions=["thumb"])["id"]
    every = create_batch(api)["id"]

    single = upload_into(api, batch, jpeg(64, 48, seed=40))
    bulk = bulk_into(
        api, batch, [("b.jpg", jpeg(64, 48, seed=41)), ("c.jpg", jpeg(64, 48, seed=42))]
    )
    own_single = upload_into(api, batch, jpeg(64, 48, seed=43), query="&renditions=preview")
    own_bulk = bulk_into(
        api, batch, [("e.jpg", jpeg(64, 48, seed=44))], query="&renditions=preview,default"
    )
    unset = upload_into(api, every, jpeg(64, 48, seed=45)).json["id"]
    inherited = [single.json["id"], *(item["image"]["id"] for item in bulk.json["items"])]
    own = [own_single.json["id"], own_bulk.json["items"][0]["image"]["id"]]

    assert requested_renditions(settings, inherited) == ["thumb"] * 3
    assert requested_renditions(settings, own) == ["preview", "default,preview"]
    assert requested_renditions(settings, [unset]) == [None]


def test_a_batch_rendition_the_configuration_no_longer_names_is_left_out_of_its_uploads(
    renditions_api: ApiClient,
    env: dict[str, str],
    private_queue: Settings,
    issuer: Any,
    user_id: str,
    settings: Settings,
) -> None:
    """`preview` is dropped from RENDITIONS after the batches were made: their uploads still
    go in, asking for what is left, or for every rendition if nothing is (as the engine does)."""
    two = create_batch(renditions_api, renditions=["thumb", "preview"])["id"]
    one = create_batch(renditions_api, renditions=["preview"])["id"]
    narrower = Settings.from_env(
        {
            **env,
            "RABBITMQ_QUEUE": private_queue.queue.queue,
            "REDIS_PREFIX": private_queue.redis_prefix,
            "RENDITIONS": "default:800:gray:png, thumb:200:color:webp:80",
        }
    )
    with api_for(narrower, issuer.mint_token(user_id, ("user",))) as api:
        answers = [
            upload_into(api, two, jpeg(64, 48, seed=47)),
            upload_into(api, one, jpeg(64, 48, seed=48)),
        ]

    assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    ids = [a.json["id"] for a in answers]
    assert requested_renditions(settings, ids) == ["thumb", None]


def test_the_renditions_a_batch_gives_count_in_the_idempotency_fingerprint(
    renditions_api: ApiClient, probe: StackProbe, user_id: str
) -> None:
    """An upload into a `thumb` batch asks for what `&renditions=thumb` asks for: the same key
    replays its answer; with other renditions it is another request (409)."""
    api = renditions_api
    batch = create_batch(api, renditions=["thumb"])["id"]
    data = jpeg(64, 48, seed=46)
    key = {"Idempotency-Key": f"inherited-{uuid.uuid4()}"}

    first = upload_into(api, batch, data, **key)
    spelled_out = upload_into(api, batch, data, query="&renditions=thumb", **key)
    other = upload_into(api, batch, data, query="&renditions=preview", **key)

    assert first.status_code == 201, first.text
    assert (spelled_out.status_code, spelled_out.json) == (201, first.json)
    assert other.status_code == 409, other.text
    assert len(probe.rows_for(user_id)) == 1


def test_images_of_a_batch_get_exactly_its_renditions_and_a_request_naming_others_wins(
    renditions_service: ApiClient,
    probe: StackProbe,
) -> None:
    api = renditions_service
    batch = create_batch(api, renditions=["thumb"])["id"]
    single = upload_into(api, batch, jpeg(640, 480, seed=50)).json["id"]
    bulk = bulk_into(api, batch, [("b.jpg", jpeg(640, 480, seed=51))]).json["items"]
    own = upload_into(api, batch, jpeg(640, 480, seed=52), query="&renditions=preview")

    for image_id in (single, bulk[0]["image"]["id"]):
        body = completed_image(api, image_id)
        assert [r["name"] for r in body["renditions"]] == ["thumb"]
        assert stored_keys_of(probe, image_id) == {f"results/{image_id}/thumb.webp"}
    body = completed_image(api, own.json["id"])
    assert [r["name"] for r in body["renditions"]] == ["preview"]
    assert stored_keys_of(probe, own.json["id"]) == {f"results/{own.json['id']}/preview.jpg"}
    assert api.get(f"/api/v1/images/{single}/renditions/default").status_code == 404


def test_a_deduplicated_upload_into_the_batch_adds_the_batchs_renditions_the_copy_lacks(
    renditions_service: ApiClient,
    probe: StackProbe,
) -> None:
    data = jpeg(640, 480, seed=53)
    api = renditions_service
    batch = create_batch(api, renditions=["thumb"])["id"]
    image_id = upload_into(api, batch, data, query="&renditions=preview").json["id"]
    assert [r["name"] for r in completed_image(api, image_id)["renditions"]] == ["preview"]

    again = upload_into(api, batch, data, query="&dedupe=true")
    assert (again.status_code, again.json["id"]) == (200, image_id)

    assert renditions_once_made(api, image_id, 2) == ["thumb", "preview"]
    assert stored_keys_of(probe, image_id) == {
        f"results/{image_id}/thumb.webp",
        f"results/{image_id}/preview.jpg",
    }
