"""The CPU processes: decode, resize and encode every rendition, reading and writing shared slots.

Each process attaches to the node's two arenas once, at start, and then receives only slot numbers
over a pipe of its own. The thread that asks for a render holds one process for the round trip, so
a process that dies or overruns its deadline takes only its own image with it: that caller gets
`RenderCrashed` or `RenderTimedOut`, the process is replaced, and every other render goes on.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import resource
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess

import cv2
import numpy as np

from common.renditions import Rendition, default_renditions, select
from engine.kernel import ImageRejected
from engine.orphans import die_with_parent, exit_when_gone
from engine.renditions import render_renditions
from engine.slots import attach_segment

# How long a process asked to stop may take before it is killed.
STOP_GRACE_SECONDS = 5.0
# Memory a process may allocate beyond its start-up size and the decode budget: the resize,
# encode and libraries' own working buffers.
MEMORY_CAP_HEADROOM_BYTES = 128 * 1024 * 1024
OUT_OF_MEMORY_REASON = "processing this image needed more memory than a CPU process may use"


@dataclass(frozen=True)
class RenderTask:
    input_slot: int
    input_length: int
    output_slot: int
    # The renditions to make, by name; None for every one the pool was configured with.
    renditions: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RenditionOutput:
    """Where one rendition's bytes lie in the output (slot or oversized bytes), and what it is."""

    name: str
    offset: int
    length: int
    width: int
    height: int
    content_type: str


@dataclass(frozen=True)
class RenderResult:
    """What a CPU process made of one image; `error` set means the image is unprocessable.

    The renditions' bytes lie one after another in the output slot, as `outputs` says; the
    first one's size and type are repeated in the flat fields below."""

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
    outputs: tuple[RenditionOutput, ...] = ()


@dataclass(frozen=True)
class KernelOptions:
    target_width: int
    output_format: str
    max_pixels: int
    # The decode budget (common.decode_budget); it also sizes each process's memory cap.
    # None: neither the budget nor the cap applies.
    max_decode_bytes: int | None = None
    # Empty: the one gray rendition `target_width` and `output_format` describe.
    renditions: tuple[Rendition, ...] = ()

    def configured(self) -> tuple[Rendition, ...]:
        return self.renditions or default_renditions(self.target_width, self.output_format)


class RenderCrashed(Exception):
    """The CPU process rendering this image died before answering."""


class RenderTimedOut(Exception):
    """The render overran its deadline; its process was killed."""


class RenderFailed(RuntimeError):
    """The render function raised an exception of no known kind (none of its steps said the
    image was unusable: a bug, or a library surprised by this input). The process answered and
    goes on; the image fails with `description` as its reason (engine.batch)."""

    def __init__(self, description: str, traceback: str = "") -> None:
        super().__init__(f"render failed in a CPU process: {description}")
        self.description = description
        self.traceback = traceback


@dataclass(frozen=True)
class _ProcessSetup:
    """What a CPU process needs at start: the arenas it attaches to, and the node to die with."""

    input_name: str
    input_slot_bytes: int
    output_name: str
    output_slot_bytes: int
    options: KernelOptions
    node_pid: int
    # Added to the nice value of the thread that makes bulk (not urgent) renders; 0: none.
    bulk_nice: int = 0


# State of a CPU process, set once at its start.
_input: shared_memory.SharedMemory | None = None
_output: shared_memory.SharedMemory | None = None
_input_slot_bytes = 0
_output_slot_bytes = 0
_options: KernelOptions | None = None


def _init_process(setup: _ProcessSetup) -> None:
    die_with_parent()
    exit_when_gone(setup.node_pid)
    global _input, _output, _input_slot_bytes, _output_slot_bytes, _options
    cv2.setNumThreads(1)  # one image per process; parallelism comes from the processes
    _input, _output = attach_segment(setup.input_name), attach_segment(setup.output_name)
    _input_slot_bytes, _output_slot_bytes = setup.input_slot_bytes, setup.output_slot_bytes
    _options = setup.options
    if setup.options.max_decode_bytes is not None:
        cap_private_memory(setup.options.max_decode_bytes + MEMORY_CAP_HEADROOM_BYTES)


