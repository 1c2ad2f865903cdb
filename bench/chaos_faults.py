"""The chaos run's faults: a seeded schedule (a pure function of seed and count, so a run can be
repeated exactly) and the injector that applies one fault to the chaos stack and restores it.

Faults are applied one after another: a quiet gap, the fault, its hold (the time a service stays
down, a link stays cut, the receiver stays slow or down), then the restore.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.chaos_receiver import ReceiverMode, WebhookReceiver
from bench.chaos_stack import LINKS, NODES, ChaosStack, kill_pid

# kind -> (shortest, longest) hold in seconds.
FAULT_HOLDS: dict[str, tuple[float, float]] = {
    "node_kill": (0.5, 4.0),
    "cpu_kill": (0.0, 0.0),
    "api_worker_kill": (0.0, 0.0),
    "rabbitmq_restart": (0.0, 3.0),
    "postgres_restart": (0.0, 3.0),
    "s3_restart": (0.0, 3.0),
    "network_cut": (2.0, 10.0),
    "webhook_receiver": (5.0, 20.0),
}
FAULT_KINDS = tuple(FAULT_HOLDS)
# For pacing the uploads only: seconds a restart takes beyond its hold on the 2-core VM.
RESTART_SECONDS = {"rabbitmq_restart": 10.0, "postgres_restart": 4.0, "s3_restart": 3.0}


@dataclass(frozen=True)
class PlannedFault:
    """One fault of the schedule: which, after how long a quiet gap, held for how long, where."""

    kind: str
    gap_s: float
    hold_s: float
    node: int
    link: str
    receiver_mode: ReceiverMode

    def describe(self) -> str:
        if self.kind in ("node_kill", "cpu_kill"):
            return f"{self.kind} node-{self.node}"
        if self.kind == "network_cut":
            return f"network_cut node-{self.node}/{self.link}"
        if self.kind == "webhook_receiver":
            return f"webhook_receiver {self.receiver_mode.value}"
        return self.kind


def fault_schedule(
    seed: int, count: int, gap_s: tuple[float, float] = (2.0, 8.0)
) -> list[PlannedFault]:
    """`count` faults in a seeded random order: every kind as evenly as the count allows (each
    at least once from len(FAULT_KINDS) faults up), with random gaps, holds and targets."""
    rng = random.Random(seed)
    kinds = [FAULT_KINDS[i % len(FAULT_KINDS)] for i in range(count)]
    rng.shuffle(kinds)
    return [
        PlannedFault(
            kind=kind,
            gap_s=round(rng.uniform(*gap_s), 2),
            hold_s=round(rng.uniform(*FAULT_HOLDS[kind]), 2),
            node=rng.randrange(NODES),
            link=rng.choice(LINKS),
            receiver_mode=rng.choice((ReceiverMode.SLOW, ReceiverMode.DOWN)),
        )
        for kind in kinds
    ]


def expected_seconds(schedule: Sequence[PlannedFault]) -> float:
    """About how long the schedule takes: its gaps, holds and restarts."""
    return sum(f.gap_s + f.hold_s + RESTART_SECONDS.get(f.kind, 0.0) for f in schedule)


@dataclass(frozen=True)
class InjectedFault:
    """A fault as it happened: when it began and when its restore ended (epoch seconds)."""

    planned: PlannedFault
    started_at: float
    restored_at: float
    detail: str


class FaultInjector:
    """Applies planned faults to the stack (and the webhook receiver) and restores them."""

    def __init__(self, stack: ChaosStack, receiver: WebhookReceiver, seed: int) -> None:
        self._stack = stack
        self._receiver = receiver
        self._rng = random.Random(seed + 1)

    def inject(self, fault: PlannedFault) -> InjectedFault:
        started = time.time()
        detail = getattr(self, f"_{fault.kind}")(fault)
        return InjectedFault(fault, started, time.time(), detail)

    def _node_kill(self, fault: PlannedFault) -> str:
        self._stack.kill_node(fault.node)
        time.sleep(fault.hold_s)
        self._stack.start_node(fault.node)
        return f"node-{fault.node} down {fault.hold_s:.1f} s"

    def _cpu_kill(self, fault: PlannedFault) -> str:
        processes = self._stack.cpu_processes(fault.node)
        if not processes:
            return f"node-{fault.node} had no CPU process to kill"
        pid = self._rng.choice(processes)
        kill_pid(pid)
        return f"CPU process {pid} of node-{fault.node}"

    def _api_worker_kill(self, fault: PlannedFault) -> str:
        workers = self._stack.api_workers()
        if not workers:
            return "no API worker to kill"
        pid = self._rng.choice(workers)
        kill_pid(pid)
        return f"API worker {pid}"

    def _rabbitmq_restart(self, fault: PlannedFault) -> str:
        broker = self._stack.services.rabbitmq
        broker.stop()
        time.sleep(fault.hold_s)
        broker.start()
        return f"RabbitMQ stopped (SIGTERM), down {fault.hold_s:.1f} s more"

    def _postgres_restart(self, fault: PlannedFault) -> str:
        database = self._stack.services.postgres
        database.crash()
        time.sleep(fault.hold_s)
        database.start()
        return f"PostgreSQL immediate shutdown, down {fault.hold_s:.1f} s more"

    def _s3_restart(self, fault: PlannedFault) -> str:
        s3 = self._stack.services.s3
        s3.stop()
        time.sleep(fault.hold_s)
        s3.start()
        return f"SeaweedFS stopped, down {fault.hold_s:.1f} s more"

    def _network_cut(self, fault: PlannedFault) -> str:
        proxy = self._stack.proxies[fault.node][fault.link]
        proxy.pause()
        time.sleep(fault.hold_s)
        proxy.resume()
        return f"node-{fault.node} cut from {fault.link} for {fault.hold_s:.1f} s"

    def _webhook_receiver(self, fault: PlannedFault) -> str:
        self._receiver.set_mode(fault.receiver_mode)
        time.sleep(fault.hold_s)
        self._receiver.set_mode(ReceiverMode.UP)
        return f"receiver {fault.receiver_mode.value} for {fault.hold_s:.1f} s"
