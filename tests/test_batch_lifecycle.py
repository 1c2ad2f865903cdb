"""A batch's life after its uploads, through the real API and worker nodes: a retry that starts
afresh in each image's own lane, a cancel that tells when it has settled, de-duplication that
leaves settled batches alone, bytes out after a reopen, the per-user bounds (open batches,
interactive work) and retention, which removes rows and objects together."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from common.broker import lane_depths
from common.config import Settings
from common.jobs import bulk_shard
from common.storage import ObjectStore, original_key
from tests.support import (
    ApiClient,
    OwnStack,
    StackProbe,
    api_for,
    completed_image,
    create_batch,
    jpeg,
    multipart,
    paused,
    renditions_once_made,
    running_node,
    wait_for,
)

pytestmark = pytest.mark.slow


def post(api: ApiClient, path: str) -> Any:
    return api.client.simulate_post(path, headers=api.headers())


def upload(api: ApiClient, data: bytes, query: str = "") -> Any:
    body, content_type = multipart([("image", "a.jpg", data, "image/jpeg")])
    return api.post_raw(f"/api/v1/upload{query}", body, content_type)


def bulk(api: ApiClient, files: list[bytes], query: str = "") -> Any:
    body, content_type = multipart(
        [("image", f"{i}.jpg", data, "image/jpeg") for i, data in enumerate(files)]
    )
    return api.post_raw(f"/api/v1/uploads{query}", body, content_type)


def batch_of(api: ApiClient, batch_id: str) -> dict[str, Any]:
    response = api.get(f"/api/v1/batches/{batch_id}")
    assert response.status_code == 200, response.text
    return response.json


def truncated_jpeg(seed: int) -> bytes:
    """Accepted at upload (its header is whole), failed by the worker (its data is cut)."""
    data = jpeg(320, 240, seed=seed)
    return data[: len(data) // 2]


def query(settings: Settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


# --- retry ---------------------------------------------------------------------------------------


def test_retry_renders_again_an_image_that_gave_up_after_its_attempts(
    own_stack: OwnStack,
) -> None:
    api, settings = own_stack.api, own_stack.settings
    batch = create_batch(api)["id"]
    image = upload(api, jpeg(200, 100, seed=1), f"?batch={batch}").json["id"]
    post(api, f"/api/v1/batches/{batch}/close")
    # As if nodes had been killed mid-render as often as the delivery limit allows: the next
    # claim gives up without rendering.
    limit = settings.queue.delivery_limit
    query(settings, "UPDATE images SET attempts = %s WHERE id = %s", limit, image)
    own_stack.start_node("--processes", "1")
    wait_for(lambda: batch_of(api, batch)["status"] == "finished", timeout=90)
    failed = api.get(f"/api/v1/images/{image}").json
    assert failed["status"] == "failed" and failed["error"].startswith(f"gave up after {limit}")

    retried = post(api, f"/api/v1/batches/{batch}/retry")
    assert (retried.status_code, retried.json) == (202, {"requeued": 1})

    wait_for(lambda: batch_of(api, batch)["status"] == "finished", timeout=90)
    assert completed_image(api, image)["status"] == "completed"
    assert batch_of(api, batch)["counts"]["completed"] == 1
    [(attempts,)] = query(settings, "SELECT attempts FROM images WHERE id = %s", image)
    assert attempts == 1, "the retry counted its attempts afresh"


def test_retry_queues_each_image_in_the_lane_and_shard_stored_with_it(
    own_stack: OwnStack, user_id: str
) -> None:
    api, settings = own_stack.api, own_stack.settings
    batch = create_batch(api)["id"]
    single = upload(api, truncated_jpeg(2), f"?batch={batch}")
    assert single.status_code == 201, single.text
    parts = [jpeg(160, 120, seed=10 + i) for i in range(4)] + [truncated_jpeg(3)]
    assert bulk(api, parts, f"?batch={batch}").json["accepted"] == 5
    post(api, f"/api/v1/batches/{batch}/close")
    own_stack.start_node("--processes", "1")
    wait_for(lambda: batch_of(api, batch)["status"] == "finished", timeout=90)
    own_stack.stop_nodes()
    assert batch_of(api, batch)["counts"]["failed"] == 2

    retried = post(api, f"/api/v1/batches/{batch}/retry")
    assert (retried.status_code, retried.json) == (202, {"requeued": 2})

    shard = bulk_shard(user_id, settings.queue.bulk_shards)
    depths = lane_depths(settings.queue)
    assert depths.pop("interactive") == 1, "the single upload goes back to the interactive lane"
    assert depths.pop(f"bulk.{shard}") == 1, "the bulk image goes back to its owner's shard"
    assert set(depths.values()) == {0}


# --- cancel --------------------------------------------------------------------------------------


def delivered_events(settings: Settings, batch_id: str) -> list[tuple[str, Any]]:
    """The batch's webhook events as the outbox holds them: type and the batch it describes."""
    return [
        (row[0], row[1])
        for row in query(
            settings,
            """SELECT event_type, snapshot FROM webhook_deliveries
                WHERE batch_id = %s ORDER BY created_at""",
            batch_id,
        )
    ]


