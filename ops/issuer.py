"""A small local OIDC issuer for development and tests: signs Keycloak-shaped access tokens and
serves the discovery document and JWKS over HTTP. Never used in production; Keycloak is.

The signing key lives in `<state_dir>/issuer/signing-key.pem` (mode 0600) so that `python -m ops
serve` and `python -m ops token`, run as separate processes, sign and publish the same key.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.config import Settings, declare_local

log = logging.getLogger(__name__)

SIGNING_ALGORITHM = "RS256"
KEY_FILE_NAME = "signing-key.pem"
DEFAULT_SCOPE = "openid profile email"


@dataclass(frozen=True)
class SigningKey:
    """An RSA private key and the `kid` under which its public half is published."""

    private_key: rsa.RSAPrivateKey
    kid: str

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the issuer signing key must be an RSA key")
        return cls(key, rfc7638_thumbprint(key.public_key()))

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_jwk(self) -> dict[str, str]:
        members = _rsa_public_members(self.private_key.public_key())
        return {**members, "kid": self.kid, "use": "sig", "alg": SIGNING_ALGORITHM}


def _base64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _rsa_public_members(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {"e": _base64url_uint(numbers.e), "kty": "RSA", "n": _base64url_uint(numbers.n)}


def rfc7638_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url): a `kid` derived from the key itself."""
    canonical = json.dumps(_rsa_public_members(public_key), separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _new_signing_key() -> SigningKey:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return SigningKey(private_key, rfc7638_thumbprint(private_key.public_key()))


def _write_private(path: Path, pem: bytes, *, replace: bool) -> bool:
    """Write `pem` to `path` with mode 0600 atomically; without `replace`, keep an existing file.

    Returns False when `path` already existed and was kept (another process created it first).
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        if replace:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)


class LocalIssuer:
    """Signs access tokens shaped like Keycloak's and answers discovery and JWKS requests.

    `jwks_requests` and `discovery_requests` count HTTP requests served, so tests can prove how
    often a resource server contacts its issuer.
    """

    def __init__(
        self,
        state_dir: Path,
        base_url: str,
        realm: str = "ImageProcessor",
        client_id: str = "api-gateway-client",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.realm = realm
        self.client_id = client_id
        self._key_path = Path(state_dir) / "issuer" / KEY_FILE_NAME
        self._lock = threading.Lock()
        self._signing_key: SigningKey | None = None
        self._retired_keys: list[SigningKey] = []
        self._jwks_requests = 0
        self._discovery_requests = 0

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/realms/{self.realm}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/certs"

    @property
    def discovery_path(self) -> str:
        return f"/realms/{self.realm}/.well-known/openid-configuration"

    @property
    def jwks_path(self) -> str:
        return f"/realms/{self.realm}/protocol/openid-connect/certs"

    @property
    def jwks_requests(self) -> int:
        with self._lock:
            return self._jwks_requests

    @property
    def discovery_requests(self) -> int:
        with self._lock:
            return self._discovery_requests

    @property
    def kid(self) -> str:
        return self._current_key().kid

    def _current_key(self) -> SigningKey:
        with self._lock:
            if self._signing_key is None:
                self._signing_key = self._load_or_create_key()
            return self._signing_key

    def _load_or_create_key(self) -> SigningKey:
        if not self._key_path.exists():
            self._key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            created = _new_signing_key()
            if _write_private(self._key_path, created.to_pem(), replace=False):
                log.info("created issuer signing key kid=%s", created.kid)
                return created
        return SigningKey.from_pem(self._key_path.read_bytes())

    def rotate_key(self, keep_old: bool = False) -> str:
        """Sign with a new key from now on and publish it; return its `kid`.

        With `keep_old`, the previous public key stays in the JWKS (as Keycloak does while old
        tokens are still valid); otherwise tokens signed with it stop verifying at the next refresh.
        """
        previous = self._current_key()
        replacement = _new_signing_key()
        _write_private(self._key_path, replacement.to_pem(), replace=True)
        with self._lock:
            self._signing_key = replacement
            self._retired_keys = [*self._retired_keys, previous] if keep_old else []
        log.info("rotated issuer signing key kid=%s keep_old=%s", replacement.kid, keep_old)
        return replacement.kid

    def withdraw_retired_keys(self) -> None:
        """Stop publishing the keys `rotate_key(keep_old=True)` kept: tokens they signed must
        stop verifying once resource servers refresh."""
        with self._lock:
            self._retired_keys = []
        log.info("withdrew retired issuer signing keys")

    def public_key_pem(self) -> bytes:
        return (
            self._current_key()
            .private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def jwks(self) -> dict[str, Any]:
        current = self._current_key()
        with self._lock:
            published = [current, *self._retired_keys]
        return {"keys": [key.public_jwk() for key in published]}

    def discovery(self) -> dict[str, Any]:
        protocol = f"{self.issuer}/protocol/openid-connect"
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{protocol}/auth",
            "token_endpoint": f"{protocol}/token",
            "userinfo_endpoint": f"{protocol}/userinfo",
            "jwks_uri": self.jwks_uri,
            "grant_types_supported": ["password", "client_credentials", "refresh_token"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [SIGNING_ALGORITHM],
            "scopes_supported": DEFAULT_SCOPE.split(),
        }

    def access_claims(
        self,
        sub: str,
        roles: Sequence[str] = ("user",),
        *,
        username: str | None = None,
        expires_in: int = 300,
        client_roles: Sequence[str] = (),
    ) -> dict[str, Any]:
        """The claims of a Keycloak access token for `sub` (no `nbf`: Keycloak omits it)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "exp": now + expires_in,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "iss": self.issuer,
            "aud": "account",
            "sub": sub,
            "typ": "Bearer",
            "azp": self.client_id,
            "scope": DEFAULT_SCOPE,
            "preferred_username": username or sub,
            "realm_access": {"roles": list(roles)},
        }
        if client_roles:
            claims["resource_access"] = {self.client_id: {"roles": list(client_roles)}}
        return claims

    def sign(self, claims: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> str:
        """Sign `claims` with the current key; `headers` are merged in, a None value removes one."""
        merged = {"kid": self.kid, **(headers or {})}
        header = {name: value for name, value in merged.items() if value is not None}
        signing_key = self._current_key().private_key
        return jwt.encode(dict(claims), signing_key, algorithm=SIGNING_ALGORITHM, headers=header)

    def mint_token(
        self,
        sub: str,
        roles: Sequence[str] = ("user",),
        *,
        username: str | None = None,
        expires_in: int = 300,
        client_roles: Sequence[str] = (),
        **claims_override: Any,
    ) -> str:
        """A signed access token; `claims_override` replaces claims, and None removes one."""
        claims = self.access_claims(
            sub, roles, username=username, expires_in=expires_in, client_roles=client_roles
        )
        claims.update(claims_override)
        return self.sign({name: value for name, value in claims.items() if value is not None})

    def document_for(self, path: str) -> dict[str, Any] | None:
        """The JSON document served at `path`, counting the request; None when there is none."""
        if path == self.discovery_path:
            with self._lock:
                self._discovery_requests += 1
            return self.discovery()
        if path == self.jwks_path:
            with self._lock:
                self._jwks_requests += 1
            return self.jwks()
        return None


class _IssuerRequestHandler(BaseHTTPRequestHandler):
    """Answers GET for the discovery document and JWKS; 404 for anything else."""

    server: IssuerHTTPServer

    def do_GET(self) -> None:
        issuer = self.server.issuer
        document = issuer.document_for(self.path.split("?", 1)[0]) if issuer else None
        if document is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})
        else:
            self._send(HTTPStatus.OK, document)

    def _send(self, status: HTTPStatus, document: Mapping[str, Any]) -> None:
        body = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("issuer %s - " + format, self.address_string(), *args)


class IssuerHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server whose handler serves `issuer` (set once the port is known)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _IssuerRequestHandler)
        self.issuer: LocalIssuer | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


def serve(
    issuer: LocalIssuer | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[IssuerHTTPServer, threading.Thread]:
    """Bind `host:port` and serve `issuer` from a daemon thread.

    Without an issuer, set `server.issuer` before use: bind first on port 0, then build the
    issuer with `server.base_url` so the advertised URLs name the bound port.
    """
    server = IssuerHTTPServer((host, port))
    server.issuer = issuer
    thread = threading.Thread(
        target=server.serve_forever, args=(0.1,), name="local-issuer", daemon=True
    )
    thread.start()
    return server, thread


def stop(server: IssuerHTTPServer, thread: threading.Thread) -> None:
    """Stop serving and release the port."""
    server.shutdown()
    server.server_close()
    thread.join()


@contextlib.contextmanager
def running(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    realm: str = "ImageProcessor",
    client_id: str = "api-gateway-client",
) -> Iterator[LocalIssuer]:
    """A served LocalIssuer whose base URL is the bound address; stopped on exit."""
    server, thread = serve(None, host, port)
    try:
        server.issuer = LocalIssuer(state_dir, server.base_url, realm, client_id)
        yield server.issuer
    finally:
        stop(server, thread)


def _serve_arguments(argv: list[str]) -> argparse.Namespace:
    auth = Settings.from_env(declare_local(os.environ)).auth
    parser = argparse.ArgumentParser(
        prog="python -m ops issuer",
        description="Serve a local development OIDC issuer (discovery + JWKS).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8180)
    parser.add_argument("--state-dir", type=Path, default=Path(".state"))
    parser.add_argument("--realm", default=auth.realm)
    parser.add_argument("--client-id", default=auth.client_id)
    parser.add_argument(
        "--base-url",
        default=auth.keycloak_url,
        help="URL clients and the API reach the issuer at (default: KEYCLOAK_URL)",
    )
    return parser.parse_args(argv)


def serve_command(argv: list[str]) -> int:
    """Serve discovery and JWKS until SIGTERM or SIGINT; return the exit status."""
    args = _serve_arguments(argv)
    issuer = LocalIssuer(args.state_dir, args.base_url, args.realm, args.client_id)
    server, thread = serve(issuer, args.host, args.port)
    stop_requested = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop_requested.set())
    print(
        f"local issuer {issuer.issuer} (kid {issuer.kid}) listening on {server.base_url}",
        file=sys.stderr,
        flush=True,
    )
    stop_requested.wait()
    stop(server, thread)
    return 0


def _token_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ops token",
        description="Print an access token signed by the local development issuer.",
    )
    parser.add_argument("--user", default="user", help="subject and preferred_username")
    parser.add_argument("--roles", default="user", help="comma-separated realm roles")
    parser.add_argument("--expires-in", type=int, default=300, help="seconds")
    parser.add_argument("--state-dir", type=Path, default=Path(".state"))
    return parser.parse_args(argv)


def token_command(argv: list[str]) -> int:
    """Print one access token for `--user` with `--roles`; nothing else goes to stdout."""
    args = _token_arguments(argv)
    auth = Settings.from_env(declare_local(os.environ)).auth
    issuer = LocalIssuer(args.state_dir, auth.keycloak_url, auth.realm, auth.client_id)
    roles = [role.strip() for role in args.roles.split(",") if role.strip()]
    print(issuer.mint_token(args.user, roles, expires_in=args.expires_in))
    return 0
