"""`python -m bench chaos`: many uploads through a stack of its own while a seeded schedule of
faults hits it, then an audit that nothing was lost.

The stack (bench.chaos_stack) is two worker nodes, the API under gunicorn, and PostgreSQL,
RabbitMQ, Redis and SeaweedFS started for the run alone. Clients (bench.chaos_uploads) upload
bulk batches, some with webhooks to a local receiver, and interactive single images, for several
owners, the sessions spread over the schedule's expected length. Meanwhile the schedule
(bench.chaos_faults) SIGKILLs nodes, CPU processes and API workers, restarts RabbitMQ,
PostgreSQL and the S3 server, cuts one node's link to a service, and makes the webhook receiver
slow or down. Crashed parts are restarted as an orchestrator would.
When the schedule and the uploads are done the run waits for the system to settle, then audits
the client's records, the rows and the buckets (bench.chaos_audit).

A fault's recovery time is from its restore to the next image completed anywhere, measured
only when that came before the next fault began (the table counts the faults whose recovery the
next one interrupted; faults restored after the last completion have none).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.chaos_audit import Verdict, audit, gather
from bench.chaos_faults import (
    FAULT_KINDS,
    FaultInjector,
    InjectedFault,
    PlannedFault,
    expected_seconds,
    fault_schedule,
)
from bench.chaos_receiver import WebhookReceiver, verified_finished
from bench.chaos_stack import ChaosStack, StackOptions, chaos_stack
from bench.chaos_uploads import ClientLedger, SessionRunner, plan_sessions
from db import audit as audit_queries

DEFAULT_CHAOS_SEED = 20261207
SETTLE_POLL_SECONDS = 2.0
TOKEN_SECONDS = 24 * 3600
# The sessions start spread over this share of the schedule's expected length, so that the
# faults fall on work in flight, not on a system that has drained.
UPLOAD_SPAN_SHARE = 0.8


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run; the defaults are the full run."""

    uploads: int = 20_000
    faults: int = 60
    seed: int = DEFAULT_CHAOS_SEED
    owners: int = 4
    sessions_at_once: int = 3
    gap_s: tuple[float, float] = (2.0, 8.0)
    settle_timeout_s: float = 900.0
    stack: StackOptions = field(default_factory=StackOptions)


@dataclass
class RunClock:
    started: float = field(default_factory=time.time)
    uploads_ended: float | None = None
    faults_ended: float | None = None
    settled: float | None = None