def test_a_cancelled_batch_reads_cancelling_while_a_started_image_runs_and_then_cancelled(
    own_stack: OwnStack, tmp_path: Path
) -> None:
    api, settings = own_stack.api, own_stack.settings
    gate = tmp_path / "gate"
    gate.mkdir()
    batch = create_batch(api, callback_url="http://127.0.0.1:9/hook")["id"]
    data = jpeg(400, 300, seed=20)
    held = upload(api, data, f"?batch={batch}").json["id"]
    # The same image, made to wait in its CPU process until the test releases it.
    ObjectStore(settings.storage).put_original(
        original_key(uuid.UUID(held)), paused(data, gate), "image/jpeg"
    )

    with running_node(settings, tmp_path, max_render_seconds=600.0):
        wait_for(lambda: (gate / "started").exists(), timeout=60, what="the held render")
        cancelled = post(api, f"/api/v1/batches/{batch}/cancel")
        assert (cancelled.status_code, cancelled.json) == (202, {"cancelled": 0})

        cancelling = batch_of(api, batch)
        assert (cancelling["status"], cancelling["counts"]["processing"]) == ("cancelling", 1)
        assert cancelling["finished_at"] is None
        assert delivered_events(settings, batch) == [], "no event before the batch has settled"
        assert post(api, f"/api/v1/batches/{batch}/retry").status_code == 409
        assert post(api, f"/api/v1/batches/{batch}/close").status_code == 409

        (gate / "release").touch()
        wait_for(lambda: batch_of(api, batch)["status"] == "cancelled", timeout=60)

    settled = batch_of(api, batch)
    assert settled["counts"]["completed"] == 1 and settled["counts"]["processing"] == 0
    assert settled["finished_at"] is not None and settled["eta_seconds"] == 0
    [(event, snapshot)] = delivered_events(settings, batch)
    assert event == "batch.cancelled"
    assert (snapshot["status"], snapshot["processing"], snapshot["completed"]) == (
        "cancelled",
        0,
        1,
    )
    again = post(api, f"/api/v1/batches/{batch}/cancel")
    assert (again.status_code, again.json) == (202, {"cancelled": 0})
    assert len(delivered_events(settings, batch)) == 1, "a second cancel sends nothing more"


# --- de-duplication and bytes out ----------------------------------------------------------------


@pytest.mark.parametrize("ending", ["close", "cancel"])
def test_a_deduplicated_upload_leaves_a_settled_batchs_image_alone_and_makes_a_new_one(
    renditions_service: ApiClient, probe: StackProbe, ending: str
) -> None:
    api = renditions_service
    data = jpeg(640, 480, seed=30 if ending == "close" else 31)
    batch = create_batch(api)["id"]
    earlier = upload(api, data, f"?batch={batch}&renditions=preview").json["id"]
    assert [r["name"] for r in completed_image(api, earlier)["renditions"]] == ["preview"]
    post(api, f"/api/v1/batches/{batch}/{ending}")
    settled = batch_of(api, batch)
    assert settled["status"] == ("finished" if ending == "close" else "cancelled")

    same = upload(api, data, "?dedupe=true&renditions=preview")
    assert (same.status_code, same.json["id"]) == (200, earlier), "it has what is asked"

    wider = upload(api, data, "?dedupe=true")
    assert wider.status_code == 201, wider.text
    made = wider.json["id"]
    assert made != earlier and wider.json["batch_id"] is None
    assert renditions_once_made(api, made, 3) == ["default", "thumb", "preview"]
    assert batch_of(api, batch) == settled, "the settled batch is unchanged"
    again = api.get(f"/api/v1/images/{earlier}").json
    assert again["status"] == "completed"
    assert [r["name"] for r in again["renditions"]] == ["preview"]


