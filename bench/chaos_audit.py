"""The chaos run's verdict: the client's records, the database and the buckets compared once the
system has settled. Pure over its inputs (`audit`), so the rules can be pinned by tests without
a stack; `gather` reads the inputs from the stack.

The rules: every accepted upload has a row that is `completed` (`failed` only for an input cut
short on purpose); no row is left pending or processing; one row per file sent; a completed
row's every rendition is stored with the size it recorded; every object belongs to a row that
lists it; every row's original is stored; batch counters equal their rows; every webhook batch
received a validly signed `batch.finished`.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg

from bench.chaos_receiver import WebhookReceiver, verified_finished
from bench.chaos_uploads import ClientLedger
from common.config import Settings
from common.storage import ObjectStore
from db import audit as audit_queries
from db.audit import AuditedImage

_IMAGE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Evidence:
    """What the audit reads: the client's ledger, every row, every object, the batches whose
    counters disagree, and the webhook batches that got a verified `batch.finished`."""

    ledger: ClientLedger
    rows: Sequence[AuditedImage]
    originals: dict[str, int]
    results: dict[str, int]
    counter_mismatches: Sequence[uuid.UUID]
    verified_webhooks: set[str]
    forged_webhooks: int


@dataclass
class Verdict:
    """The audit's figures; `problems` says in words what broke a rule (a sample of each)."""

    accepted: int = 0
    refused: int = 0
    completed: int = 0
    failed_own_input: int = 0
    failed_wrongly: int = 0
    lost: int = 0
    stuck: int = 0
    duplicated: int = 0
    orphans: int = 0
    missing_objects: int = 0
    counter_mismatches: int = 0
    webhooks_expected: int = 0
    webhooks_missing: int = 0
    webhooks_forged: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        broken = (
            self.failed_wrongly,
            self.lost,
            self.stuck,
            self.duplicated,
            self.orphans,
            self.missing_objects,
            self.counter_mismatches,
            self.webhooks_missing,
            self.webhooks_forged,
        )
        return not any(broken)

    def note(self, rule: str, items: Sequence[object]) -> None:
        if items:
            sample = ", ".join(str(i) for i in list(items)[:5])
            self.problems.append(f"{rule}: {len(items)} (e.g. {sample})")


def image_id_in(key: str) -> str | None:
    found = _IMAGE_ID.search(key)
    return None if found is None else found.group(0)


def audit(evidence: Evidence) -> Verdict:
    verdict = Verdict()
    rows = {str(row.id): row for row in evidence.rows}
    _check_uploads(evidence, rows, verdict)
    _check_rows(evidence, verdict)
    _check_objects(evidence, rows, verdict)
    verdict.counter_mismatches = len(evidence.counter_mismatches)
    verdict.note("batch counters differ from rows", evidence.counter_mismatches)
    expected = set(evidence.ledger.secrets)
    missing = sorted(expected - evidence.verified_webhooks)
    verdict.webhooks_expected = len(expected)
    verdict.webhooks_missing = len(missing)
    verdict.webhooks_forged = evidence.forged_webhooks
    verdict.note("batch.finished never received with a valid signature", missing)
    if evidence.forged_webhooks:
        verdict.problems.append(f"deliveries with a bad signature: {evidence.forged_webhooks}")
    return verdict


def _check_uploads(evidence: Evidence, rows: dict[str, AuditedImage], verdict: Verdict) -> None:
    accepted = evidence.ledger.accepted
    verdict.accepted = len(accepted)
    verdict.refused = len(evidence.ledger.records) - len(accepted)
    lost, wrong = [], []
    for record in accepted:
        row = rows.get(str(record.image_id))
        if row is None:
            lost.append(record.filename)
        elif row.status == "completed":
            verdict.completed += 1
            if record.bad_input:
                wrong.append(f"{record.filename} completed though cut short")
        elif row.status == "failed" and record.bad_input:
            verdict.failed_own_input += 1
        elif row.status == "failed":
            wrong.append(f"{record.filename}: {row.error}")
    verdict.lost, verdict.failed_wrongly = len(lost), len(wrong)
    verdict.note("accepted but no row", lost)
    verdict.note("failed for a reason not of its input", wrong)


def _check_rows(evidence: Evidence, verdict: Verdict) -> None:
    stuck = [f"{r.id} {r.status}" for r in evidence.rows if r.status in ("pending", "processing")]
    verdict.stuck = len(stuck)
    verdict.note("rows not terminal after settling", stuck)
    per_file = Counter((r.owner, r.filename) for r in evidence.rows)
    twice = [f"{owner}/{name} x{n}" for (owner, name), n in per_file.items() if n > 1]
    verdict.duplicated += len(twice)
    verdict.note("one file, several rows", twice)


def _check_objects(evidence: Evidence, rows: dict[str, AuditedImage], verdict: Verdict) -> None:
    orphans = [k for k in [*evidence.originals, *evidence.results] if image_id_in(k) not in rows]
    verdict.note("objects without a row", orphans)
    listed: set[str] = set()
    missing, different = [], []
    for row in evidence.rows:
        if row.original_key not in evidence.originals:
            missing.append(row.original_key)
        if row.status != "completed":
            continue
        for key, size in row.renditions:
            listed.add(key)
            stored = evidence.results.get(key)
            if stored is None:
                missing.append(key)
            elif size is not None and stored != size:
                different.append(f"{key}: {stored} bytes stored, {size} recorded")
    unlisted = [k for k in evidence.results if k not in listed and image_id_in(k) in rows]
    verdict.orphans = len(orphans) + len(unlisted)
    verdict.missing_objects = len(missing)
    verdict.duplicated += len(different)
    verdict.note("objects a row names but the store lacks", missing)
    verdict.note("a result other than the one its row recorded", different)
    verdict.note("result objects their row does not list", unlisted)


def gather(settings: Settings, ledger: ClientLedger, receiver: WebhookReceiver) -> Evidence:
    with psycopg.connect(settings.postgres_url) as conn:
        rows = audit_queries.audited_images(conn)
        mismatches = audit_queries.batch_counter_mismatches(conn)
    originals, results = ObjectStore(settings.storage).inventory()
    verified, forged = verified_finished(receiver, ledger.secrets)
    return Evidence(ledger, rows, originals, results, mismatches, verified, forged)
