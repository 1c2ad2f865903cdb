"""`python -m ops scale` and `python -m ops autoscale`: the desired CPU processes per worker node.

Both write one Redis key (`{REDIS_PREFIX}engine:processes`) that every worker node polls and
resizes its CPU pool to, with who set it beside it. An operator's count stays until
`ops scale --reset`; the autoscaler's is a lease it renews on every sample, so that when it stops
the nodes go back to their start-up counts instead of keeping its last decision. `decide` is the
autoscaler's depth rule, a pure function; `plan` adds the cores the nodes report (a node never
gets more processes than it may use: beyond that the answer is more nodes) and the drain rate (a
backlog that drains soon at the current rate needs no more processes), and says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from common.config import Settings
from common.logs import configure_logging
from common.node_control import (
    CONTROL_INTERVAL_SECONDS,
    ScalingSource,
    desired_processes_key,
    scaling_source_key,
)
from ops.connections import SERVICE_ERRORS, broker_connection, redis_client
from ops.pipeline_state import (
    NodeState,
    all_jobs,
    desired_processes,
    job_queue_states,
    live_nodes,
    scaling_override,
)
from ops.services import ServicesUnavailable

log = logging.getLogger("ops.autoscale")

UP_SAMPLES = 2
DOWN_SAMPLES = 3
# Below this share of the target the queue counts as "low" (hysteresis: scale-up happens only
# above the full target, so a depth between the two never moves the count).
LOW_WATER_FRACTION = 0.25


def decide(
    current: int,
    depth: float,
    history: Sequence[float],
    minimum: int,
    maximum: int,
    target: float,
) -> int:
    """The desired processes per node after one sample.

    `depth` is the queue depth per node now, `history` the earlier samples since the last change
    (oldest first). Scale up by one when depth per process has been above `target` for
    UP_SAMPLES samples in a row; down by one when it has been below LOW_WATER_FRACTION * target
    for DOWN_SAMPLES in a row; always inside [minimum, maximum].
    """
    if current < minimum or current > maximum:
        return min(max(current, minimum), maximum)
    samples = [*history, depth]
    if _all_recent(samples, UP_SAMPLES, lambda d: d / current > target):
        return min(current + 1, maximum)
    if _all_recent(samples, DOWN_SAMPLES, lambda d: d / current < target * LOW_WATER_FRACTION):
        return max(current - 1, minimum)
    return current


def _all_recent(samples: Sequence[float], count: int, test: Callable[[float], bool]) -> bool:
    recent = samples[-count:]
    return len(recent) == count and all(test(d) for d in recent)


# --- scale --------------------------------------------------------------------------------------


def set_desired_processes(
    client: redis.Redis, prefix: str, processes: int, source: ScalingSource | None = None
) -> None:
    """Write the count and its source together; a lease (`source.lease_seconds` > 0) makes both
    expire unless written again."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    source = source or ScalingSource("operator", time.time())
    lease_ms = int(source.lease_seconds * 1000) or None
    pipe = client.pipeline(transaction=True)
    pipe.set(desired_processes_key(prefix), str(processes), px=lease_ms)
    pipe.delete(scaling_source_key(prefix))
    # Built in place: redis's stubs accept no dict whose key type is narrower than theirs.
    pipe.hset(scaling_source_key(prefix), mapping={k: v for k, v in source.to_hash().items()})
    if lease_ms:
        pipe.pexpire(scaling_source_key(prefix), lease_ms)
    pipe.execute()


def reset_desired_processes(client: redis.Redis, prefix: str) -> None:
    """Remove the desired count: every node goes back to the count it started with."""
    client.delete(desired_processes_key(prefix), scaling_source_key(prefix))


def scale_command(argv: list[str], settings: Settings | None = None) -> int:
    """Set the CPU processes every worker node runs (--processes N) until --reset; nodes follow
    within 2 s."""
    parser = argparse.ArgumentParser(prog="python -m ops scale")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--processes", type=_positive_int, metavar="N")
    which.add_argument(
        "--reset", action="store_true", help="remove the count: nodes use their start-up count"
    )
    args = parser.parse_args(argv)
    settings = settings or Settings.from_env()
    prefix = settings.redis_prefix
    client = redis_client(settings)
    try:
        if args.reset:
            reset_desired_processes(client, prefix)
        else:
            set_desired_processes(client, prefix, args.processes)
        nodes = live_nodes(client, prefix)
    except redis.RedisError as exc:
        raise ServicesUnavailable(f"Redis: {exc}") from exc
    finally:
        client.close()
    if args.reset:
        print(f"removed {desired_processes_key(prefix)}: nodes use their start-up counts")
    else:
        print(f"set {desired_processes_key(prefix)} = {args.processes} (until --reset)")
    print(_pick_up_summary(nodes, args.processes))
    return 0


