"""Bulk uploads, idempotent retries and de-duplication, through the real API and worker."""

from __future__ import annotations

import threading

import pytest

from tests.support import ApiClient, StackProbe, jpeg, multipart, png, wait_for


def bulk(api: ApiClient, files: list[tuple[str, bytes]], query: str = "", **headers: str):
    body, content_type = multipart([("image", name, data, "image/jpeg") for name, data in files])
    return api.post_raw(f"/api/v1/uploads{query}", body, content_type, **headers)


def test_mixed_batch_accepts_good_parts_and_reports_bad_ones(
    api: ApiClient, probe: StackProbe, user_id: str, worker
) -> None:
    before = probe.originals()
    files = [
        ("a.jpg", jpeg(900, 600, seed=1)),
        ("notes.jpg", b"just some text"),
        ("b.png", png(400, 300, seed=2)),
        ("empty.jpg", b""),
        ("c.jpg", jpeg(1200, 800, seed=3)),
    ]
    response = bulk(api, files)
    assert response.status_code == 207, response.text
    body = response.json
    assert (body["accepted"], body["rejected"]) == (3, 2)
    assert [i["status"] for i in body["items"]] == [201, 415, 201, 400, 201]
    assert [i["filename"] for i in body["items"]] == [name for name, _ in files]
    assert body["items"][1]["error"]["code"] == "unsupported_media_type"
    ids = [i["id"] for i in body["items"] if i["status"] == 201]

    rows = probe.rows_for(user_id)
    assert sorted(str(r[0]) for r in rows) == sorted(ids)
    assert probe.originals() - before == {f"originals/{i}" for i in ids}

    def all_done():
        items = api.get("/api/v1/images", ids=",".join(ids)).json["items"]
        return len(items) == 3 and all(i["status"] == "completed" for i in items)

    wait_for(all_done, timeout=90)


def test_same_idempotency_key_and_body_returns_the_first_answer_and_stores_nothing(
    api: ApiClient, probe: StackProbe, user_id: str
) -> None:
    files = [("a.jpg", jpeg(300, 200, seed=4)), ("b.jpg", jpeg(300, 200, seed=5))]
    first = bulk(api, files, **{"Idempotency-Key": "batch-0001"})
    assert first.status_code == 207
    originals = probe.originals()
    retry = bulk(api, files, **{"Idempotency-Key": "batch-0001"})
    assert retry.status_code == 207
    assert retry.json == first.json
    assert len(probe.rows_for(user_id)) == 2
    assert probe.originals() == originals


