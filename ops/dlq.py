"""`python -m ops dlq`: look at, requeue or give up on dead-lettered job messages.

Messages are read with `basic_get` and held unacknowledged on one channel; whatever is not
acknowledged goes back to the dead-letter queue when the channel closes, so `list` leaves the queue
as it was. `requeue` resets the images to `pending`, their attempts counted afresh (a worker must
find them claimable and render them), before publishing to the lane and shard stored with each
image (wherever the message died), and acks each message only after the broker confirmed its copy
on that queue; `fail` records the dead-letter reason on the images and acks.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika
import psycopg
from pika.adapters.blocking_connection import BlockingChannel

from common.broker import declare_topology, route
from common.cache import ImageCache
from common.config import Settings
from common.dead_letters import DeadLetter, take_dead_letters
from common.jobs import JobMessage
from db.images import fail_unfinished, get_images, mark_enqueued, reset_to_pending, statuses_of
from ops.connections import broker_connection, database

DEFAULT_SCAN_LIMIT = 10_000


@contextmanager
def held_dead_letters(
    settings: Settings, limit: int
) -> Iterator[tuple[BlockingChannel, list[DeadLetter]]]:
    """A confirming channel and the messages it holds; unacked ones return on exit."""
    with broker_connection(settings) as connection:
        channel = connection.channel()
        declare_topology(channel, settings.queue)
        channel.confirm_delivery()
        letters = take_dead_letters(channel, settings.queue.dead_letter_queue, limit)
        try:
            yield channel, letters
        finally:
            if channel.is_open:
                channel.close()


def image_statuses(settings: Settings, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not ids:
        return {}
    with database(settings) as conn:
        return statuses_of(conn, ids)


# --- selection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on: every one (`ids` None) or those of these images."""

    ids: frozenset[uuid.UUID] | None
    scan_limit: int = DEFAULT_SCAN_LIMIT

    def picks(self, letter: DeadLetter) -> bool:
        return self.ids is None or letter.image_id in self.ids

    def missing(self, letters: Sequence[DeadLetter]) -> list[uuid.UUID]:
        found = {letter.image_id for letter in letters}
        return sorted(self.ids - found, key=str) if self.ids is not None else []


@dataclass(frozen=True)
class DlqResult:
    """What a requeue or fail did: messages moved or removed, images changed, ids not found."""

    messages: int
    images_changed: list[uuid.UUID]
    malformed_skipped: int
    missing: list[uuid.UUID]


# --- requeue ------------------------------------------------------------------------------------


def requeue_dead_letters(settings: Settings, selection: Selection) -> DlqResult:
    """Move the selected well-formed messages back to the job queue; malformed ones stay."""
    persistent = pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
    )
    with held_dead_letters(settings, selection.scan_limit) as (channel, letters):
        chosen = [d for d in letters if selection.picks(d) and d.image_id is not None]
        ids = [d.image_id for d in chosen if d.image_id is not None]
        with database(settings) as conn:
            reset = reset_to_pending(conn, ids)
            routes: dict[uuid.UUID | None, JobMessage] = {
                r.id: JobMessage(r.id, "dlq", r.lane, r.shard) for r in get_images(conn, ids)
            }
            for letter in chosen:
                # An image deleted meanwhile has no row: its job goes back as it was (a claim
                # finds nothing to do and acks it).
                job = routes.get(letter.image_id) or JobMessage.decode(letter.body)
                queue = route(settings.queue, job)
                channel.basic_publish("", queue, letter.body, persistent, mandatory=True)
            mark_enqueued(conn, reset)
        for letter in chosen:
            channel.basic_ack(letter.delivery_tag)
    _invalidate(settings, reset)
    malformed = sum(1 for d in letters if d.image_id is None and selection.ids is None)
    return DlqResult(len(chosen), reset, malformed, selection.missing(letters))


# --- fail ---------------------------------------------------------------------------------------


def mark_dead_lettered(
    conn: psycopg.Connection[Any], letters: Sequence[DeadLetter]
) -> list[uuid.UUID]:
    """Non-terminal images -> failed with "dead-lettered: <reason>"; completed ones stay."""
    return fail_unfinished(
        conn,
        [(d.image_id, d.image_error) for d in letters if d.image_id is not None],
    )