def cap_private_memory(extra_bytes: int) -> int:
    """Limit this process's private writable memory to what it holds now plus `extra_bytes`;
    returns the limit. An allocation past it fails (MemoryError: a clean failure of the image
    at hand) instead of growing the process until the kernel OOM-kills the node's pod.

    RLIMIT_DATA, not RLIMIT_AS: the address-space limit counts the shared slot arenas (mapped
    whole into every process, however few of their pages it touches), reserved but unused
    allocator and thread-stack space, and every library mapping, so it would have to be sized
    from numbers that change with the slot count and the libraries. RLIMIT_DATA (Linux 4.7+)
    counts only private writable mappings: the heap and anonymous buffers a decode allocates.
    """
    limit = _private_memory_bytes() + extra_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def _private_memory_bytes() -> int:
    """VmData: the size of this process's private writable mappings, which RLIMIT_DATA limits."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmData line")


def render_slot(task: RenderTask) -> RenderResult:
    """Runs in a CPU process: render the image in `task.input_slot` into `task.output_slot`."""
    assert _input is not None and _output is not None and _options is not None
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    assert _input.buf is not None and _output.buf is not None
    offset = task.input_slot * _input_slot_bytes
    source = np.frombuffer(_input.buf, dtype=np.uint8, count=task.input_length, offset=offset)
    try:
        wanted = _wanted(_options.configured(), task.renditions)
        rendered = render_renditions(
            source,
            wanted,
            max_pixels=_options.max_pixels,
            max_decode_bytes=_options.max_decode_bytes,
        )
    except ImageRejected as exc:
        return RenderResult(error=str(exc))
    finally:
        del source  # release the export of the shared buffer
    outputs, at = [], 0
    for image in rendered.images:
        outputs.append(
            RenditionOutput(
                image.name, at, len(image.data), image.width, image.height, image.content_type
            )
        )
        at += len(image.data)
    oversized = None
    if at <= _output_slot_bytes:
        start = task.output_slot * _output_slot_bytes
        for image, output in zip(rendered.images, outputs, strict=True):
            _output.buf[start + output.offset : start + output.offset + output.length] = image.data
    else:
        oversized = b"".join(image.data for image in rendered.images)
    first = outputs[0]
    return RenderResult(
        output_length=first.length,
        oversized_output=oversized,
        width=first.width,
        height=first.height,
        content_type=first.content_type,
        source_width=rendered.source_width,
        source_height=rendered.source_height,
        cpu_seconds=time.process_time() - started_cpu,
        wall_seconds=time.perf_counter() - started_wall,
        outputs=tuple(outputs),
    )


def _wanted(
    configured: tuple[Rendition, ...], names: tuple[str, ...] | None
) -> tuple[Rendition, ...]:
    """The configured renditions among `names`: a name the configuration no longer has (it
    changed after the upload) is left out, and if none is left every rendition is made."""
    known = {r.name for r in configured}
    chosen = select(configured, [n for n in names if n in known]) if names is not None else ()
    return chosen or configured


def input_view(task: RenderTask) -> memoryview:
    """In a CPU process: the whole input slot of `task`, writable (for render functions given
    to the pool in place of `render_slot`)."""
    assert _input is not None and _input.buf is not None
    start = task.input_slot * _input_slot_bytes
    return _input.buf[start : start + _input_slot_bytes]


@dataclass(frozen=True)
class _Failure:
    """An unexpected exception in a CPU process, carried back as text (it may not pickle)."""

    description: str
    traceback: str = ""


def _serve(
    conn: Connection, setup: _ProcessSetup, render: Callable[[RenderTask], RenderResult]
) -> None:
    """A CPU process's whole life: start, say so, then answer one task at a time until told
    to stop (None) or until the node's end of the pipe closes.

    Urgent renders run on this (the main) thread; with `bulk_nice`, bulk renders run on a
    thread of their own at that lower CPU priority (one render at a time either way)."""
    bulk = _BulkThread(render, setup.bulk_nice) if setup.bulk_nice > 0 else None
    _init_process(setup)  # after the thread: its stack is part of the size the cap starts from
    conn.send(os.getpid())
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        task, urgent = message
        conn.send(_answer(render, task) if urgent or bulk is None else bulk.answer(task))


def _answer(
    render: Callable[[RenderTask], RenderResult], task: RenderTask
) -> RenderResult | _Failure:
    try:
        return render(task)
    except Exception as exc:  # the node raises it; this process stays usable
        if _out_of_memory(exc):
            return RenderResult(error=OUT_OF_MEMORY_REASON)  # this image's own failure
        return _Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc())


class _BulkThread:
    """The CPU process's thread for bulk renders, at `nice` below the process's priority.

    Linux schedules threads, and a thread may lower its own priority without privileges (it
    could not raise it back; hence a thread per priority, not one thread switching). While an
    interactive render runs on one core, bulk renders on the others then give way to it and to
    the node, database and object store work it waits on, and take every cycle left over."""

    def __init__(self, render: Callable[[RenderTask], RenderResult], nice: int) -> None:
        self._render = render
        self._nice = nice
        self._tasks: queue.SimpleQueue[RenderTask] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[RenderResult | _Failure] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="bulk-render", daemon=True).start()

    def answer(self, task: RenderTask) -> RenderResult | _Failure:
        self._tasks.put(task)
        return self._answers.get()

    def _run(self) -> None:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + self._nice))
        while True:
            self._answers.put(_answer(self._render, self._tasks.get()))


def _out_of_memory(exc: Exception) -> bool:
    """An allocation refused under the memory cap, by Python or numpy, or inside OpenCV."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, cv2.error) and exc.code == cv2.Error.StsNoMem


