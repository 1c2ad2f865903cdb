"""`pixelmill-worker` / `python -m engine`: run one worker node.

Flags override the environment variables of the same meaning (WORKER_PROCESSES, ...)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from common.config import ConfigError, Settings
from common.logs import configure_logging


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
    tuned = dataclasses.replace(
        engine,
        processes=args.processes,
        prefetch=args.prefetch,
        batch_size=args.batch_size,
        batch_wait_ms=max(0, args.batch_wait_ms),
        memory_mb=args.memory_mb,
    )
    return dataclasses.replace(settings, engine=tuned)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv, Settings.from_env())
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    from engine.node import WorkerNode

    WorkerNode(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
