"""The local issuer's browser sign-in: the demo users, the public clients that may sign them in,
and the authorization code (with PKCE, S256 only) and refresh token grants, as Keycloak answers
them. Plain data in, plain data out: `ops.issuer` does the HTTP.

Codes and refresh tokens live in memory only: restarting the issuer signs everybody out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from ops.demo_users import DemoUser, demo_users

CODE_SECONDS = 60
REFRESH_SECONDS = 30 * 60
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# RFC 7636 4.1: 43 to 128 characters of the unreserved set.
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")


@dataclass(frozen=True)
class PublicClient:
    """A client without a secret (a browser page) and where it may be sent back to.

    A loopback redirect URI matches on any port (RFC 8252 7.3): the console of an API on a
    free port is the same client. Scheme, host and path must match exactly, and no query.
    """

    client_id: str
    redirect_uris: tuple[str, ...]

    def allows(self, redirect_uri: str) -> bool:
        if redirect_uri in self.redirect_uris:
            return True
        asked = urlsplit(redirect_uri)
        if asked.hostname is None or asked.query or asked.fragment:
            return False
        return any(_same_loopback(asked, urlsplit(r)) for r in self.redirect_uris)

    def allows_origin(self, origin: str) -> bool:
        """Whether a page at `origin` may be this client's (CORS): a redirect URI's origin, or
        the same loopback host on any port."""
        asked = urlsplit(origin)
        for registered in map(urlsplit, self.redirect_uris):
            if origin == f"{registered.scheme}://{registered.netloc}":
                return True
            if registered.hostname in LOOPBACK_HOSTS and (asked.scheme, asked.hostname) == (
                registered.scheme,
                registered.hostname,
            ):
                return True
        return False


def _same_loopback(asked: Any, registered: Any) -> bool:
    return registered.hostname in LOOPBACK_HOSTS and (asked.scheme, asked.hostname, asked.path) == (
        registered.scheme,
        registered.hostname,
        registered.path,
    )


CONSOLE_CLIENT_ID = "pixelmill-console"
CONSOLE_REDIRECT_URIS = (
    "http://127.0.0.1:3000/console/callback.html",
    "http://localhost:3000/console/callback.html",
)


class GrantError(Exception):
    """A refused token or authorization request: `error` is the RFC 6749 code."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status

    def document(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True)
class AuthorizationRequest:
    """What a client asked `/auth` for, checked: safe to show the login form for."""

    client_id: str
    redirect_uri: str
    state: str
    code_challenge: str
    scope: str

    def hidden_fields(self) -> dict[str, str]:
        return {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "state": self.state,
            "code_challenge": self.code_challenge,
            "code_challenge_method": "S256",
            "scope": self.scope,
        }


@dataclass
class _IssuedCode:
    request: AuthorizationRequest
    user: DemoUser
    expires_at: float
    used: bool = False
    refresh_token: str | None = None


@dataclass
class _RefreshGrant:
    client_id: str
    user: DemoUser
    scope: str
    expires_at: float


@dataclass(frozen=True)
class TokenGrant:
    """Who a token endpoint call signs in, for which client: the issuer signs the tokens."""

    user: DemoUser
    client_id: str
    scope: str
    refresh_token: str