def _pick_up_summary(nodes: Sequence[NodeState], processes: int | None) -> str:
    """What each live node will do; `processes` None means each returns to its start-up count."""
    if not nodes:
        return "no live worker nodes; nodes started from now on will use it"
    lines = [
        f"{len(nodes)} live worker nodes will pick it up within {CONTROL_INTERVAL_SECONDS:g} s:"
    ]
    for node in nodes:
        target = processes if processes is not None else node.start_processes or node.processes
        change = "unchanged" if node.processes == target else f"{node.processes} -> {target}"
        lines.append(f"  {node.host}:{node.pid}  processes {change}")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def override_notice(settings: Settings) -> str | None:
    """A line for `make up` when a desired count overrides the nodes' own; None otherwise (or
    when Redis does not answer: `ops status` will say so)."""
    client = redis_client(settings)
    try:
        override = scaling_override(client, settings.redis_prefix)
    except redis.RedisError:
        return None
    finally:
        client.close()
    if override is None:
        return None
    return f"note: worker nodes run {override.describe()}"


# --- autoscale ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    minimum: int
    maximum: int
    target_per_process: float
    # A backlog that drains within this many seconds at the current rate needs no more processes.
    drain_target_seconds: float = 60.0


@dataclass(frozen=True)
class Sample:
    """One observation: backlog of the job queues (every lane and shard), the live nodes, and how
    fast they finish."""

    depth: int
    nodes: int
    total_processes: int
    current: int
    # The fewest cores any live node may use (0: no node reported it).
    node_cores: int = 0
    # Images finished per second across the nodes since the previous sample (None: unknown).
    drain_rate: float | None = None

    @property
    def depth_per_node(self) -> float:
        return self.depth / max(1, self.nodes)

    @property
    def drain_seconds(self) -> float | None:
        """How long the backlog takes at the current rate (None: rate unknown)."""
        if self.drain_rate is None:
            return None
        if self.depth == 0:
            return 0.0
        return self.depth / self.drain_rate if self.drain_rate > 0 else float("inf")


@dataclass(frozen=True)
class Decision:
    processes: int
    reason: str


def plan(sample: Sample, history: Sequence[float], bounds: Bounds) -> Decision:
    """`decide` within the cores the nodes may use, holding a backlog that drains soon anyway."""
    cap = bounds.maximum
    if sample.node_cores:
        cap = max(bounds.minimum, min(cap, sample.node_cores))
    wanted = decide(
        sample.current,
        sample.depth_per_node,
        history,
        bounds.minimum,
        cap,
        bounds.target_per_process,
    )
    drain = sample.drain_seconds
    rate = "unknown rate" if sample.drain_rate is None else f"{sample.drain_rate:.1f} images/s"
    eta = "unknown" if drain is None else f"{drain:.0f} s"
    if wanted > sample.current and drain is not None and drain <= bounds.drain_target_seconds:
        return Decision(
            sample.current,
            f"hold: the backlog drains in {eta} at {rate}, within the "
            f"{bounds.drain_target_seconds:g} s target",
        )
    if wanted > sample.current:
        return Decision(wanted, f"up: deep for {UP_SAMPLES} samples and drains in {eta} at {rate}")
    if wanted < sample.current:
        why = "shallow" if sample.current <= cap else f"above the cap of {cap}"
        return Decision(wanted, f"down: {why}; drains in {eta} at {rate}")
    if sample.current >= cap and sample.depth_per_node / max(1, sample.current) > (
        bounds.target_per_process
    ):
        limit = f"the nodes' {sample.node_cores} cores" if cap == sample.node_cores else "--max"
        return Decision(
            sample.current, f"hold: at the cap of {cap} ({limit}); more nodes would help"
        )
    return Decision(sample.current, f"hold: drains in {eta} at {rate}")


def history_key(prefix: str) -> str:
    """The autoscaler's samples since its last change, so `--once` runs (cron) share them."""
    return f"{prefix}ops:autoscale:history"


def progress_key(prefix: str) -> str:
    """The nodes' finished-image total at the previous sample, for the drain rate."""
    return f"{prefix}ops:autoscale:progress"