class _CpuProcess:
    """One CPU process and the node's end of its pipe; used by one thread at a time."""

    def __init__(
        self,
        context: ForkServerContext,
        setup: _ProcessSetup,
        render: Callable[[RenderTask], RenderResult],
    ) -> None:
        self.conn, child_end = context.Pipe(duplex=True)
        process: BaseProcess = context.Process(
            target=_serve, args=(child_end, setup, render), name="pixelmill-cpu", daemon=True
        )
        process.start()
        child_end.close()
        self.process = process

    def wait_started(self) -> None:
        """Block until the process has attached to the arenas (start-up paid up front)."""
        if not wait([self.conn, self.process.sentinel]) or not self.conn.poll():
            raise RenderCrashed("a CPU process died while starting")
        try:
            self.conn.recv()
        except EOFError as exc:
            raise RenderCrashed("a CPU process died while starting") from exc

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def render(self, task: RenderTask, timeout: float | None, urgent: bool) -> RenderResult:
        try:
            self.conn.send((task, urgent))
        except OSError as exc:  # the process is gone: its end of the pipe is closed
            raise RenderCrashed("the CPU process was gone") from exc
        ready = wait([self.conn, self.process.sentinel], timeout)
        if not ready:
            raise RenderTimedOut(f"no answer within {timeout} s")
        try:
            # Answered, or died: a dead process's pipe reads as end-of-file.
            answer = self.conn.recv() if self.conn.poll() else None
        except (EOFError, OSError):
            answer = None
        if answer is None:
            raise RenderCrashed(f"the CPU process exited with code {self._exit_code()}")
        if isinstance(answer, _Failure):
            raise RenderFailed(answer.description, answer.traceback)
        assert isinstance(answer, RenderResult)
        return answer

    def _exit_code(self) -> int | None:
        self.process.join(timeout=1.0)
        return self.process.exitcode

    def stop(self) -> None:
        """Ask the process to finish; kill it if it does not."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(STOP_GRACE_SECONDS)
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class KernelPool:
    """`processes` CPU processes bound to one input and one output arena.

    `render()` is called from many threads; each call holds one idle process for its round
    trip. Processes start from a fork server (never forked from the threaded node), all of
    them before the constructor returns.
    """

    def __init__(
        self,
        processes: int,
        input_arena: tuple[str, int],
        output_arena: tuple[str, int],
        options: KernelOptions,
        render: Callable[[RenderTask], RenderResult] = render_slot,
        context: ForkServerContext | None = None,
        after_render: Callable[[], None] | None = None,
        bulk_nice: int = 0,
    ) -> None:
        """`after_render` is called on the rendering thread after every render, whatever its
        outcome (the node counts it as progress). `bulk_nice` > 0 runs renders that are not
        urgent at that much lower CPU priority (see `_BulkThread`)."""
        self._setup = _ProcessSetup(
            *input_arena, *output_arena, options, os.getpid(), bulk_nice=bulk_nice
        )
        self._render = render
        self._after_render = after_render
        self._context = context or multiprocessing.get_context("forkserver")
        self._changed = threading.Condition()
        self._members: set[_CpuProcess] = set()  # idle and busy
        self._idle: list[_CpuProcess] = []
        # Renders waiting for a process; while urgent ones wait, no other render borrows.
        self._waiting = 0
        self._urgent_waiting = 0
        self._closed = False
        self.processes = processes
        self._add(processes)

    def render(
        self, task: RenderTask, timeout: float | None = None, *, urgent: bool = False
    ) -> RenderResult:
        """Render one image. RenderCrashed if its process died, RenderTimedOut if it took
        longer than `timeout` seconds (None: no deadline); either way only this render fails.
        An `urgent` render (interactive work) gets the next idle process before any other."""
        process = self._borrow(urgent)
        try:
            result = process.render(task, timeout, urgent)
        except RenderFailed:
            self._give_back(process)  # it answered: the process is in a known state
            raise
        except BaseException:
            # Crashed, timed out, or interrupted mid-task: a late answer must never reach the
            # next caller, so the process goes.
            self._retire(process)
            raise
        finally:
            if self._after_render is not None:
                self._after_render()
        self._give_back(process)
        return result

    @property
    def renditions(self) -> tuple[Rendition, ...]:
        """The renditions this pool makes, the deployment's first (main) one first."""
        return self._setup.options.configured()

    @property
    def waiting(self) -> int:
        """Renders waiting for an idle process."""
        with self._changed:
            return self._waiting

    def pids(self) -> list[int]:
        """The CPU processes, idle and busy."""
        with self._changed:
            return sorted(p.process.pid for p in self._members if p.process.pid is not None)

    def resize(self, processes: int) -> None:
        """Change the number of processes; a busy process above the new number ends when its
        render does."""
        with self._changed:
            self.processes = processes
            surplus = max(0, len(self._members) - processes)
            stopping = self._idle[:surplus]
            del self._idle[: len(stopping)]
            self._members.difference_update(stopping)
            missing = max(0, processes - len(self._members))
        for process in stopping:
            process.stop()
        self._add(missing)

    def close(self) -> None:
        """Stop every process, waiting for the busy ones' renders to end."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: len(self._idle) == len(self._members))
            stopping, self._idle = self._idle, []
            self._members.clear()
        for process in stopping:
            process.stop()

    def _add(self, count: int) -> None:
        started = [_CpuProcess(self._context, self._setup, self._render) for _ in range(count)]
        try:
            for process in started:
                process.wait_started()
        except RenderCrashed:
            for process in started:
                process.kill()
            raise
        with self._changed:
            self._members.update(started)
            self._idle.extend(started)
            self._changed.notify_all()

    def _retire(self, process: _CpuProcess) -> None:
        """End a process that died, overran or was interrupted, and start its successor."""
        process.kill()
        with self._changed:
            self._members.discard(process)
            wanted = not self._closed and len(self._members) < self.processes
            self._changed.notify_all()
        if wanted:
            self._add(1)

    def _borrow(self, urgent: bool) -> _CpuProcess:
        while True:
            with self._changed:
                self._waiting += 1
                if urgent:
                    self._urgent_waiting += 1
                try:
                    self._changed.wait_for(
                        lambda: (
                            (self._idle and (urgent or not self._urgent_waiting)) or self._closed
                        )
                    )
                finally:
                    self._waiting -= 1
                    if urgent:
                        self._urgent_waiting -= 1
                        # Renders that stood back for this one may take what is still idle.
                        self._changed.notify_all()
                if self._closed:
                    raise RuntimeError("the CPU pool is closed")
                # Oldest-returned first keeps every process warm.
                process = self._idle.pop(0)
            if process.alive:
                return process
            # Died while idle (killed from outside): not this image's fault.
            self._retire(process)

    def _give_back(self, process: _CpuProcess) -> None:
        with self._changed:
            surplus = len(self._members) > self.processes
            if surplus:
                self._members.discard(process)
            else:
                self._idle.append(process)
            self._changed.notify_all()
        if surplus:
            process.stop()