def s256_challenge(verifier: str) -> str:
    """BASE64URL(SHA256(verifier)) without padding (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class SignInFlows:
    """Pending codes and live refresh tokens of the demo users, guarded by one lock."""

    clients: Sequence[PublicClient]
    users: Sequence[DemoUser] = field(default_factory=demo_users)
    clock: Callable[[], float] = time.time
    _codes: dict[str, _IssuedCode] = field(default_factory=dict)
    _refresh: dict[str, _RefreshGrant] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    refresh_grants: int = 0

    def client(self, client_id: str) -> PublicClient | None:
        return next((c for c in self.clients if c.client_id == client_id), None)

    def allows_origin(self, origin: str) -> bool:
        return any(c.allows_origin(origin) for c in self.clients)

    def authorization_request(self, query: Mapping[str, str]) -> AuthorizationRequest:
        """The checked request, or GrantError. An unknown client or redirect URI is never
        redirected to (RFC 6749 4.1.2.1): the caller shows the error instead."""
        client = self.client(query.get("client_id", ""))
        if client is None:
            raise GrantError("invalid_client", "unknown client_id")
        redirect_uri = query.get("redirect_uri", "")
        if not client.allows(redirect_uri):
            raise GrantError("invalid_request", "redirect_uri is not registered for this client")
        if query.get("response_type") != "code":
            raise GrantError("unsupported_response_type", "only response_type=code")
        challenge = query.get("code_challenge", "")
        if query.get("code_challenge_method") != "S256" or not re.fullmatch(
            r"[A-Za-z0-9_-]{43}", challenge
        ):
            raise GrantError("invalid_request", "PKCE with code_challenge_method=S256 is required")
        return AuthorizationRequest(
            client.client_id,
            redirect_uri,
            query.get("state", ""),
            challenge,
            query.get("scope", "openid"),
        )

    def sign_in(self, request: AuthorizationRequest, username: str, password: str) -> str | None:
        """A fresh single-use code for the user, or None for wrong credentials."""
        user = self._user(username, password)
        if user is None:
            return None
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._drop_expired()
            self._codes[code] = _IssuedCode(request, user, self.clock() + CODE_SECONDS)
        return code

    def redeem_code(self, form: Mapping[str, str]) -> TokenGrant:
        """`grant_type=authorization_code`: the code once, for its client, redirect URI and
        PKCE verifier. A code presented again is refused and the refresh token it gave is
        revoked (RFC 6749 10.5)."""
        with self._lock:
            issued = self._codes.get(form.get("code", ""))
            if issued is None or issued.expires_at < self.clock():
                raise GrantError("invalid_grant", "unknown or expired code")
            if issued.used:
                if issued.refresh_token is not None:
                    self._refresh.pop(issued.refresh_token, None)
                raise GrantError("invalid_grant", "code already used")
            issued.used = True
            _check_redemption(issued.request, form)
            grant = self._new_refresh(issued.request.client_id, issued.user, issued.request.scope)
            issued.refresh_token = grant.refresh_token
            return grant

    def refresh(self, form: Mapping[str, str]) -> TokenGrant:
        """`grant_type=refresh_token`: a new refresh token replaces the one presented."""
        with self._lock:
            presented = self._refresh.pop(form.get("refresh_token", ""), None)
            if presented is None or presented.expires_at < self.clock():
                raise GrantError("invalid_grant", "unknown or expired refresh token")
            if presented.client_id != form.get("client_id"):
                raise GrantError("invalid_grant", "refresh token of another client")
            self.refresh_grants += 1
            return self._new_refresh(presented.client_id, presented.user, presented.scope)

    def _new_refresh(self, client_id: str, user: DemoUser, scope: str) -> TokenGrant:
        token = secrets.token_urlsafe(32)
        self._refresh[token] = _RefreshGrant(client_id, user, scope, self.clock() + REFRESH_SECONDS)
        return TokenGrant(user, client_id, scope, token)

    def _user(self, username: str, password: str) -> DemoUser | None:
        for user in self.users:
            if hmac.compare_digest(user.username, username) and hmac.compare_digest(
                user.password.encode(), password.encode()
            ):
                return user
        return None

    def _drop_expired(self) -> None:
        now = self.clock()
        # A used code stays until it expires, so that presenting it again is recognised.
        self._codes = {c: i for c, i in self._codes.items() if i.expires_at >= now}
        self._refresh = {t: g for t, g in self._refresh.items() if g.expires_at >= now}


def _check_redemption(request: AuthorizationRequest, form: Mapping[str, str]) -> None:
    if form.get("client_id") != request.client_id:
        raise GrantError("invalid_grant", "code issued to another client")
    if form.get("redirect_uri") != request.redirect_uri:
        raise GrantError("invalid_grant", "redirect_uri differs from the authorization request")
    verifier = form.get("code_verifier", "")
    if not _VERIFIER.match(verifier) or not hmac.compare_digest(
        s256_challenge(verifier), request.code_challenge
    ):
        raise GrantError("invalid_grant", "PKCE verification failed")


def redirect_with(redirect_uri: str, parameters: Mapping[str, str]) -> str:
    return f"{redirect_uri}?{urlencode(parameters)}"


def login_page(request: AuthorizationRequest, realm: str, failed: bool = False) -> str:
    """A plain HTML login form (no script, no style) that posts back to `/auth`."""
    hidden = "\n".join(
        f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
        for name, value in request.hidden_fields().items()
    )
    message = '<p role="alert">Invalid username or password.</p>' if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in to {html.escape(realm)}</title></head>
<body><main>
<h1>Sign in to {html.escape(realm)}</h1>
<p>Local development issuer: the demo logins of ops/keycloak/demo-ImageProcessor.json.</p>
{message}
<form method="post" action="">
{hidden}
<p><label for="username">Username</label><br>
<input id="username" name="username" autocomplete="username" required autofocus></p>
<p><label for="password">Password</label><br>
<input id="password" name="password" type="password" autocomplete="current-password" required></p>
<p><button type="submit" id="kc-login">Sign in</button></p>
</form></main></body></html>
"""


def error_page(error: GrantError) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign-in error'
        f"</title></head><body><h1>Sign-in error</h1><p>{html.escape(error.error)}: "
        f"{html.escape(error.description)}</p></body></html>\n"
    )
