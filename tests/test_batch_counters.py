"""A batch's counters equal its rows after a run with every kind of trouble: images that fail,
a worker node killed mid-batch, a retry, a cancel racing with processing, and a deletion."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from common.broker import queue_depth
from db.batches import COUNTED_STATUSES
from tests.support import ApiClient, OwnStack, StackProbe, create_batch, jpeg, multipart, wait_for

pytestmark = pytest.mark.slow

# Every batch of the first node lasts at least this long, so the kill and the cancel land
# while work is still queued whatever the CPU's speed.
HOLD = {"WORKER_TEST_HOLD_BATCH_SECONDS": "0.3"}
NODE_FLAGS = ("--processes", "2", "--batch-size", "4", "--prefetch", "8")


def upload(api: ApiClient, batch_id: str, good: int, truncated: int, seed: int) -> list[str]:
    files = [(f"good-{i}.jpg", jpeg(160, 120, seed=seed + i)) for i in range(good)]
    for i in range(truncated):
        data = jpeg(160, 120, seed=seed + 1000 + i)
        files.append((f"cut-{i}.jpg", data[: len(data) // 2]))
    ids = []
    for start in range(0, len(files), 16):
        body, content_type = multipart(
            [("image", name, data, "image/jpeg") for name, data in files[start : start + 16]]
        )
        answer = api.post_raw(f"/api/v1/uploads?batch={batch_id}", body, content_type)
        assert answer.json["accepted"] == len(files[start : start + 16]), answer.text
        ids.extend(item["id"] for item in answer.json["items"])
    return ids


def post(api: ApiClient, path: str) -> Any:
    response = api.client.simulate_post(path, headers=api.headers())
    assert response.status_code in (200, 202), response.text
    return response.json


def counters_and_rows(settings: Any, batch_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """The batch's counters, and the same figures counted over its rows, from one snapshot (a
    node may be changing statuses meanwhile)."""
    with psycopg.connect(settings.postgres_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        row = conn.execute(
            f"""SELECT {", ".join(COUNTED_STATUSES)}, bytes_in, bytes_out
                  FROM batches WHERE id = %s""",
            (batch_id,),
        ).fetchone()
        by_status = dict(
            conn.execute(
                "SELECT status, count(*) FROM images WHERE batch_id = %s GROUP BY status",
                (batch_id,),
            ).fetchall()
        )
        sums = conn.execute(
            """SELECT coalesce(sum(size_bytes), 0),
                      coalesce(sum(result_size_bytes) FILTER (WHERE status = 'completed'), 0)
                 FROM images WHERE batch_id = %s""",
            (batch_id,),
        ).fetchone()
    assert row is not None and sums is not None
    kept = dict(zip([*COUNTED_STATUSES, "bytes_in", "bytes_out"], row, strict=True))
    counted = {status: by_status.get(status, 0) for status in COUNTED_STATUSES}
    return kept, {**counted, "bytes_in": sums[0], "bytes_out": sums[1]}


def assert_counters_equal_rows(settings: Any, batch_id: str) -> None:
    kept, counted = counters_and_rows(settings, batch_id)
    assert kept == counted


def status(api: ApiClient, batch_id: str) -> dict[str, Any]:
    return api.get(f"/api/v1/batches/{batch_id}").json  # type: ignore[no-any-return]


def test_counters_equal_the_rows_after_failures_a_killed_node_a_retry_a_cancel_and_a_delete(
    own_stack: OwnStack, probe: StackProbe, issuer: Any
) -> None:
    api, settings = own_stack.api, own_stack.settings
    first = str(create_batch(api)["id"])
    first_ids = upload(api, first, good=24, truncated=8, seed=100)
    post(api, f"/api/v1/batches/{first}/close")

    # A node killed while it holds claimed images: their messages come back to another node.
    doomed = own_stack.start_node(*NODE_FLAGS, **HOLD)
    wait_for(lambda: status(api, first)["counts"]["completed"] >= 2, timeout=90)
    doomed.kill()
    doomed.wait()
    assert status(api, first)["status"] == "closed", "killed before the batch could finish"
    survivor = own_stack.start_node(*NODE_FLAGS)
    wait_for(lambda: status(api, first)["status"] == "finished", timeout=120)
    assert status(api, first)["counts"]["failed"] == 8
    assert_counters_equal_rows(settings, first)

    assert post(api, f"/api/v1/batches/{first}/retry") == {"requeued": 8}
    assert_counters_equal_rows(settings, first)
    wait_for(lambda: status(api, first)["status"] == "finished", timeout=120)
    assert status(api, first)["counts"] | {"completed": 0} == dict.fromkeys(COUNTED_STATUSES, 0) | {
        "failed": 8
    }

    # A cancel while a slow node is part-way through the second batch.
    own_stack.stop_nodes()
    assert survivor.poll() is not None
    second = str(create_batch(api)["id"])
    second_ids = upload(api, second, good=24, truncated=0, seed=300)
    own_stack.start_node(*NODE_FLAGS, **HOLD)
    wait_for(lambda: status(api, second)["counts"]["completed"] >= 1, timeout=90)
    cancelled = post(api, f"/api/v1/batches/{second}/cancel")["cancelled"]
    assert cancelled > 0, "the hold keeps images queued when the first one completes"
    wait_for(lambda: queue_depth(settings.queue) == 0, timeout=90)
    wait_for(lambda: status(api, second)["counts"]["processing"] == 0, timeout=90)

    admin = ApiClient(api.client.app, issuer.mint_token(f"admin-{uuid.uuid4()}", ("admin",)))
    assert admin.delete(f"/api/v1/images/{first_ids[0]}").status_code == 204

    for batch_id in (first, second):
        assert_counters_equal_rows(settings, batch_id)
    after = status(api, second)
    assert after["status"] == "cancelled"
    assert after["counts"]["cancelled"] == cancelled
    assert after["counts"]["completed"] + cancelled == len(second_ids)
    results = probe.results()
    rows = {str(r[0]): r for r in probe.rows_for(status(api, second)["owner"])}
    for image_id in second_ids:
        has_result = f"results/{image_id}.png" in results
        assert has_result == (rows[image_id][1] == "completed"), rows[image_id]
