"""`python -m ops scale` and `python -m ops autoscale`: the desired CPU processes per worker node.

Both write one Redis key (`{REDIS_PREFIX}engine:processes`) that every worker node polls and
resizes its CPU pool to. `decide` is the autoscaler's whole rule, a pure function; `Autoscaler`
samples the queue and the live nodes, applies it and logs every decision.
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
from common.node_control import CONTROL_INTERVAL_SECONDS, desired_processes_key
from ops.connections import SERVICE_ERRORS, broker_connection, redis_client
from ops.pipeline_state import NodeState, desired_processes, inspect_queue, live_nodes
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


def set_desired_processes(client: redis.Redis, prefix: str, processes: int) -> None:
    if processes < 1:
        raise ValueError("processes must be at least 1")
    client.set(desired_processes_key(prefix), str(processes))


def scale_command(argv: list[str], settings: Settings | None = None) -> int:
    """Set the CPU processes every worker node runs (--processes N); nodes follow within 2 s."""
    parser = argparse.ArgumentParser(prog="python -m ops scale")
    parser.add_argument("--processes", type=_positive_int, required=True, metavar="N")
    args = parser.parse_args(argv)
    settings = settings or Settings.from_env()
    client = redis_client(settings)
    try:
        set_desired_processes(client, settings.redis_prefix, args.processes)
        nodes = live_nodes(client, settings.redis_prefix)
    except redis.RedisError as exc:
        raise ServicesUnavailable(f"Redis: {exc}") from exc
    finally:
        client.close()
    print(f"set {desired_processes_key(settings.redis_prefix)} = {args.processes}")
    print(_pick_up_summary(nodes, args.processes))
    return 0


def _pick_up_summary(nodes: Sequence[NodeState], processes: int) -> str:
    if not nodes:
        return "no live worker nodes; nodes started from now on will use it"
    lines = [
        f"{len(nodes)} live worker nodes will pick it up within {CONTROL_INTERVAL_SECONDS:g} s:"
    ]
    for node in nodes:
        change = "unchanged" if node.processes == processes else f"{node.processes} -> {processes}"
        lines.append(f"  {node.host}:{node.pid}  processes {change}")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --- autoscale ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    minimum: int
    maximum: int
    target_per_process: float


@dataclass(frozen=True)
class Sample:
    """One observation: backlog of the job queue and the live nodes' processes."""

    depth: int
    nodes: int
    total_processes: int
    current: int

    @property
    def depth_per_node(self) -> float:
        return self.depth / max(1, self.nodes)


def history_key(prefix: str) -> str:
    """The autoscaler's samples since its last change, so `--once` runs (cron) share them."""
    return f"{prefix}ops:autoscale:history"


@dataclass
class Autoscaler:
    """Samples the queue and nodes, applies `decide`, writes the key and logs the decision.

    Its sample history lives in Redis next to the key it controls, expiring after
    `history_ttl` seconds so that old samples never count. Run one autoscaler per deployment.
    """

    settings: Settings
    bounds: Bounds
    history_ttl: int = 60

    def sample(self, client: redis.Redis) -> Sample:
        with broker_connection(self.settings) as connection:
            depth = inspect_queue(connection, self.settings.queue.queue).messages
        prefix = self.settings.redis_prefix
        nodes = live_nodes(client, prefix)
        desired = desired_processes(client, prefix)
        current = desired if desired is not None else _started_with(nodes, self.bounds.minimum)
        return Sample(depth, len(nodes), sum(n.processes for n in nodes), current)

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
        b = self.bounds
        desired = decide(
            sample.current,
            sample.depth_per_node,
            history,
            b.minimum,
            b.maximum,
            b.target_per_process,
        )
        _log_decision(sample, b, desired)
        prefix = self.settings.redis_prefix
        if desired != sample.current:
            set_desired_processes(client, prefix, desired)
            client.delete(history_key(prefix))
        else:
            kept = [*history, sample.depth_per_node][-DOWN_SAMPLES:]
            client.set(history_key(prefix), json.dumps(kept), ex=self.history_ttl)
        return desired

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


def _log_decision(sample: Sample, bounds: Bounds, desired: int) -> None:
    log.info(
        "depth=%d nodes=%d processes=%d per_process=%.1f target=%g current=%d -> %d (%s)",
        sample.depth,
        sample.nodes,
        sample.total_processes,
        sample.depth_per_node / max(1, sample.current),
        bounds.target_per_process,
        sample.current,
        desired,
        _direction(sample.current, desired),
    )


def _direction(before: int, after: int) -> str:
    if after > before:
        return "up"
    return "down" if after < before else "hold"


def _started_with(nodes: Sequence[NodeState], fallback: int) -> int:
    """Without the key, the nodes run their start-up count: the largest one is the baseline."""
    return max((n.processes for n in nodes), default=fallback)


def autoscale_command(argv: list[str], settings: Settings | None = None) -> int:
    """Move the processes per node between --min and --max with the queue depth."""
    parser = argparse.ArgumentParser(prog="python -m ops autoscale")
    parser.add_argument("--min", type=_positive_int, required=True, dest="minimum")
    parser.add_argument("--max", type=_positive_int, required=True, dest="maximum")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--target-per-process", type=float, default=50.0, help="queued messages per process"
    )
    parser.add_argument("--once", action="store_true", help="take one sample and exit")
    args = parser.parse_args(argv)
    if args.minimum > args.maximum:
        parser.error("--min must not exceed --max")
    settings = settings or Settings.from_env()
    configure_logging(settings.log_format)
    bounds = Bounds(args.minimum, args.maximum, args.target_per_process)
    # Samples older than a few intervals describe another moment; they expire.
    history_ttl = max(60, int(args.interval * (DOWN_SAMPLES + 2)))
    try:
        Autoscaler(settings, bounds, history_ttl).run(args.interval, once=args.once)
    except KeyboardInterrupt:
        log.info("autoscaler stopped")
    return 0
