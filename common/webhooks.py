"""Webhook deliveries by the Standard Webhooks scheme: the signing secret (made, encrypted,
decrypted), the signature headers, the refusal of private targets, and one HTTP attempt.

Shared by the API (which checks a callback URL and makes its secret) and the worker nodes (which
send the events). The API checks only the URL's literal form (no DNS in a request); every
attempt resolves the host within its deadline, vets each address, and connects to the address
it vetted, so DNS cannot rebind it. An attempt has one deadline for everything (resolving,
connecting, TLS, sending, the response head) and reads at most `MAX_RESPONSE_HEAD_BYTES`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken

from common.config import WebhookSettings

SECRET_PREFIX = "whsec_"
USER_AGENT = "pixelmill-webhooks/1"
DEFAULT_PORTS = {"https": 443, "http": 80}
# What a receiver may make an attempt read: the status line and headers, never the body.
MAX_RESPONSE_HEAD_BYTES = 16 * 1024
MAX_RESPONSE_HEADERS = 64

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PATH = re.compile(r"^[\x21-\x7e]*$")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?$")
# Names that only ever mean this machine or a private network (RFC 6761, 6762, 8375).
_LOCAL_SUFFIXES = ("localhost", "local", "localdomain", "internal", "home.arpa")
# Where an IPv6 address carries an IPv4 one that is the real destination.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class TargetRefused(ValueError):
    """A callback URL pixelmill will not call; the message says why."""


class TargetUnresolved(TargetRefused):
    """The host does not resolve now (or not within the attempt's deadline)."""


class SecretUnreadable(ValueError):
    """A stored secret does not decrypt with WEBHOOK_ENCRYPTION_KEY (the key was changed)."""


class ResponseRefused(OSError):
    """The receiver's answer is not an HTTP response pixelmill reads (too large, malformed)."""


@dataclass(frozen=True)
class CallbackURL:
    """A callback URL whose literal form was checked: no DNS was asked."""

    scheme: str
    host: str
    port: int
    path: str
    literal_address: IPAddress | None

    @property
    def key(self) -> str:
        """What concurrent deliveries are counted by: one receiver, whatever the path."""
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """A checked callback URL: where to connect (a vetted address) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    detail: str  # "HTTP 200", "HTTP 302", "timed out", ...


class Deadline:
    """The time one attempt has left; `left()` raises TimeoutError once it has none."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self._end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the attempt's deadline passed")
        return remaining