def test_same_idempotency_key_with_another_body_is_409(api: ApiClient, user_id: str, probe) -> None:
    assert (
        bulk(api, [("a.jpg", jpeg(64, 64, seed=6))], **{"Idempotency-Key": "k1"}).status_code == 207
    )
    other = bulk(api, [("a.jpg", jpeg(64, 64, seed=7))], **{"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert other.json["error"]["code"] == "conflict"
    assert len(probe.rows_for(user_id)) == 1


def test_single_route_honours_idempotency_keys(api: ApiClient, user_id: str, probe) -> None:
    data = jpeg(200, 100, seed=8)
    first = api.client.simulate_post(
        "/api/v1/upload",
        body=multipart([("image", "x.jpg", data, "image/jpeg")])[0],
        headers=api.headers({"Content-Type": multipart([])[1], "Idempotency-Key": "single-1"}),
    )
    assert first.status_code == 201, first.text
    again = api.client.simulate_post(
        "/api/v1/upload",
        body=multipart([("image", "x.jpg", data, "image/jpeg")])[0],
        headers=api.headers({"Content-Type": multipart([])[1], "Idempotency-Key": "single-1"}),
    )
    assert again.status_code == 201 and again.json["id"] == first.json["id"]
    assert len(probe.rows_for(user_id)) == 1


def test_concurrent_duplicates_store_one_copy(api: ApiClient, user_id: str, probe) -> None:
    files = [(f"{i}.jpg", jpeg(200, 150, seed=10 + i)) for i in range(4)]
    answers = []

    def send() -> None:
        answers.append(bulk(api, files, **{"Idempotency-Key": "racing"}))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    successes = [a for a in answers if a.status_code == 207]
    assert successes, [a.text for a in answers]
    assert all(a.json == successes[0].json for a in successes)
    assert all(a.status_code in (207, 409) for a in answers)
    assert len(probe.rows_for(user_id)) == 4


def test_dedupe_returns_the_existing_image_instead_of_a_copy(
    api: ApiClient, user_id: str, probe
) -> None:
    data = jpeg(320, 240, seed=20)
    first = bulk(api, [("one.jpg", data)]).json["items"][0]
    originals = probe.originals()
    again = bulk(api, [("again.jpg", data), ("twice.jpg", data)], query="?dedupe=true").json
    assert [i["status"] for i in again["items"]] == [200, 200]
    assert {i["id"] for i in again["items"]} == {first["id"]}
    assert all(i["deduplicated"] for i in again["items"])
    assert probe.originals() == originals
    assert len(probe.rows_for(user_id)) == 1


def test_too_many_parts_is_413_and_stores_nothing(app, issuer, probe, user_id, env) -> None:
    from common.config import Settings
    from ingest.app import Dependencies, create_app

    settings = Settings.from_env({**env, "MAX_BULK_PARTS": "3"})
    deps = Dependencies.connect(settings)
    try:
        api = ApiClient(create_app(settings, deps), issuer.mint_token(user_id, ("user",)))
        before = probe.originals()
        response = bulk(api, [(f"{i}.jpg", jpeg(32, 32, seed=i)) for i in range(4)])
        assert response.status_code == 413
        assert probe.rows_for(user_id) == [] and probe.originals() == before
    finally:
        deps.close()


@pytest.mark.parametrize("key", ["", "with space", "x" * 201])
def test_malformed_idempotency_key_is_400(key: str, api: ApiClient, user_id: str, probe) -> None:
    response = bulk(api, [("a.jpg", jpeg(32, 32))], **{"Idempotency-Key": key})
    assert response.status_code == 400
    assert probe.rows_for(user_id) == []


def test_long_poll_longer_than_allowed_is_400(api: ApiClient) -> None:
    image_id = api.upload(jpeg(64, 64, seed=31)).json["id"]
    assert api.get(f"/api/v1/images/{image_id}", wait=3600).status_code == 400


def test_body_cut_after_good_parts_is_400_and_removes_what_was_stored(
    api: ApiClient, probe: StackProbe, user_id: str
) -> None:
    """Parts are stored as they are read; a request that then turns out malformed must take
    those originals back."""
    before = probe.originals()
    body, content_type = multipart(
        [("image", f"{i}.jpg", jpeg(320, 240, seed=40 + i), "image/jpeg") for i in range(3)]
    )
    cut = body[: len(body) - 2000]
    response = api.post_raw("/api/v1/uploads", cut, content_type)
    assert response.status_code == 400, response.text
    assert probe.rows_for(user_id) == []
    assert probe.originals() == before


def test_expired_idempotency_answers_are_pruned(issuer, settings, user_id) -> None:
    """A freshly started API process prunes expired answers at its first keyed upload."""
    import psycopg

    from ingest.app import Dependencies, create_app

    with psycopg.connect(settings.postgres_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO idempotency_keys (owner, key, request_hash, status_code, response,
                                             created_at)
               VALUES (%s, 'stale', 'x', 207, '{}', now() - interval '30 days')""",
            (user_id,),
        )
    deps = Dependencies.connect(settings)
    try:
        api = ApiClient(create_app(settings, deps), issuer.mint_token(user_id, ("user",)))
        response = bulk(api, [("a.jpg", jpeg(64, 64, seed=77))], **{"Idempotency-Key": "fresh"})
        assert response.status_code == 207
    finally:
        deps.close()
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute("SELECT key FROM idempotency_keys WHERE owner = %s", (user_id,))
        assert [r[0] for r in rows] == ["fresh"]
