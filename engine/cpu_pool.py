"""The CPU processes: decode, resize, grayscale and encode, reading and writing shared slots.

Each process attaches to the node's two arenas once, at start, and then receives only slot numbers.
A process that dies (killed, or crashed in a codec) breaks the executor; the pool is then rebuilt
and the caller decides what to retry.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from engine.kernel import ImageRejected, render_grayscale
from engine.orphans import NODE_PID_ENV, die_with_parent, exit_when_gone
from engine.slots import attach_segment


@dataclass(frozen=True)
class RenderTask:
    input_slot: int
    input_length: int
    output_slot: int


@dataclass(frozen=True)
class RenderResult:
    """What a CPU process made of one image; `error` set means the image is unprocessable."""

    error: str | None = None
    output_length: int = 0
    # Only for the rare result larger than an output slot: carried by pickling instead.
    oversized_output: bytes | None = None
    width: int = 0
    height: int = 0
    content_type: str = ""
    source_width: int = 0
    source_height: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


@dataclass(frozen=True)
class KernelOptions:
    target_width: int
    output_format: str
    max_pixels: int


# State of a CPU process, set once by its initializer.
_input: shared_memory.SharedMemory | None = None
_output: shared_memory.SharedMemory | None = None
_input_slot_bytes = 0
_output_slot_bytes = 0
_options: KernelOptions | None = None


def _init_process(
    input_name: str,
    input_slot_bytes: int,
    output_name: str,
    output_slot_bytes: int,
    options: KernelOptions,
    node_pid: int,
) -> None:
    import cv2

    die_with_parent()
    exit_when_gone(node_pid)
    global _input, _output, _input_slot_bytes, _output_slot_bytes, _options
    cv2.setNumThreads(1)  # one image per process; parallelism comes from the processes
    _input, _output = attach_segment(input_name), attach_segment(output_name)
    _input_slot_bytes, _output_slot_bytes = input_slot_bytes, output_slot_bytes
    _options = options


def render_slot(task: RenderTask) -> RenderResult:
    """Runs in a CPU process: render the image in `task.input_slot` into `task.output_slot`."""
    assert _input is not None and _output is not None and _options is not None
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    assert _input.buf is not None and _output.buf is not None
    offset = task.input_slot * _input_slot_bytes
    source = np.frombuffer(_input.buf, dtype=np.uint8, count=task.input_length, offset=offset)
    try:
        rendered = render_grayscale(
            source,
            target_width=_options.target_width,
            output_format=_options.output_format,
            max_pixels=_options.max_pixels,
        )
    except ImageRejected as exc:
        return RenderResult(error=str(exc))
    finally:
        del source  # release the export of the shared buffer
    data = rendered.data
    oversized = None
    if len(data) <= _output_slot_bytes:
        start = task.output_slot * _output_slot_bytes
        _output.buf[start : start + len(data)] = data
    else:
        oversized = bytes(data)
    return RenderResult(
        output_length=len(data),
        oversized_output=oversized,
        width=rendered.width,
        height=rendered.height,
        content_type=rendered.content_type,
        source_width=rendered.source_width,
        source_height=rendered.source_height,
        cpu_seconds=time.process_time() - started_cpu,
        wall_seconds=time.perf_counter() - started_wall,
    )


class KernelPool:
    """A pool of `processes` CPU processes bound to one input and one output arena."""

    def __init__(
        self,
        processes: int,
        input_arena: tuple[str, int],
        output_arena: tuple[str, int],
        options: KernelOptions,
    ) -> None:
        self.processes = processes
        self._initargs = (*input_arena, *output_arena, options, os.getpid())
        # forkserver: children start from a clean process, not from this threaded one.
        self._context = multiprocessing.get_context("forkserver")
        # The fork server learns the node's pid from the environment it inherits.
        os.environ[NODE_PID_ENV] = str(os.getpid())
        self._context.set_forkserver_preload(["engine.orphans"])
        # Guards swapping the executor (restart, resize) against concurrent submits.
        self._swap = threading.Lock()
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=self._context,
            initializer=_init_process,
            initargs=self._initargs,
        )
        # Start every process now rather than on first use, so start-up cost is paid up front.
        for future in [executor.submit(os.getpid) for _ in range(self.processes)]:
            future.result()
        return executor

    def submit(self, task: RenderTask) -> Future[RenderResult]:
        with self._swap:
            return self._executor.submit(render_slot, task)

    def child_pids(self) -> list[int]:
        return list(getattr(self._executor, "_processes", {}) or {})

    def restart(self) -> None:
        """Replace a broken executor (a process died) with a fresh set of processes."""
        fresh = self._start()
        with self._swap:
            broken, self._executor = self._executor, fresh
        broken.shutdown(wait=False, cancel_futures=True)

    def resize(self, processes: int) -> None:
        """Change the number of processes; work already submitted finishes on the old ones."""
        self.processes = processes
        fresh = self._start()
        with self._swap:
            old, self._executor = self._executor, fresh
        old.shutdown(wait=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