def new_secret() -> str:
    """`whsec_` + base64 of 24 random bytes, the Standard Webhooks form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


class SecretBox:
    """Encrypts signing secrets at rest (Fernet: AES-128-CBC + HMAC-SHA256), with a key derived
    from WEBHOOK_ENCRYPTION_KEY by SHA-256."""

    def __init__(self, key: str) -> None:
        derived = hashlib.sha256(b"pixelmill webhook secrets\0" + key.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable("the webhook secret does not decrypt with this key") from None


def signature_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` and `webhook-signature` (v1: HMAC-SHA256 of
    "id.timestamp.body" keyed with the decoded secret)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{digest}",
    }


# --- Which targets: the URL's form, then its addresses ---------------------------------------


def check_callback_url(url: str, settings: WebhookSettings) -> CallbackURL:
    """The URL as a `CallbackURL`, or TargetRefused, from its literal form alone: `https` only
    (plain `http` too where private targets are allowed), a port of `allowed_ports`, a host
    name that can be public (not `localhost`, `*.local`, a single label...) or a public IP
    literal, and a path of visible ASCII."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise TargetRefused("callback_url is not a valid URL") from None
    allowed = ("https", "http") if settings.allow_private else ("https",)
    if parts.scheme not in allowed:
        schemes = " or ".join(f"{scheme}://" for scheme in allowed)
        raise TargetRefused(f"callback_url must start with {schemes}")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise TargetRefused("callback_url needs a host and no credentials")
    port = DEFAULT_PORTS[parts.scheme] if port is None else port
    if settings.allowed_ports is not None and port not in settings.allowed_ports:
        ports = ", ".join(map(str, sorted(settings.allowed_ports)))
        raise TargetRefused(f"callback_url must use port {ports}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not _PATH.match(path):
        raise TargetRefused("callback_url's path must be visible ASCII (percent-encode the rest)")
    host = parts.hostname.rstrip(".")
    literal = _literal_address(host)
    if literal is None:
        _check_host_name(host, settings.allow_private)
    elif not settings.allow_private and not is_public_address(literal):
        raise TargetRefused(f"callback_url host {host!r} is not a public address")
    return CallbackURL(parts.scheme, host, port, path, literal)


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_host_name(host: str, allow_private: bool) -> None:
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise TargetRefused("callback_url's host is not a valid host name (use its ASCII form)")
    if labels[-1].isdigit() or labels[-1].startswith("0x"):
        # `127.1`, `2130706433` or `0x7f.1`: resolvers read these as IPv4 addresses.
        raise TargetRefused("callback_url's host must be a name or a dotted IP address")
    if allow_private:
        return
    local = len(labels) == 1 or any(
        host == suffix or host.endswith(f".{suffix}") for suffix in _LOCAL_SUFFIXES
    )
    if local:
        raise TargetRefused(f"callback_url host {host!r} names a local or private host")


def is_public_address(address: IPAddress | str) -> bool:
    """Whether pixelmill may connect to `address`: globally reachable (`is_global`), not
    multicast, not site-local, and so is every IPv4 address it carries (mapped, NAT64, 6to4,
    Teredo). IPv4-compatible addresses (`::a.b.c.d`, deprecated) are never public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local or ip in _IPV4_COMPATIBLE or ip in _NAT64_LOCAL:
            return False
        if not all(is_public_address(inner) for inner in _carried_ipv4(ip)):
            return False
    return ip.is_global and not ip.is_multicast


def _carried_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    carried = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in _NAT64:
        carried.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [inner for inner in carried if inner is not None]


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({str(info[4][0]) for info in infos})


def resolve_target(
    callback: CallbackURL, settings: WebhookSettings, resolve: Resolver, deadline: Deadline
) -> Target:
    """Where to connect: the host's addresses, resolved within `deadline`, every one of them
    public unless private targets are allowed (TargetRefused), the first one pinned."""
    if callback.literal_address is not None:
        addresses = [str(callback.literal_address)]
    else:
        addresses = resolve_within(resolve, callback.host, callback.port, deadline.left())
    if not addresses:
        raise TargetUnresolved(f"callback_url host {callback.host!r} does not resolve")
    if not settings.allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise TargetRefused(
                    f"callback_url host {callback.host!r} resolves to a private, loopback, "
                    "link-local or otherwise non-public address"
                )
    return Target(callback.scheme, callback.host, callback.port, addresses[0], callback.path)


def resolve_within(resolve: Resolver, host: str, port: int, seconds: float) -> list[str]:
    """`resolve(host, port)` in a thread of its own, given up on after `seconds`:
    `getaddrinfo` has no timeout, and a sender must not wait past its deadline. A lookup given up
    on ends when the system resolver's own timeouts end it."""
    answer: list[list[str]] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            answer.append(resolve(host, port))
        finally:
            done.set()

    threading.Thread(target=lookup, name="webhook-dns", daemon=True).start()
    if not done.wait(seconds):
        raise TargetUnresolved(f"callback_url host {host!r} did not resolve in time")
    return answer[0] if answer else []


# --- One attempt -----------------------------------------------------------------------------


def post_event(
    target: Target, body: bytes, headers: dict[str, str], deadline: Deadline
) -> AttemptResult:
    """One POST to the vetted address, all of it within `deadline`; redirects are not
    followed and only 2xx is success. The response's body is never read."""
    try:
        with _connect(target, deadline) as sock:
            _send_all(sock, _request(target, body, headers), deadline)
            status = _read_status(sock, deadline)
    except TimeoutError:
        return AttemptResult(False, "timed out")
    except OSError as exc:
        return AttemptResult(False, f"{type(exc).__name__}: {exc}"[:200])
    return AttemptResult(200 <= status < 300, f"HTTP {status}")


def _connect(target: Target, deadline: Deadline) -> socket.socket:
    """A connection to the vetted address, TLS verified against the URL's host name; the TLS
    handshake's timeout bounds the whole handshake."""
    sock = socket.create_connection((target.address, target.port), timeout=deadline.left())
    if target.scheme != "https":
        return sock
    try:
        sock.settimeout(deadline.left())
        return _tls_context().wrap_socket(sock, server_hostname=target.host)
    except BaseException:
        sock.close()
        raise


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    """`sendall` within the deadline (a TLS socket's `sendall` times each piece, not the whole)."""
    view = memoryview(data)
    while view:
        sock.settimeout(deadline.left())
        view = view[sock.send(view) :]


def _request(target: Target, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {_host_header(target)}",
        f"User-Agent: {USER_AGENT}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _host_header(target: Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == DEFAULT_PORTS[target.scheme] else f"{host}:{target.port}"


def _read_status(sock: socket.socket, deadline: Deadline) -> int:
    """The final status code, read within `deadline` from at most `MAX_RESPONSE_HEAD_BYTES`
    (interim 1xx answers included) and `MAX_RESPONSE_HEADERS` header lines per head."""
    received = b""
    while True:
        head, received = _read_head(sock, deadline, received)
        status = _status_of(head)
        if status >= 200:
            return status


def _read_head(sock: socket.socket, deadline: Deadline, received: bytes) -> tuple[bytes, bytes]:
    """One response head (up to its blank line) and what was read after it."""
    budget = MAX_RESPONSE_HEAD_BYTES
    while b"\r\n\r\n" not in received:
        if len(received) >= budget:
            raise ResponseRefused(f"the response head is over {budget} bytes")
        sock.settimeout(deadline.left())
        chunk = sock.recv(min(4096, budget - len(received) + 4))
        if not chunk:
            raise ResponseRefused("the connection closed before the response head ended")
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return head, rest


def _status_of(head: bytes) -> int:
    status_line, *header_lines = head.split(b"\r\n")
    if len(header_lines) > MAX_RESPONSE_HEADERS:
        raise ResponseRefused(f"the response has over {MAX_RESPONSE_HEADERS} headers")
    matched = _STATUS_LINE.match(status_line)
    if matched is None:
        raise ResponseRefused("the response does not start with an HTTP/1.x status line")
    return int(matched.group(1))
