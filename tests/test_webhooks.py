"""Webhook deliveries: signed by the Standard Webhooks scheme (checked with its reference
package), durable and retried, never redirected, and never sent to private addresses unless
allowed. A receiver on 127.0.0.1 plays the user's endpoint."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from common.config import Settings
from common.webhooks import Deadline, TargetRefused, check_callback_url, resolve_target
from engine.webhooks import MAX_RETRY_SECONDS, retry_delay
from ops.status import status_command
from tests.support import (
    ApiClient,
    OwnStack,
    Received,
    Receiver,
    api_for,
    close_batch,
    create_batch,
    deliverer_on,
    jpeg,
    multipart,
    wait_for,
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    served = Receiver()
    served.thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


def upload_into(api: ApiClient, batch_id: str, data: bytes, name: str = "a.jpg") -> str:
    body, content_type = multipart([("image", name, data, "image/jpeg")])
    response = api.post_raw(f"/api/v1/upload?batch={batch_id}", body, content_type)
    assert response.status_code == 201, response.text
    return str(response.json["id"])


def verified(secret: str, request: Received) -> dict[str, Any]:
    """The event, once the reference implementation has verified its signature."""
    return Webhook(secret).verify(request.body, request.headers)  # type: ignore[no-any-return]


def test_batch_and_image_events_are_delivered_signed_by_the_standard_webhooks_scheme(
    own_stack: OwnStack, receiver: Receiver
) -> None:
    api = own_stack.api
    batch = create_batch(api, callback_url=receiver.url(), events=["image", "batch"])
    good = upload_into(api, batch["id"], jpeg(200, 120, seed=1))
    cut = jpeg(200, 120, seed=2)
    bad = upload_into(api, batch["id"], cut[: len(cut) // 2], "cut.jpg")
    api.client.simulate_post(f"/api/v1/batches/{batch['id']}/close", headers=api.headers())
    own_stack.start_node("--processes", "1")

    wait_for(lambda: "batch.finished" in {e["type"] for e in receiver.events()}, timeout=90)
    wait_for(lambda: len(receiver.requests) >= 3, timeout=30)
    events = {}
    for request in receiver.requests:
        event = verified(batch["webhook_secret"], request)
        events[request.headers["webhook-id"]] = event
    by_type = {e["type"]: e for e in events.values()}
    assert set(by_type) == {"image.completed", "image.failed", "batch.finished"}
    assert by_type["image.completed"]["data"]["id"] == good
    assert by_type["image.failed"]["data"]["id"] == bad
    assert by_type["image.failed"]["data"]["error"]
    finished = by_type["batch.finished"]["data"]
    assert (finished["id"], finished["status"]) == (batch["id"], "finished")
    assert finished["counts"]["completed"] == 1 and finished["counts"]["failed"] == 1
    assert "webhook_secret" not in finished


def delivery_rows(settings: Settings) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.postgres_url) as conn:
        return conn.execute(
            """SELECT event_type, attempts, delivered_at IS NOT NULL, abandoned_at IS NOT NULL,
                      last_error, next_attempt_at > now()
                 FROM webhook_deliveries ORDER BY created_at"""
        ).fetchall()


def make_due(settings: Settings) -> None:
    with psycopg.connect(settings.postgres_url) as conn:
        conn.execute("UPDATE webhook_deliveries SET next_attempt_at = now()")


def test_a_tampered_delivery_fails_verification(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str
) -> None:
    with api_for(own_database, issuer.mint_token(user_id)) as api, deliverer_on(own_database) as d:
        batch = create_batch(api, callback_url=receiver.url())
        close_batch(api, batch["id"])
        assert d.deliver_once() == 1
    [request] = receiver.requests
    assert verified(batch["webhook_secret"], request)["type"] == "batch.finished"
    tampered = dataclasses.replace(request, body=request.body.replace(b"finished", b"cancelled"))
    with pytest.raises(WebhookVerificationError):
        verified(batch["webhook_secret"], tampered)


def test_cancelling_a_batch_sends_one_cancelled_event(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str
) -> None:
    with api_for(own_database, issuer.mint_token(user_id)) as api, deliverer_on(own_database) as d:
        batch = create_batch(api, callback_url=receiver.url())
        for _ in range(2):
            api.client.simulate_post(f"/api/v1/batches/{batch['id']}/cancel", headers=api.headers())
        d.deliver_once()
        d.deliver_once()
    [event] = [verified(batch["webhook_secret"], r) for r in receiver.requests]
    assert (event["type"], event["data"]["status"]) == ("batch.cancelled", "cancelled")


def test_a_failed_delivery_is_retried_later_with_the_same_id_and_body(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str
) -> None:
    receiver.answers = [(500, {}), (204, {})]
    with api_for(own_database, issuer.mint_token(user_id)) as api, deliverer_on(own_database) as d:
        batch = create_batch(api, callback_url=receiver.url())
        close_batch(api, batch["id"])
        d.deliver_once()
        [(_, attempts, delivered, _, error, later)] = delivery_rows(own_database)
        assert (attempts, delivered, error, later) == (1, False, "HTTP 500", True)
        assert d.deliver_once() == 0, "not due again before its backoff"
        make_due(own_database)
        d.deliver_once()
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    assert [row[2] for row in delivery_rows(own_database)] == [True]


def test_a_redirect_is_not_followed_and_counts_as_a_failure(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str
) -> None:
    receiver.answers = [(302, {"Location": receiver.url(path="/elsewhere")})]
    with api_for(own_database, issuer.mint_token(user_id)) as api, deliverer_on(own_database) as d:
        close_batch(api, create_batch(api, callback_url=receiver.url())["id"])
        d.deliver_once()
    assert [r.path for r in receiver.requests] == ["/hook"]
    [(_, _, delivered, _, error, _)] = delivery_rows(own_database)
    assert (delivered, error) == (False, "HTTP 302")


def test_a_delivery_failing_past_the_retry_window_is_abandoned(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str
) -> None:
    receiver.answers = [(503, {})]
    with api_for(own_database, issuer.mint_token(user_id)) as api, deliverer_on(own_database) as d:
        close_batch(api, create_batch(api, callback_url=receiver.url())["id"])
        with psycopg.connect(own_database.postgres_url) as conn:
            conn.execute("UPDATE webhook_deliveries SET created_at = now() - interval '25 hours'")
        d.deliver_once()
        make_due(own_database)
        assert d.deliver_once() == 0
    [(_, attempts, delivered, abandoned, _, _)] = delivery_rows(own_database)
    assert (attempts, delivered, abandoned) == (1, False, True)
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.1.2.3/hook",
        "https://192.168.0.7/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://[fe80::1]/hook",
        "http://203.0.113.9/hook",
    ],
)
def test_private_targets_and_plain_http_are_refused_unless_allowed(
    own_database: Settings, issuer: Any, user_id: str, url: str
) -> None:
    strict = dataclasses.replace(
        own_database, webhooks=dataclasses.replace(own_database.webhooks, allow_private=False)
    )
    with api_for(strict, issuer.mint_token(user_id)) as api:
        response = api.client.simulate_post(
            "/api/v1/batches", json={"callback_url": url}, headers=api.headers()
        )
        assert response.status_code == 400, response.text
        assert api.get("/api/v1/batches").json["items"] == []


def test_delivery_checks_the_target_again_so_a_name_rebound_to_a_private_address_is_not_called(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str
) -> None:
    strict = dataclasses.replace(
        own_database, webhooks=dataclasses.replace(own_database.webhooks, allow_private=False)
    )
    url = f"https://hooks.example.invalid:{receiver.port}/hook"
    with api_for(strict, issuer.mint_token(user_id)) as api:
        close_batch(api, create_batch(api, callback_url=url)["id"])
    # By delivery time the name points at this machine.
    with deliverer_on(strict, resolve=lambda host, port: ["127.0.0.1"]) as deliverer:
        deliverer.deliver_once()
    assert receiver.requests == []
    [(_, attempts, delivered, _, error, _)] = delivery_rows(own_database)
    assert (attempts, delivered) == (1, False)
    assert "private" in error


def test_a_host_with_any_private_address_is_refused_and_a_public_one_is_pinned() -> None:
    strict = dataclasses.replace(Settings().webhooks, allowed_ports=frozenset({443, 8443}))

    def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.8"]

    with pytest.raises(TargetRefused, match="private"):
        callback = check_callback_url("https://example.test/hook", strict)
        resolve_target(callback, strict, mixed, Deadline(5))
    callback = check_callback_url("https://example.test:8443/h?x=1", strict)
    target = resolve_target(callback, strict, lambda h, p: ["93.184.216.34"], Deadline(5))
    assert (target.address, target.port, target.path) == ("93.184.216.34", 8443, "/h?x=1")


def test_retry_delays_double_with_jitter_up_to_an_hour() -> None:
    rng = random.Random(7)
    delays = [retry_delay(attempt, rng) for attempt in range(1, 30)]
    ceilings = [min(MAX_RETRY_SECONDS, 10.0 * 2 ** (a - 1)) for a in range(1, 30)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays), "jittered"
    assert max(delays) <= MAX_RETRY_SECONDS and delays[-1] >= MAX_RETRY_SECONDS / 2


def test_ops_status_shows_the_webhook_backlog_and_its_oldest_event(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str, capsys: Any
) -> None:
    receiver.answers = [(500, {})]
    with api_for(own_database, issuer.mint_token(user_id)) as api:
        for _ in range(2):
            close_batch(api, create_batch(api, callback_url=receiver.url())["id"])
    with psycopg.connect(own_database.postgres_url) as conn:
        conn.execute("UPDATE webhook_deliveries SET created_at = now() - interval '90 seconds'")

    status_command(["--json"], own_database)
    webhooks = json.loads(capsys.readouterr().out)["webhooks"]
    assert (webhooks["undelivered"], webhooks["abandoned"]) == (2, 0)
    assert 90 <= webhooks["oldest_age_seconds"] < 3600
    status_command([], own_database)
    assert "webhooks: 2 undelivered, oldest" in capsys.readouterr().out


def test_a_finished_event_describes_the_batch_as_it_finished_even_if_a_retry_reopened_it(
    own_database: Settings, receiver: Receiver, issuer: Any, user_id: str
) -> None:
    with api_for(own_database, issuer.mint_token(user_id)) as api:
        batch = create_batch(api, callback_url=receiver.url())
        image_id = upload_into(api, batch["id"], jpeg(64, 48, seed=3))
        with psycopg.connect(own_database.postgres_url) as conn:
            conn.execute(
                "UPDATE images SET status = 'failed', error = 'decoder said no' WHERE id = %s",
                (image_id,),
            )
        close_batch(api, batch["id"])
        retried = api.client.simulate_post(
            f"/api/v1/batches/{batch['id']}/retry", headers=api.headers()
        )
        assert retried.json == {"requeued": 1}
        assert api.get(f"/api/v1/batches/{batch['id']}").json["status"] == "closed"
    with deliverer_on(own_database) as deliverer:
        deliverer.deliver_once()

    [request] = receiver.requests
    event = verified(batch["webhook_secret"], request)
    assert event["type"] == "batch.finished"
    assert (event["data"]["status"], event["data"]["counts"]["failed"]) == ("finished", 1)
    assert event["data"]["finished_at"] is not None
