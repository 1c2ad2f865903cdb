"""`python -m bench chaos` in small: the seeded schedule covers every kind of fault, the audit
catches each kind of loss it promises to, and a short run on its own stack (a few hundred
uploads, every kind of fault once) ends with a passing verdict and a table saying so."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from bench.chaos import ChaosConfig, Recovery, chaos_markdown, recoveries, run_chaos
from bench.chaos_audit import Evidence, audit
from bench.chaos_faults import FAULT_KINDS, InjectedFault, fault_schedule
from bench.chaos_receiver import Delivery, signature_is_valid
from bench.chaos_uploads import ClientLedger, UploadRecord
from bench.results import build_document
from common.webhooks import new_secret, signature_headers
from db.audit import AuditedImage
from tests.support import ROOT


def test_the_schedule_is_a_function_of_its_seed_and_holds_every_kind_of_fault() -> None:
    first, again, other = fault_schedule(7, 60), fault_schedule(7, 60), fault_schedule(8, 60)

    assert first == again
    assert first != other
    kinds = [fault.kind for fault in first]
    assert {kinds.count(kind) for kind in FAULT_KINDS} <= {60 // len(FAULT_KINDS), 8}
    assert set(kinds) == set(FAULT_KINDS)
    assert {f.kind for f in fault_schedule(1, len(FAULT_KINDS))} == set(FAULT_KINDS)


def test_a_recovery_counts_only_until_the_next_fault_begins() -> None:
    plan = fault_schedule(1, 3)
    injected = [
        InjectedFault(plan[0], started_at=0.0, restored_at=5.0, detail=""),
        InjectedFault(plan[1], started_at=10.0, restored_at=12.0, detail=""),
        InjectedFault(plan[2], started_at=20.0, restored_at=21.0, detail=""),
    ]

    found = recoveries(injected, [7.5, 25.0, None])

    assert found == [Recovery(2.5), Recovery(None, interrupted=True), Recovery(None)]


def _image(status: str, name: str, error: str | None = None) -> AuditedImage:
    image_id = uuid.uuid4()
    renditions = ((f"results/{image_id}.png", 10),) if status == "completed" else ()
    return AuditedImage(
        image_id, "owner", name, status, error, None, f"originals/{image_id}", renditions
    )


def _evidence(rows: list[AuditedImage], accepted: list[AuditedImage]) -> Evidence:
    records = [
        UploadRecord(r.filename, "owner", r.filename.startswith("bad"), str(r.id), None, None)
        for r in accepted
    ]
    originals = {r.original_key: 100 for r in rows}
    results = {key: size or 0 for r in rows for key, size in r.renditions}
    return Evidence(ClientLedger(records, {}, []), rows, originals, results, [], set(), 0)


def test_the_audit_passes_a_clean_run_and_names_each_kind_of_loss() -> None:
    good = _image("completed", "a.jpg")
    bad = _image("failed", "bad.jpg", "not a complete JPEG")
    clean = _evidence([good, bad], [good, bad])
    assert audit(clean).passed

    lost = _image("completed", "lost.jpg")
    verdict = audit(_evidence([good, bad], [good, bad, lost]))
    assert (verdict.lost, verdict.passed) == (1, False)

    stuck = _image("processing", "stuck.jpg")
    assert audit(_evidence([good, bad, stuck], [good, bad, stuck])).stuck == 1

    wrongly = _image("failed", "c.jpg", "gave up after 20 attempts")
    assert audit(_evidence([good, wrongly], [good, wrongly])).failed_wrongly == 1

    twice = _image("completed", "a.jpg")
    assert audit(_evidence([good, twice], [good])).duplicated == 1

    orphaned = _evidence([good], [good])
    orphaned.results[f"results/{uuid.uuid4()}.png"] = 5
    assert audit(orphaned).orphans == 1

    resized = _evidence([good], [good])
    resized.results[good.renditions[0][0]] = 11
    assert audit(resized).duplicated == 1

    unheard = dataclasses.replace(clean, ledger=ClientLedger([], {"b1": "whsec_x"}, ["b1"]))
    assert audit(unheard).webhooks_missing == 1


def test_a_webhook_signature_verifies_only_for_its_own_secret_and_body() -> None:
    secret = new_secret()
    body = b'{"type": "batch.finished"}'
    headers = signature_headers(secret, "msg_1", 1_700_000_000, body)

    assert signature_is_valid(secret, Delivery(headers, body, 0.0))
    assert not signature_is_valid(new_secret(), Delivery(headers, body, 0.0))
    assert not signature_is_valid(secret, Delivery(headers, body + b" ", 0.0))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_small_chaos_run_loses_nothing_and_says_so_in_its_table(tmp_path: Path) -> None:
    config = ChaosConfig(uploads=300, faults=8, gap_s=(1.0, 3.0), settle_timeout_s=400.0)

    results = run_chaos(config, tmp_path / "logs")

    verdict = results["verdict"]
    assert verdict["problems"] == []
    assert verdict["passed"]
    assert results["faults_by_kind"] == dict.fromkeys(FAULT_KINDS, 1)
    assert verdict["accepted"] + verdict["refused"] == 300
    assert verdict["accepted"] == verdict["completed"] + verdict["failed_own_input"]
    assert verdict["failed_own_input"] >= 1
    assert verdict["webhooks_expected"] >= 1
    assert (verdict["lost"], verdict["stuck"], verdict["duplicated"], verdict["orphans"]) == (
        0,
        0,
        0,
        0,
    )
    document = build_document("chaos", results.pop("config"), results, ROOT)
    table = chaos_markdown(document)
    assert "| lost | 0 |" in table
    assert "| faults injected | 8 |" in table
    assert "| verdict | PASS |" in table