@dataclass
class Autoscaler:
    """Samples the queue and nodes, applies `plan`, writes the key and logs the decision.

    Its sample history lives in Redis next to the key it controls, expiring after
    `history_ttl` seconds so that old samples never count. What it sets is a lease of
    `lease_seconds`, renewed on every sample: when the autoscaler stops, the nodes go back to
    their start-up counts. Run one autoscaler per deployment.
    """

    settings: Settings
    bounds: Bounds
    history_ttl: int = 60
    lease_seconds: float = 30.0

    def sample(self, client: redis.Redis) -> Sample:
        with broker_connection(self.settings) as connection:
            # The backlog of every lane and shard: any of them is work the nodes must do.
            lanes = job_queue_states(connection, self.settings.queue)
            depth = all_jobs(self.settings.queue.queue, lanes).messages
        prefix = self.settings.redis_prefix
        nodes = live_nodes(client, prefix)
        desired = desired_processes(client, prefix)
        current = desired if desired is not None else _started_with(nodes, self.bounds.minimum)
        reported = [n.cores for n in nodes if n.cores > 0]
        return Sample(
            depth,
            len(nodes),
            sum(n.processes for n in nodes),
            current,
            node_cores=min(reported, default=0),
            drain_rate=self._drain_rate(client, nodes),
        )

    def _drain_rate(self, client: redis.Redis, nodes: Sequence[NodeState]) -> float | None:
        """Finished images per second since the previous sample; None on the first sample or
        when a node restarted (its counters began again)."""
        now, done = time.time(), sum(n.completed + n.failed for n in nodes)
        key = progress_key(self.settings.redis_prefix)
        raw = client.get(key)
        client.set(key, json.dumps({"at": now, "done": done}), ex=self.history_ttl)
        if not raw:
            return None
        previous = json.loads(raw)
        elapsed, finished = now - float(previous["at"]), done - int(previous["done"])
        if elapsed <= 0 or finished < 0:
            return None
        return finished / elapsed

    def step(self) -> int:
        """One sample and one decision; returns the desired processes per node."""
        client = redis_client(self.settings)
        try:
            return self._step(client)
        except redis.RedisError as exc:
            raise ServicesUnavailable(f"Redis: {exc}") from exc
        finally:
            client.close()

    def _step(self, client: redis.Redis) -> int:
        sample = self.sample(client)
        history = self._history(client)
        decision = plan(sample, history, self.bounds)
        _log_decision(sample, self.bounds, decision)
        prefix = self.settings.redis_prefix
        override = scaling_override(client, prefix)
        if decision.processes != sample.current or (
            override is not None and override.set_by == "autoscaler"
        ):
            if override is not None and override.set_by == "operator":
                log.warning("replacing an operator's count of %d", override.processes)
            lease = ScalingSource("autoscaler", time.time(), self.lease_seconds)
            set_desired_processes(client, prefix, decision.processes, lease)
        if decision.processes != sample.current:
            client.delete(history_key(prefix))
        else:
            kept = [*history, sample.depth_per_node][-DOWN_SAMPLES:]
            client.set(history_key(prefix), json.dumps(kept), ex=self.history_ttl)
        return decision.processes

    def _history(self, client: redis.Redis) -> list[float]:
        raw = client.get(history_key(self.settings.redis_prefix))
        return [float(d) for d in json.loads(raw)] if raw else []

    def run(self, interval: float, once: bool = False) -> None:
        while True:
            try:
                self.step()
            except SERVICE_ERRORS as exc:
                log.warning("sample skipped: %s", exc)
            if once:
                return
            time.sleep(interval)


def _log_decision(sample: Sample, bounds: Bounds, decision: Decision) -> None:
    log.info(
        "depth=%d nodes=%d processes=%d per_process=%.1f target=%g cores=%d current=%d -> %d (%s)",
        sample.depth,
        sample.nodes,
        sample.total_processes,
        sample.depth_per_node / max(1, sample.current),
        bounds.target_per_process,
        sample.node_cores,
        sample.current,
        decision.processes,
        decision.reason,
    )


def _started_with(nodes: Sequence[NodeState], fallback: int) -> int:
    """Without the key, the nodes run their start-up count: the largest one is the baseline."""
    return max((n.processes for n in nodes), default=fallback)


def autoscale_command(argv: list[str], settings: Settings | None = None) -> int:
    """Move the processes per node between --min and --max (and the nodes' cores) with the
    queue depth and drain rate."""
    parser = argparse.ArgumentParser(prog="python -m ops autoscale")
    parser.add_argument("--min", type=_positive_int, required=True, dest="minimum")
    parser.add_argument("--max", type=_positive_int, required=True, dest="maximum")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--target-per-process", type=float, default=50.0, help="queued messages per process"
    )
    parser.add_argument(
        "--drain-target-seconds",
        type=float,
        default=60.0,
        help="no scale-up while the backlog drains within this at the current rate",
    )
    parser.add_argument("--once", action="store_true", help="take one sample and exit")
    args = parser.parse_args(argv)
    if args.minimum > args.maximum:
        parser.error("--min must not exceed --max")
    settings = settings or Settings.from_env()
    configure_logging(settings.log_format)
    bounds = Bounds(args.minimum, args.maximum, args.target_per_process, args.drain_target_seconds)
    # Samples older than a few intervals describe another moment; they expire.
    history_ttl = max(60, int(args.interval * (DOWN_SAMPLES + 2)))
    # A few missed samples do not end the lease; a stopped autoscaler's does, soon.
    lease = max(15.0, args.interval * 3)
    try:
        Autoscaler(settings, bounds, history_ttl, lease).run(args.interval, once=args.once)
    except KeyboardInterrupt:
        log.info("autoscaler stopped")
    return 0
