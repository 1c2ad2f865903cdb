"""Webhook deliveries by the Standard Webhooks scheme: the signing secret (made, encrypted,
decrypted), the signature headers, the refusal of private targets, and one HTTP attempt.

Shared by the API (which checks a callback URL and makes its secret) and the worker nodes (which
send the events). A target is checked when the batch is created and again at every attempt, and
the connection goes to the address that was checked, so DNS cannot rebind it to a private one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken

SECRET_PREFIX = "whsec_"
USER_AGENT = "pixelmill-webhooks/1"

Resolver = Callable[[str, int], list[str]]


class TargetRefused(ValueError):
    """A callback URL pixelmill will not call; the message says why."""


class TargetUnresolved(TargetRefused):
    """The host does not resolve now: no address to vet or to call (yet)."""


class SecretUnreadable(ValueError):
    """A stored secret does not decrypt with WEBHOOK_ENCRYPTION_KEY (the key was changed)."""


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


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({str(info[4][0]) for info in infos})


def check_target(url: str, allow_private: bool, resolve: Resolver = system_resolver) -> Target:
    """The URL as a `Target`, or TargetRefused: `https` only (plain `http` only where private
    targets are allowed), and every address the host resolves to must be public unless
    `allow_private`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise TargetRefused("callback_url is not a valid URL") from None
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed:
        schemes = " or ".join(f"{scheme}://" for scheme in allowed)
        raise TargetRefused(f"callback_url must start with {schemes}")
    if not parts.hostname or parts.username or parts.password:
        raise TargetRefused("callback_url needs a host and no credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(parts.hostname, port)
    if not addresses:
        raise TargetUnresolved(f"callback_url host {parts.hostname!r} does not resolve")
    if not allow_private:
        for address in addresses:
            if not _is_public(address):
                raise TargetRefused(
                    f"callback_url host {parts.hostname!r} resolves to a private, loopback or "
                    "link-local address"
                )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, addresses[0], path)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def post_event(
    target: Target, body: bytes, headers: dict[str, str], timeout_seconds: float
) -> AttemptResult:
    """One POST to the vetted address; redirects are not followed and only 2xx is success."""
    connection = _connection(target, timeout_seconds)
    try:
        connection.request(
            "POST",
            target.path,
            body=body,
            headers={
                **headers,
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "Host": _host_header(target),
            },
        )
        response = connection.getresponse()
        response.read(64 * 1024)
        return AttemptResult(200 <= response.status < 300, f"HTTP {response.status}")
    except TimeoutError:
        return AttemptResult(False, "timed out")
    except (OSError, http.client.HTTPException) as exc:
        return AttemptResult(False, f"{type(exc).__name__}: {exc}"[:200])
    finally:
        connection.close()


def _host_header(target: Target) -> str:
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the host name resolves to now."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As `_PinnedHTTPConnection`, with TLS verified against the URL's host name."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address
        self._tls = ssl.create_default_context()

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target, timeout)
    return _PinnedHTTPConnection(target, timeout)
