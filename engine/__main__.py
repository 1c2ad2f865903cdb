"""`pixelmill-worker` / `python -m engine`: run one worker node.

Flags override the environment variables of the same meaning (WORKER_PROCESSES, ...)."""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from multiprocessing.context import ForkServerContext

from common.config import ConfigError, Settings
from common.logs import configure_logging
from engine.orphans import FORK_SERVER_GUARD, NODE_PID_ENV


def parse_args(argv: list[str] | None, settings: Settings) -> Settings:
    engine = settings.engine
    parser = argparse.ArgumentParser(prog="pixelmill-worker", description=__doc__)
    parser.add_argument("--processes", type=int, default=engine.processes)
    parser.add_argument("--prefetch", type=int, default=engine.prefetch)
    parser.add_argument("--batch-size", type=int, default=engine.batch_size)
    parser.add_argument("--batch-wait-ms", type=int, default=engine.batch_wait_ms)
    parser.add_argument("--memory-mb", type=int, default=engine.memory_mb)
    args = parser.parse_args(argv)
    for name in ("processes", "prefetch", "batch_size", "memory_mb"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.processes > engine.max_processes:
        parser.error(
            f"--processes {args.processes} is above WORKER_MAX_PROCESSES={engine.max_processes}"
        )
    tuned = dataclasses.replace(
        engine,
        processes=args.processes,
        prefetch=args.prefetch,
        batch_size=args.batch_size,
        batch_wait_ms=max(0, args.batch_wait_ms),
        memory_mb=args.memory_mb,
    )
    return dataclasses.replace(settings, engine=tuned)


def start_fork_server() -> ForkServerContext:
    """The process-wide effects of a node, here in plain sight, before any thread starts.

    CPU processes come from a fork server, never forked from the threaded node. The fork server
    learns the node's pid from the environment it inherits, and preloads the guard that ends it
    with the node (a SIGKILLed node must not leave CPU processes behind)."""
    os.environ[NODE_PID_ENV] = str(os.getpid())
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([FORK_SERVER_GUARD])
    multiprocessing.forkserver.ensure_running()
    return context


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv, Settings.from_env())
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    from engine.node import WorkerNode

    WorkerNode(settings, start_fork_server()).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