def test_a_batchs_bytes_out_count_every_rendition_of_an_image_reopened_for_more(
    renditions_service: ApiClient,
) -> None:
    api = renditions_service
    data = jpeg(640, 480, seed=32)
    batch = create_batch(api)["id"]
    image = upload(api, data, f"?batch={batch}&renditions=preview").json["id"]
    completed_image(api, image)
    again = upload(api, data, f"?batch={batch}&dedupe=true&renditions=thumb")
    assert (again.status_code, again.json["id"]) == (200, image)
    assert renditions_once_made(api, image, 2) == ["thumb", "preview"]
    post(api, f"/api/v1/batches/{batch}/close")

    document = batch_of(api, batch)
    renditions = api.get(f"/api/v1/images/{image}").json["renditions"]
    assert document["status"] == "finished"
    assert document["bytes_out"] == sum(r["bytes"] for r in renditions)


# --- per-user bounds -----------------------------------------------------------------------------


def tuned(settings: Settings, **changes: Any) -> Settings:
    """`settings` with `changes` to its sections: {"queue": {"bulk_shards": 2}}."""
    return dataclasses.replace(
        settings,
        **{
            section: dataclasses.replace(getattr(settings, section), **values)
            for section, values in changes.items()
        },
    )


def test_past_the_interactive_allowance_a_users_small_requests_go_to_the_bulk_lane(
    own_stack: OwnStack, issuer: Any, user_id: str
) -> None:
    settings = tuned(own_stack.settings, queue={"interactive_images_per_minute": 3})
    with api_for(settings, issuer.mint_token(user_id, ("user",))) as api:
        within = [upload(api, jpeg(64, 64, seed=40 + i)).json["id"] for i in range(3)]
        # Small enough to be interactive work, but past the allowance.
        pair = [
            i["id"] for i in bulk(api, [jpeg(64, 64, seed=50), jpeg(64, 64, seed=51)]).json["items"]
        ]
        past = upload(api, jpeg(64, 64, seed=52)).json["id"]
        other = ApiClient(api.client.app, issuer.mint_token(f"other-{uuid.uuid4()}", ("user",)))
        theirs = upload(other, jpeg(64, 64, seed=53)).json["id"]

    lanes = dict(
        query(
            settings,
            "SELECT id::text, lane FROM images WHERE id::text = ANY(%s)",
            [*within, *pair, past, theirs],
        )
    )
    assert [lanes[i] for i in within] == ["interactive"] * 3
    assert [lanes[i] for i in (*pair, past)] == ["bulk"] * 3
    assert lanes[theirs] == "interactive", "another user's allowance is their own"
    shard = bulk_shard(user_id, settings.queue.bulk_shards)
    depths = lane_depths(settings.queue)
    assert (depths["interactive"], depths[f"bulk.{shard}"]) == (4, 3)


def test_a_user_past_max_open_batches_gets_409_until_one_is_closed_or_cancelled(
    own_stack: OwnStack, issuer: Any, user_id: str
) -> None:
    settings = tuned(own_stack.settings, api={"max_open_batches_per_user": 2})
    with api_for(settings, issuer.mint_token(user_id, ("user",))) as api:
        first, second = create_batch(api)["id"], create_batch(api)["id"]
        refused = api.client.simulate_post("/api/v1/batches", json={}, headers=api.headers())
        assert refused.status_code == 409, refused.text
        assert refused.json["error"]["code"] == "conflict"
        assert "MAX_OPEN_BATCHES_PER_USER" in refused.json["error"]["message"]
        other = ApiClient(api.client.app, issuer.mint_token(f"other-{uuid.uuid4()}", ("user",)))
        create_batch(other)  # another user's batches are counted apart

        assert post(api, f"/api/v1/batches/{first}/close").status_code == 200
        create_batch(api)
        assert post(api, f"/api/v1/batches/{second}/cancel").status_code == 202
        create_batch(api)
        assert (
            api.client.simulate_post("/api/v1/batches", json={}, headers=api.headers()).status_code
            == 409
        )
    owned = query(settings, "SELECT status FROM batches WHERE owner = %s", user_id)
    assert sorted(s for (s,) in owned) == ["cancelled", "finished", "open", "open"]