def _progress(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


def run_chaos(config: ChaosConfig, log_dir: Path) -> dict[str, Any]:
    """The whole run; returns its results (`verdict.passed` says whether nothing was lost)."""
    with tempfile.TemporaryDirectory(prefix="pixelmill-chaos-") as work:
        Path(work).chmod(0o755)
        with chaos_stack(Path(work) / "stack", log_dir, config.stack) as stack:
            receiver = WebhookReceiver()
            try:
                return _run_on(stack, receiver, config, Path(work) / "images")
            finally:
                receiver.close()


def _run_on(
    stack: ChaosStack, receiver: WebhookReceiver, config: ChaosConfig, images: Path
) -> dict[str, Any]:
    clock = RunClock()
    tokens: dict[str, str] = {}

    def token_for(owner: str) -> str:
        if owner not in tokens:
            issuer = stack.services.issuer
            tokens[owner] = issuer.mint_token(owner, ("user",), expires_in=TOKEN_SECONDS)
        return tokens[owner]

    runner = SessionRunner(stack.api_url, token_for, receiver.url, images)
    plans = plan_sessions(config.uploads, config.owners, config.seed)
    schedule = fault_schedule(config.seed, config.faults, config.gap_s)
    span = UPLOAD_SPAN_SHARE * expected_seconds(schedule)
    ledgers: list[ClientLedger] = []

    def upload_all() -> None:
        ledgers.append(runner.run(plans, config.sessions_at_once, span))
        clock.uploads_ended = time.time()
        _progress(f"uploads done after {clock.uploads_ended - clock.started:.0f} s")

    uploads = threading.Thread(target=upload_all, name="chaos-uploads")
    uploads.start()
    injected = _inject_all(stack, receiver, schedule, config.seed)
    clock.faults_ended = time.time()
    while uploads.is_alive():
        stack.revive()
        uploads.join(1.0)
    ledger = ledgers[0]
    settle_problem = _settle(stack, ledger, receiver, config.settle_timeout_s)
    clock.settled = time.time()
    verdict = audit(gather(stack.settings(), ledger, receiver))
    if settle_problem:
        verdict.problems.insert(0, settle_problem)
    verdict.problems += [f"client: {error}" for error in runner.errors]
    return _results(config, clock, injected, verdict, stack)


def _inject_all(
    stack: ChaosStack, receiver: WebhookReceiver, schedule: Sequence[PlannedFault], seed: int
) -> list[InjectedFault]:
    injector = FaultInjector(stack, receiver, seed)
    injected = []
    for number, fault in enumerate(schedule, 1):
        _pause(fault.gap_s, stack)
        done = injector.inject(fault)
        injected.append(done)
        _progress(f"fault {number}/{len(schedule)}: {fault.describe()} ({done.detail})")
    return injected


def _pause(seconds: float, stack: ChaosStack) -> None:
    """Sleep, restarting whatever exited on its own meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for name in stack.revive():
            _progress(f"restarted {name}, which had exited by itself")
        time.sleep(min(left, 0.5))


def _settle(
    stack: ChaosStack, ledger: ClientLedger, receiver: WebhookReceiver, timeout: float
) -> str | None:
    """Wait until no image, batch, webhook or upload intent is left to settle; None when it
    did, else what was still unsettled at the deadline."""
    settings = stack.settings()
    deadline = time.monotonic() + timeout
    left: dict[str, int] = {}
    while time.monotonic() < deadline:
        stack.revive()
        with contextlib.suppress(psycopg.Error), psycopg.connect(settings.postgres_url) as conn:
            left = audit_queries.unsettled(conn)
        verified, _ = verified_finished(receiver, ledger.secrets)
        left["webhook batches unheard"] = len(set(ledger.secrets) - verified)
        if left and not any(left.values()):
            _progress("settled")
            return None
        time.sleep(SETTLE_POLL_SECONDS)
    return f"not settled after {timeout:.0f} s: {left}"


@dataclass(frozen=True)
class Recovery:
    """How a fault was recovered from: seconds from its restore to the next completed image,
    when that came before the next fault began; `interrupted` when the next fault came first;
    neither when no image completed after it (the work had drained)."""

    seconds: float | None
    interrupted: bool = False


def recoveries(
    injected: Sequence[InjectedFault], next_completions: Sequence[float | None]
) -> list[Recovery]:
    """Per fault, from the first completion after its restore (`next_completions`)."""
    found = []
    for index, (fault, completed) in enumerate(zip(injected, next_completions, strict=True)):
        following = injected[index + 1].started_at if index + 1 < len(injected) else None
        if completed is None:
            found.append(Recovery(None))
        elif following is not None and completed > following:
            found.append(Recovery(None, interrupted=True))
        else:
            found.append(Recovery(max(0.0, completed - fault.restored_at)))
    return found


def next_completions(postgres_url: str, injected: Sequence[InjectedFault]) -> list[float | None]:
    with psycopg.connect(postgres_url) as conn:
        return [audit_queries.first_completion_after(conn, f.restored_at) for f in injected]


def _results(
    config: ChaosConfig,
    clock: RunClock,
    injected: Sequence[InjectedFault],
    verdict: Verdict,
    stack: ChaosStack,
) -> dict[str, Any]:
    found = recoveries(injected, next_completions(stack.settings().postgres_url, injected))
    measured = [
        (f, r.seconds) for f, r in zip(injected, found, strict=True) if r.seconds is not None
    ]
    worst = max(measured, key=lambda pair: pair[1], default=None)
    return {
        "kind": "chaos",
        "config": {**asdict(config), "gap_s": list(config.gap_s)},
        "seconds": {
            "uploads": _since(clock.started, clock.uploads_ended),
            "faults": _since(clock.started, clock.faults_ended),
            "total": _since(clock.started, clock.settled),
        },
        "faults_by_kind": dict(Counter(f.planned.kind for f in injected)),
        "faults": [
            {
                "kind": f.planned.kind,
                "detail": f.detail,
                "at_s": round(f.started_at - clock.started, 2),
                "restored_after_s": round(f.restored_at - f.started_at, 2),
                "recovery_s": None if r.seconds is None else round(r.seconds, 2),
                "recovery_interrupted": r.interrupted,
            }
            for f, r in zip(injected, found, strict=True)
        ],
        "worst_recovery": None
        if worst is None
        else {"seconds": round(worst[1], 2), "fault": worst[0].planned.describe()},
        "unplanned_exits": list(stack.unplanned_exits),
        "verdict": {**asdict(verdict), "passed": verdict.passed},
    }


def _since(start: float, end: float | None) -> float | None:
    return None if end is None else round(end - start, 1)


def chaos_table(results: dict[str, Any]) -> str:
    """The run's table: faults by kind, then the audit's figures."""
    v = results["verdict"]
    kinds = results["faults_by_kind"]
    worst = results["worst_recovery"]
    seconds = results["seconds"]
    interrupted = sum(f["recovery_interrupted"] for f in results["faults"])
    rows: list[tuple[str, object]] = [
        *((f"faults: {kind}", kinds.get(kind, 0)) for kind in FAULT_KINDS),
        ("faults injected", sum(kinds.values())),
        ("uploads accepted", v["accepted"]),
        ("uploads refused by the client's last retry", v["refused"]),
        ("completed", v["completed"]),
        ("failed (their own input)", v["failed_own_input"]),
        ("failed (not their input)", v["failed_wrongly"]),
        ("lost", v["lost"]),
        ("stuck", v["stuck"]),
        ("duplicated", v["duplicated"]),
        ("orphans", v["orphans"]),
        ("objects missing", v["missing_objects"]),
        ("batch counters wrong", v["counter_mismatches"]),
        (
            "batch.finished verified",
            f"{v['webhooks_expected'] - v['webhooks_missing']} of {v['webhooks_expected']}",
        ),
        ("worst recovery", "-" if worst is None else f"{worst['seconds']} s ({worst['fault']})"),
        ("recoveries interrupted by the next fault", interrupted),
        ("processes restarted after exiting by themselves", len(results["unplanned_exits"])),
        (
            "run (uploads / faults / settled)",
            f"{seconds['uploads']} / {seconds['faults']} / {seconds['total']} s",
        ),
        ("verdict", "PASS" if v["passed"] else "FAIL"),
    ]
    lines = ["| | |", "|---|---:|", *(f"| {name} | {value} |" for name, value in rows)]
    problems = [f"- {p}" for p in v["problems"]]
    exits = [f"- restarted: {e}" for e in results["unplanned_exits"]]
    return "\n".join([*lines, "", *problems, *exits]).rstrip() + "\n"


def chaos_markdown(document: dict[str, Any]) -> str:
    """The summary.md of a results document."""
    config = document["settings"]
    head = (
        f"# Chaos: {config['uploads']} uploads, {config['faults']} faults, seed {config['seed']}\n"
    )
    return head + "\n" + chaos_table(document) + "\n"