def fail_dead_letters(settings: Settings, selection: Selection) -> DlqResult:
    """Mark the selected messages' images failed and remove the messages (malformed ones too)."""
    with held_dead_letters(settings, selection.scan_limit) as (channel, letters):
        chosen = [d for d in letters if selection.picks(d)]
        with database(settings) as conn:
            changed = mark_dead_lettered(conn, chosen)
        for letter in chosen:
            channel.basic_ack(letter.delivery_tag)
    _invalidate(settings, changed)
    return DlqResult(len(chosen), changed, 0, selection.missing(letters))


def _invalidate(settings: Settings, ids: Sequence[uuid.UUID]) -> None:
    cache = ImageCache.from_url(settings.redis_url, settings.redis_prefix)
    try:
        cache.invalidate(ids)
    finally:
        cache.client.close()


# --- list ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedLetter:
    image_id: str | None
    reason: str
    deaths: int
    from_queue: str
    image_status: str | None
    body: str


def list_dead_letters(settings: Settings, limit: int) -> list[ListedLetter]:
    """Up to `limit` dead letters with their images' current status; the queue is unchanged."""
    with held_dead_letters(settings, limit) as (_, letters):
        pass
    statuses = image_statuses(settings, [d.image_id for d in letters if d.image_id is not None])
    return [
        ListedLetter(
            image_id=str(d.image_id) if d.image_id else None,
            reason=d.reason,
            deaths=d.deaths,
            from_queue=d.from_queue,
            image_status=statuses.get(d.image_id) if d.image_id else None,
            body=d.describe_body,
        )
        for d in letters
    ]


def render_list(queue: str, listed: Sequence[ListedLetter]) -> str:
    lines = [f"dead-letter queue {queue}: showing {len(listed)}"]
    if listed:
        lines.append(f"  {'image':<38} {'reason':<16} {'deaths':>6}  {'status':<11} from")
    for item in listed:
        status = item.image_status or ("-" if item.image_id is None else "(no row)")
        lines.append(
            f"  {item.body:<38} {item.reason:<16} {item.deaths:>6}  {status:<11} {item.from_queue}"
        )
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ops dlq")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show dead letters, leaving them in place")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    for name, help_text in (
        ("requeue", "publish to each image's lane again, images back to pending"),
        ("fail", "mark the images failed with the dead-letter reason, drop the messages"),
    ):
        action = actions.add_parser(name, help=help_text)
        which = action.add_mutually_exclusive_group(required=True)
        which.add_argument("--all", action="store_true", help="every dead letter")
        which.add_argument("ids", nargs="*", type=uuid.UUID, default=[], metavar="IMAGE_ID")
        action.add_argument("--scan-limit", type=int, default=DEFAULT_SCAN_LIMIT)
    return parser


def dlq_command(argv: list[str], settings: Settings | None = None) -> int:
    """Dead letters: list [--limit N], requeue --all|IDS..., fail --all|IDS..."""
    args = _parser().parse_args(argv)
    settings = settings or Settings.from_env()
    if args.action == "list":
        listed = list_dead_letters(settings, args.limit)
        if args.json:
            print(json.dumps([item.__dict__ for item in listed], indent=2))
        else:
            print(render_list(settings.queue.dead_letter_queue, listed))
        return 0
    selection = Selection(None if args.all else frozenset(args.ids), args.scan_limit)
    act = requeue_dead_letters if args.action == "requeue" else fail_dead_letters
    return _report(args.action, act(settings, selection))


def _report(action: str, result: DlqResult) -> int:
    verb = "requeued" if action == "requeue" else "removed"
    changed = "reset to pending" if action == "requeue" else "marked failed"
    print(f"{verb} {result.messages} messages; {len(result.images_changed)} images {changed}")
    if result.malformed_skipped:
        print(f"left {result.malformed_skipped} malformed messages (use `dlq fail` to drop them)")
    if result.missing:
        missing = ", ".join(str(i) for i in result.missing)
        print(f"not in the dead-letter queue: {missing}", file=sys.stderr)
        return 1
    return 0