# --- retention -----------------------------------------------------------------------------------


RETENTION = {
    "BATCH_RETENTION_DAYS": "1",
    "IMAGE_RETENTION_DAYS": "1",
    "RETENTION_SWEEP_SECONDS": "0.2",
}


def keys_of(probe: StackProbe, image_id: str) -> set[str]:
    """Every object of the image, original and results."""
    return {k for k in probe.originals() | probe.results() if image_id in k}


def test_retention_removes_expired_batches_and_images_with_every_object_and_keeps_the_rest(
    own_stack: OwnStack, probe: StackProbe
) -> None:
    api, settings = own_stack.api, own_stack.settings
    old_batch, new_batch = create_batch(api)["id"], create_batch(api)["id"]
    old_in_batch = [
        upload(api, jpeg(200, 100, seed=60 + i), f"?batch={old_batch}").json["id"] for i in range(2)
    ]
    old_in_batch.append(upload(api, truncated_jpeg(62), f"?batch={old_batch}").json["id"])
    new_in_batch = upload(api, jpeg(200, 100, seed=63), f"?batch={new_batch}").json["id"]
    old_loose = upload(api, jpeg(200, 100, seed=64)).json["id"]
    new_loose = upload(api, jpeg(200, 100, seed=65)).json["id"]
    for batch in (old_batch, new_batch):
        post(api, f"/api/v1/batches/{batch}/close")
    own_stack.start_node("--processes", "1", **RETENTION)
    for batch in (old_batch, new_batch):
        wait_for(lambda b=batch: batch_of(api, b)["status"] == "finished", timeout=90)
    for image in (old_loose, new_loose):
        completed_image(api, image)
    expiring = [*old_in_batch, old_loose]
    assert all(keys_of(probe, i) for i in expiring)
    kept = {i: keys_of(probe, i) for i in (new_in_batch, new_loose)}
    for image in expiring:  # read once, so the cache holds them
        assert api.get(f"/api/v1/images/{image}").status_code == 200

    # Two days pass for the old ones, together (one transaction), so that one sweep round
    # finds them all: the node's sweeper removes them at its next round.
    with psycopg.connect(settings.postgres_url) as conn:
        conn.execute(
            "UPDATE batches SET finished_at = now() - interval '2 days' WHERE id = %s", (old_batch,)
        )
        conn.execute(
            "UPDATE images SET updated_at = now() - interval '2 days' WHERE id = %s", (old_loose,)
        )

    wait_for(lambda: api.get(f"/api/v1/batches/{old_batch}").status_code == 404, timeout=60)
    for image in expiring:
        assert api.get(f"/api/v1/images/{image}").status_code == 404
        assert keys_of(probe, image) == set(), "no object outlives its row"
    assert query(settings, "SELECT count(*) FROM images WHERE batch_id = %s", old_batch) == [(0,)]
    wait_for(lambda: query(settings, "SELECT count(*) FROM expired_objects") == [(0,)], timeout=30)
    assert batch_of(api, new_batch)["counts"]["completed"] == 1
    for image, keys in kept.items():
        assert api.get(f"/api/v1/images/{image}").json["status"] == "completed"
        assert keys_of(probe, image) == keys


def test_objects_a_cut_short_retention_round_left_recorded_are_removed_by_the_next_round(
    own_stack: OwnStack, probe: StackProbe
) -> None:
    """A node killed between deleting expired rows and removing their objects leaves the
    objects recorded in `expired_objects`: the next round, on any node, removes them."""
    settings = own_stack.settings
    image_id = uuid.uuid4()
    key = original_key(image_id)
    ObjectStore(settings.storage).put_original(key, jpeg(64, 64, seed=70), "image/jpeg")
    query(
        settings,
        "INSERT INTO expired_objects (bucket, key, image_id) VALUES ('originals', %s, %s)",
        key,
        image_id,
    )
    assert key in probe.originals()

    own_stack.start_node("--processes", "1", **RETENTION)

    wait_for(lambda: key not in probe.originals(), timeout=60, what="the recorded object's removal")
    wait_for(
        lambda: (
            query(settings, "SELECT count(*) FROM expired_objects WHERE key = %s", key) == [(0,)]
        ),
        timeout=30,
    )
