"""A pausable TCP proxy: how a test or the chaos benchmark cuts one process's link to a service
without touching the service itself, and the free-port helper it needs."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lasting_port(low: int = 10000) -> int:
    """A free port below the kernel's ephemeral range, for a service that is restarted on the
    same port: no outgoing connection is ever given it meanwhile (one from the ephemeral range
    may be, and the restart then fails with "address in use")."""
    try:
        high = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32768
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port between {low} and {high}")


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_port`, so a shared service can be made unreachable
    for one stack only: `pause()` drops every open connection and refuses new ones (the listener
    is closed), `resume()` listens again on the same port. `tap`, when given, is called once per
    accepted connection and returns the function that sees every chunk the client sends, before
    the service does."""

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        tap: Callable[[], Callable[[bytes], None]] | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self._tap = tap
        self.port = lasting_port()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def pause(self) -> None:
        """Refuse new connections and reset every open one, as if the service went down."""
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            victims, self._open = self._open, set()
        for sock in victims:
            _close(sock)

    def resume(self) -> None:
        self.start()

    def close(self) -> None:
        self.pause()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by pause()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            sent = self._tap() if self._tap is not None else None
            for source, sink, seen in ((client, upstream, sent), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(source, sink, seen), daemon=True).start()

    def _pump(
        self,
        source: socket.socket,
        sink: socket.socket,
        seen: Callable[[bytes], None] | None = None,
    ) -> None:
        try:
            while chunk := source.recv(65536):
                if seen is not None:
                    seen(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        with self._lock:
            self._open.discard(source)
            self._open.discard(sink)
        _close(source)
        _close(sink)
