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
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.config import Settings, declare_local
from ops.issuer_flows import (
    CONSOLE_CLIENT_ID,
    CONSOLE_REDIRECT_URIS,
    REFRESH_SECONDS,
    AuthorizationRequest,
    GrantError,
    PublicClient,
    SignInFlows,
    TokenGrant,
    error_page,
    login_page,
    redirect_with,
)

log = logging.getLogger(__name__)

SIGNING_ALGORITHM = "RS256"
KEY_FILE_NAME = "signing-key.pem"
DEFAULT_SCOPE = "openid profile email"
MAX_FORM_BYTES = 64 * 1024


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
        *,
        public_clients: tuple[PublicClient, ...] | None = None,
        access_token_seconds: int = 300,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.realm = realm
        self.client_id = client_id
        self.access_token_seconds = access_token_seconds
        # Browser sign-in for the demo users; tokens name the API's client in `aud`, as the
        # Keycloak realm's audience mapper makes them.
        self.flows = SignInFlows(
            public_clients or (PublicClient(CONSOLE_CLIENT_ID, CONSOLE_REDIRECT_URIS),)
        )
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
    def authorization_path(self) -> str:
        return f"/realms/{self.realm}/protocol/openid-connect/auth"

    @property
    def token_path(self) -> str:
        return f"/realms/{self.realm}/protocol/openid-connect/token"

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
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "authorization_response_iss_parameter_supported": True,
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

    def token_response(self, grant: TokenGrant) -> dict[str, Any]:
        """The token endpoint's answer for a code or refresh grant of a demo user."""
        token = self.mint_token(
            grant.user.username,
            grant.user.roles,
            expires_in=self.access_token_seconds,
            azp=grant.client_id,
            aud=[self.client_id, "account"],
            scope=grant.scope,
        )
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.access_token_seconds,
            "refresh_token": grant.refresh_token,
            "refresh_expires_in": REFRESH_SECONDS,
            "scope": grant.scope,
        }

    def grant(self, form: dict[str, str]) -> dict[str, Any]:
        """POST to the token endpoint: the answer, or GrantError."""
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return self.token_response(self.flows.redeem_code(form))
        if grant_type == "refresh_token":
            return self.token_response(self.flows.refresh(form))
        raise GrantError("unsupported_grant_type", "authorization_code or refresh_token")

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
    """GET: discovery, JWKS and the login form; POST: the login form and the token endpoint;
    OPTIONS: CORS preflights. 404 for anything else."""

    server: IssuerHTTPServer

    def do_GET(self) -> None:
        issuer = self.server.issuer
        path, _, query = self.path.partition("?")
        if issuer is not None and path == issuer.authorization_path:
            self._authorization_form(issuer, dict(parse_qsl(query)))
            return
        document = issuer.document_for(path) if issuer else None
        if document is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})
        else:
            self._send(HTTPStatus.OK, document)

    def do_POST(self) -> None:
        issuer = self.server.issuer
        path = self.path.split("?", 1)[0]
        form = self._form()
        if issuer is None or form is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})
        elif path == issuer.authorization_path:
            self._signed_in(issuer, form)
        elif path == issuer.token_path:
            try:
                self._send(HTTPStatus.OK, issuer.grant(form))
            except GrantError as exc:
                self._send(HTTPStatus(exc.status), exc.document())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not_found"})

    def do_OPTIONS(self) -> None:
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        self.send_header("Access-Control-Allow-Headers", "Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _authorization_form(self, issuer: LocalIssuer, query: dict[str, str]) -> None:
        request = self._checked_request(issuer, query)
        if request is not None:
            self._send_page(HTTPStatus.OK, login_page(request, issuer.realm), request)

    def _signed_in(self, issuer: LocalIssuer, form: dict[str, str]) -> None:
        request = self._checked_request(issuer, form)
        if request is None:
            return
        code = issuer.flows.sign_in(request, form.get("username", ""), form.get("password", ""))
        if code is None:
            page = login_page(request, issuer.realm, failed=True)
            self._send_page(HTTPStatus.OK, page, request)
            return
        answer = {"code": code, "state": request.state, "iss": issuer.issuer}
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", redirect_with(request.redirect_uri, answer))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _checked_request(
        self, issuer: LocalIssuer, fields: dict[str, str]
    ) -> AuthorizationRequest | None:
        """The authorization request, or None once an error page or redirect was sent."""
        try:
            return issuer.flows.authorization_request(fields)
        except GrantError as exc:
            client = issuer.flows.client(fields.get("client_id", ""))
            redirect_uri = fields.get("redirect_uri", "")
            if client is None or not client.allows(redirect_uri):
                self._send_page(HTTPStatus.BAD_REQUEST, error_page(exc), None)
                return None
            answer = {"error": exc.error, "error_description": exc.description}
            self.send_response(HTTPStatus.FOUND)
            location = redirect_with(redirect_uri, {**answer, "state": fields.get("state", "")})
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None

    def _form(self) -> dict[str, str] | None:
        """The urlencoded body, or None when it is missing, too large or another type."""
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            return None
        if content_type != "application/x-www-form-urlencoded" or not 0 < length <= MAX_FORM_BYTES:
            return None
        return dict(parse_qsl(self.rfile.read(length).decode("utf-8", "replace")))

    def _cors_headers(self) -> None:
        """Pages of a registered client may read the answers (discovery, JWKS, tokens)."""
        issuer, origin = self.server.issuer, self.headers.get("Origin")
        if issuer is not None and origin and issuer.flows.allows_origin(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _send_page(
        self, status: HTTPStatus, page: str, request: AuthorizationRequest | None
    ) -> None:
        body = page.encode("utf-8")
        # The form posts here, then is redirected to the client: both are allowed targets.
        targets = "'self'" + (f" {_origin_of(request.redirect_uri)}" if request else "")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header(
            "Content-Security-Policy",
            f"default-src 'none'; form-action {targets}; frame-ancestors 'none'",
        )
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(body)

    def _send(self, status: HTTPStatus, document: Mapping[str, Any]) -> None:
        body = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self._cors_headers()
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("issuer %s - " + format, self.address_string(), *args)


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


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
    access_token_seconds: int = 300,
) -> Iterator[LocalIssuer]:
    """A served LocalIssuer whose base URL is the bound address; stopped on exit."""
    server, thread = serve(None, host, port)
    try:
        server.issuer = LocalIssuer(
            state_dir,
            server.base_url,
            realm,
            client_id,
            access_token_seconds=access_token_seconds,
        )
        yield server.issuer
    finally:
        stop(server, thread)


def _serve_arguments(argv: list[str]) -> argparse.Namespace:
    auth = Settings.from_env(declare_local(os.environ)).auth
    parser = argparse.ArgumentParser(
        prog="python -m ops issuer",
        description="Serve a local development OIDC issuer (discovery, JWKS, and sign-in of "
        "the demo users with the authorization code flow).",
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
    parser.add_argument("--console-client-id", default=auth.console_client_id)
    parser.add_argument(
        "--redirect-uri",
        action="append",
        default=list(CONSOLE_REDIRECT_URIS),
        help="another redirect URI of the console client (repeatable; loopback ones match on "
        "any port)",
    )
    return parser.parse_args(argv)


def serve_command(argv: list[str]) -> int:
    """Serve discovery and JWKS until SIGTERM or SIGINT; return the exit status."""
    args = _serve_arguments(argv)
    console = PublicClient(args.console_client_id, tuple(args.redirect_uri))
    issuer = LocalIssuer(
        args.state_dir, args.base_url, args.realm, args.client_id, public_clients=(console,)
    )
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
