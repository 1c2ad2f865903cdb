"""The chaos run's clients: a seeded plan of upload sessions (several owners; bulk batches, some
with a webhook, and interactive single uploads) run through the project's own upload client,
and the client-side record of every file: what was sent, whether it was meant to fail, and the
id the API answered.

Images are one small JPEG made unique by a numbered comment (bench.soak), so 20,000 cost little
disk; one in a hundred is cut short, an input whose failure is its own.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.soak import base_jpeg, unique_jpeg
from ingest.client import (
    ApiConnection,
    RetryPolicy,
    UploadClient,
    UploadOptions,
    send_with_retries,
)

BULK_SESSION_IMAGES = 400
MIN_SESSION_IMAGES = 20
BULK_REQUEST_IMAGES = 25
BAD_INPUT_EVERY = 100
# A client that keeps trying through restarts (each at most seconds) before it gives up.
CLIENT_POLICY = RetryPolicy(max_attempts=60, base_s=0.25, cap_s=4.0)


@dataclass(frozen=True)
class SessionPlan:
    """One client run: an owner's `count` images from number `first`, interactive (one per
    request, no batch) or bulk (a batch, with a webhook or not)."""

    index: int
    owner: str
    interactive: bool
    webhook: bool
    first: int
    count: int


def plan_sessions(uploads: int, owners: int, seed: int) -> list[SessionPlan]:
    """Sessions covering `uploads` images, at least about a dozen however few: every fourth
    interactive, every other bulk one with a webhook; owners drawn by the seed."""
    rng = random.Random(seed)
    bulk_size = max(MIN_SESSION_IMAGES, min(BULK_SESSION_IMAGES, uploads // 12))
    interactive_size = max(MIN_SESSION_IMAGES // 4, bulk_size // 4)
    plans: list[SessionPlan] = []
    first = 0
    while first < uploads:
        index = len(plans)
        interactive = index % 4 == 3
        count = min(interactive_size if interactive else bulk_size, uploads - first)
        plans.append(
            SessionPlan(
                index=index,
                owner=f"chaos-owner-{rng.randrange(owners)}",
                interactive=interactive,
                webhook=not interactive and index % 2 == 0,
                first=first,
                count=count,
            )
        )
        first += count
    return plans


def is_bad_input(number: int) -> bool:
    """Whether image `number` is sent cut short: one in BAD_INPUT_EVERY."""
    return number % BAD_INPUT_EVERY == BAD_INPUT_EVERY // 2


def write_session_images(directory: Path, plan: SessionPlan) -> list[Path]:
    template = base_jpeg(160, 120)
    folder = directory / f"session-{plan.index:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(plan.first, plan.first + plan.count):
        data = unique_jpeg(template, number)
        if is_bad_input(number):
            data = data[: len(data) // 2]
        path = folder / f"chaos-{number:07d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class UploadRecord:
    """One file as the client saw it."""

    filename: str
    owner: str
    bad_input: bool
    image_id: str | None
    batch_id: str | None
    reason: str | None


@dataclass(frozen=True)
class ClientLedger:
    """Everything the clients know: each file's record, and each webhook batch's secret."""

    records: list[UploadRecord]
    secrets: dict[str, str]
    batches: list[str]

    @property
    def accepted(self) -> list[UploadRecord]:
        return [r for r in self.records if r.image_id is not None]


class SessionRunner:
    """Runs planned sessions `at_once` at a time against the API."""

    def __init__(
        self,
        api_url: str,
        token_for: Callable[[str], str],
        callback_url: str,
        images_dir: Path,
    ) -> None:
        self._url = api_url
        self._token_for = token_for
        self._callback_url = callback_url
        self._images_dir = images_dir
        self._salt = uuid.uuid4().hex
        self._lock = threading.Lock()
        self.records: list[UploadRecord] = []
        self.secrets: dict[str, str] = {}
        self.batches: list[str] = []
        self.errors: list[str] = []

    def run(self, plans: Sequence[SessionPlan], at_once: int, span_s: float) -> ClientLedger:
        """Run the sessions, `at_once` at a time, session i starting no earlier than
        i / len(plans) of `span_s` after the first: the uploads are spread over the faults
        rather than done before most of them."""
        started = time.monotonic()
        due = {plan.index: started + span_s * n / len(plans) for n, plan in enumerate(plans)}
        with ThreadPoolExecutor(at_once, thread_name_prefix="chaos-session") as pool:
            list(pool.map(lambda plan: self._run_logged(plan, due[plan.index]), plans))
        return ClientLedger(self.records, self.secrets, self.batches)

    def _run_logged(self, plan: SessionPlan, due: float) -> None:
        time.sleep(max(0.0, due - time.monotonic()))
        try:
            self.run_session(plan)
        except Exception as exc:  # one session's crash must not hide the others' records
            with self._lock:
                self.errors.append(f"session {plan.index}: {exc!r}")

    def run_session(self, plan: SessionPlan) -> None:
        paths = write_session_images(self._images_dir, plan)
        token = self._token_for(plan.owner)
        batch_id = None if plan.interactive else self._open_batch(token, plan)
        options = UploadOptions(
            url=self._url,
            token=token,
            concurrency=2,
            batch_size=1 if plan.interactive else BULK_REQUEST_IMAGES,
            single=plan.interactive,
            wait=False,
            request_timeout_s=60.0,
            max_attempts=CLIENT_POLICY.max_attempts,
            backoff_base_s=CLIENT_POLICY.base_s,
            backoff_cap_s=CLIENT_POLICY.cap_s,
            key_salt=self._salt,
            batch_id=batch_id,
        )
        client = UploadClient(options)
        client.prepare(paths)
        report = client.run()
        if batch_id is not None:
            self._close_batch(token, batch_id)
        bad = {p.name for p in paths if is_bad_input(_number(p))}
        records = [
            UploadRecord(f.filename, plan.owner, f.filename in bad, f.image_id, batch_id, f.reason)
            for f in report.files
        ]
        with self._lock:
            self.records.extend(records)

    def _open_batch(self, token: str, plan: SessionPlan) -> str:
        fields: dict[str, object] = {"name": f"chaos session {plan.index}"}
        if plan.webhook:
            fields |= {"callback_url": self._callback_url, "events": ["batch"]}
        body = json.dumps(fields).encode()
        connection = ApiConnection(self._url, token, 60.0)
        try:
            response, _, reason = send_with_retries(
                lambda: connection.request(
                    "POST", "/api/v1/batches", [body], {"Content-Type": "application/json"}
                ),
                CLIENT_POLICY,
            )
        finally:
            connection.close()
        if response is None or response.status != 201:
            why = reason or (response.error_text() if response else "no answer")
            raise RuntimeError(f"could not create a batch: {why}")
        document = response.json()
        with self._lock:
            self.batches.append(document["id"])
            if plan.webhook:
                self.secrets[document["id"]] = document["webhook_secret"]
        return str(document["id"])

    def _close_batch(self, token: str, batch_id: str) -> None:
        """Close the batch (again: the client closes it itself only when every file was
        answered); closing a closed batch answers 200 too."""
        connection = ApiConnection(self._url, token, 60.0)
        try:
            response, _, reason = send_with_retries(
                lambda: connection.request("POST", f"/api/v1/batches/{batch_id}/close"),
                CLIENT_POLICY,
            )
        finally:
            connection.close()
        if response is None or response.status != 200:
            why = reason or (response.error_text() if response else "no answer")
            with self._lock:
                self.errors.append(f"batch {batch_id} not closed: {why}")


def _number(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])
