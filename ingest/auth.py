"""Bearer-token authentication for the API: verifies OIDC access tokens from the configured issuer
(Keycloak) as a resource server should (RFC 6750, RFC 8725, RFC 9068) and yields a `Principal`.

The issuer's signing keys are fetched lazily from its discovery document and JWKS and cached by
`kid`. The whole set is fetched again once it is `jwks_refresh_seconds` old, so a key the issuer
withdraws stops verifying within that time, and an unknown `kid` triggers no more than one fetch
per interval either, so the API starts while the issuer is down and forged tokens cannot make it
hammer the issuer.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from common.config import AuthSettings
from common.errors import DependencyUnavailable, PixelmillError

log = logging.getLogger(__name__)

FETCH_TIMEOUT_SECONDS = 3.0
MAX_DOCUMENT_BYTES = 1024 * 1024
# After a failed fetch the issuer is tried again sooner than after a good one, so the API
# recovers quickly when the issuer comes up late, while still sending it at most one request
# per this many seconds.
RETRY_AFTER_FAILURE_SECONDS = 5.0
ACCEPTED_HEADER_TYPES = frozenset({"jwt", "at+jwt", "application/at+jwt"})
KEY_TYPE_BY_ALGORITHM_PREFIX = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}

FetchJson = Callable[[str], Any]
Clock = Callable[[], float]


class AuthenticationError(PixelmillError):
    """401: no usable bearer token. The message never says which check failed."""

    status = 401
    code = "invalid_token"

    def __init__(self, message: str = "invalid token", *, token_presented: bool = True) -> None:
        super().__init__(message)
        # RFC 6750 section 3.1: no error code when the request carried no credentials at all.
        self.www_authenticate = 'Bearer error="invalid_token"' if token_presented else "Bearer"


class AuthorizationError(PixelmillError):
    """403: a valid token whose principal lacks the role the operation needs."""

    status = 403
    code = "insufficient_scope"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.www_authenticate = 'Bearer error="insufficient_scope"'


@dataclass(frozen=True)
class Principal:
    """Who made the request, as asserted by a verified access token."""

    subject: str
    username: str
    roles: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def has_role(self, name: str) -> bool:
        return name in self.roles


def require_role(principal: Principal, role: str) -> None:
    """Raise AuthorizationError unless `principal` holds `role`."""
    if not principal.has_role(role):
        raise AuthorizationError(f"the {role!r} role is required")


def _rejected(detail: str) -> AuthenticationError:
    log.debug("bearer token rejected: %s", detail)
    return AuthenticationError()


class IssuerDocumentError(ValueError):
    """The issuer answered with a discovery document or JWKS that cannot be used."""


def fetch_json(url: str, timeout_seconds: float = FETCH_TIMEOUT_SECONDS) -> Any:
    """GET `url` and parse its JSON body (at most MAX_DOCUMENT_BYTES); only http(s) URLs."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise IssuerDocumentError(f"refusing to fetch non-HTTP URL {url!r}")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
        body = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise IssuerDocumentError(f"{url} answered with more than {MAX_DOCUMENT_BYTES} bytes")
    return json.loads(body)


@dataclass(frozen=True)
class PublishedKey:
    """One signature key from the issuer's JWKS."""

    kid: str
    key_type: str
    declared_algorithm: str | None
    public_key: Any

    def verifies(self, algorithm: str) -> bool:
        """Whether this key may check a signature made with `algorithm` (RFC 8725 3.1)."""
        if self.declared_algorithm is not None:
            return self.declared_algorithm == algorithm
        return KEY_TYPE_BY_ALGORITHM_PREFIX.get(algorithm[:2]) == self.key_type


def _published_key(entry: dict[str, Any]) -> PublishedKey | None:
    kid, declared = entry.get("kid"), entry.get("alg")
    if entry.get("use", "sig") != "sig" or not isinstance(kid, str) or not kid:
        return None
    try:
        jwk = jwt.PyJWK(entry)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        log.debug("skipping JWKS key kid=%s: %s", kid, exc)
        return None
    return PublishedKey(
        kid, jwk.key_type or "", declared if isinstance(declared, str) else None, jwk.key
    )


def parse_jwks(document: Any) -> dict[str, PublishedKey]:
    """Signature keys of a JWKS by `kid`; encryption keys and unusable entries are skipped."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise IssuerDocumentError("JWKS has no 'keys' list")
    keys = (_published_key(entry) for entry in entries if isinstance(entry, dict))
    return {key.kid: key for key in keys if key is not None}


class SigningKeyCache:
    """The issuer's public signing keys by `kid`, fetched on first need and again whenever the
    set is `refresh_seconds` old (or an unknown `kid` arrives after that), never more than once
    per `refresh_seconds` (sooner after a failed fetch).

    A refresh replaces the whole mapping at once, so keys the issuer no longer publishes are
    dropped. The request that finds the set due refreshes it; concurrent ones keep using the
    current set rather than queue behind the fetch. A failed refresh keeps the keys already
    cached, so verification survives an issuer outage.
    """

    def __init__(
        self,
        discovery_url: str,
        expected_issuer: str,
        refresh_seconds: float,
        fetch: FetchJson = fetch_json,
        clock: Clock = time.monotonic,
    ) -> None:
        self._discovery_url = discovery_url
        self._expected_issuer = expected_issuer
        self._refresh_seconds = refresh_seconds
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, PublishedKey] = {}
        self._loaded = False
        self._jwks_uri: str | None = None
        self._next_fetch_at = float("-inf")

    def key_for(self, kid: str) -> PublishedKey | None:
        """The key published under `kid`, or None when the issuer does not publish it.

        Raises DependencyUnavailable when no keys were ever fetched and the issuer cannot be
        reached: the token may well be valid, so the client should retry rather than log in.
        """
        if self._loaded and self._clock() >= self._next_fetch_at:
            self._scheduled_refresh()
        key = self._keys.get(kid)
        if key is not None:
            return key
        with self._lock:
            key = self._keys.get(kid)  # another thread may have refreshed meanwhile
            if key is None and self._clock() >= self._next_fetch_at:
                self._refresh()
                key = self._keys.get(kid)
            if key is None and not self._loaded:
                raise DependencyUnavailable("identity provider")
            return key

    def _scheduled_refresh(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another request is refreshing; the current keys serve meanwhile
        try:
            if self._clock() >= self._next_fetch_at:
                self._refresh()
        finally:
            self._lock.release()

    def _refresh(self) -> None:
        try:
            keys = parse_jwks(self._fetch(self._jwks_uri or self._discover()))
            if not keys:
                raise IssuerDocumentError("JWKS holds no usable signing key")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.warning("cannot refresh issuer signing keys: %s", exc)
            self._next_fetch_at = self._clock() + min(
                self._refresh_seconds, RETRY_AFTER_FAILURE_SECONDS
            )
            return
        self._keys = keys
        self._loaded = True
        self._next_fetch_at = self._clock() + self._refresh_seconds
        log.info("loaded %d issuer signing key(s): %s", len(keys), ", ".join(sorted(keys)))

    def _discover(self) -> str:
        document = self._fetch(self._discovery_url)
        if not isinstance(document, dict):
            raise IssuerDocumentError("discovery document is not a JSON object")
        if document.get("issuer") != self._expected_issuer:
            raise IssuerDocumentError(
                f"discovery issuer {document.get('issuer')!r} != {self._expected_issuer!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise IssuerDocumentError("discovery document has no http(s) jwks_uri")
        self._jwks_uri = jwks_uri
        return jwks_uri


def _asymmetric_only(algorithms: tuple[str, ...]) -> frozenset[str]:
    """The allow-list minus `none` and HMAC, whatever the configuration says."""
    return frozenset(
        a for a in algorithms if a.lower() != "none" and not a.upper().startswith("HS")
    )


def _string_list(container: Any, name: str) -> list[str]:
    values = container.get(name) if isinstance(container, dict) else None
    if not isinstance(values, list):
        return []
    return [value for value in values if isinstance(value, str)]


def roles_from_claims(claims: Mapping[str, Any], client_id: str) -> frozenset[str]:
    """Keycloak realm roles plus the roles of `client_id` from `resource_access`."""
    resource_access = claims.get("resource_access")
    client_access = resource_access.get(client_id) if isinstance(resource_access, dict) else None
    realm_roles = _string_list(claims.get("realm_access"), "roles")
    return frozenset(realm_roles + _string_list(client_access, "roles"))


class TokenVerifier:
    """Turns an `Authorization` header into a Principal or raises AuthenticationError.

    Safe to share between threads. Nothing is fetched until the first token arrives.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        fetch: FetchJson = fetch_json,
        clock: Clock = time.monotonic,
    ) -> None:
        self._settings = settings
        self._algorithms = _asymmetric_only(settings.algorithms)
        self._keys = SigningKeyCache(
            settings.discovery_url, settings.issuer, settings.jwks_refresh_seconds, fetch, clock
        )

    def verify(self, authorization_header: str | None) -> Principal:
        token = self._bearer_token(authorization_header)
        algorithm, kid = self._checked_header(token)
        key = self._keys.key_for(kid)
        if key is None:
            raise _rejected(f"unknown kid {kid!r}")
        if not key.verifies(algorithm):
            raise _rejected(f"key {kid!r} is not a {algorithm} key")
        claims = self._decoded_claims(token, key, algorithm)
        self._check_claims(claims)
        subject = claims["sub"]
        username = claims.get("preferred_username")
        return Principal(
            subject=subject,
            username=username if isinstance(username, str) and username else subject,
            roles=roles_from_claims(claims, self._settings.client_id),
        )

    def _bearer_token(self, header: str | None) -> str:
        if not header or not header.strip():
            log.debug("request carried no Authorization header")
            raise AuthenticationError("authentication required", token_presented=False)
        parts = header.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise _rejected("Authorization header is not 'Bearer <token>'")
        token = parts[1]
        if len(token.encode("utf-8")) > self._settings.max_token_bytes:
            raise _rejected("token longer than max_token_bytes")
        return token

    def _checked_header(self, token: str) -> tuple[str, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _rejected(f"malformed token: {exc}") from None
        algorithm, kid, media_type = header.get("alg"), header.get("kid"), header.get("typ")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise _rejected(f"algorithm {algorithm!r} is not allowed")
        if not isinstance(kid, str) or not kid:
            raise _rejected("token header has no kid")
        if media_type is not None and str(media_type).lower() not in ACCEPTED_HEADER_TYPES:
            raise _rejected(f"token header typ {media_type!r} is not an access token type")
        return algorithm, kid

    def _decoded_claims(self, token: str, key: PublishedKey, algorithm: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key.public_key,
                algorithms=[algorithm],
                issuer=self._settings.issuer,
                leeway=self._settings.leeway_seconds,
                options={"require": ["exp", "iss", "sub"], "verify_aud": False},
            )
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise _rejected(f"{type(exc).__name__}: {exc}") from None

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        settings = self._settings
        # PyJWT checks `iss` too, but 2.10.0 matched it as a substring (CVE-2024-53861).
        if claims.get("iss") != settings.issuer:
            raise _rejected(f"issuer {claims.get('iss')!r} is not {settings.issuer!r}")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if claims.get("azp") != settings.client_id and settings.client_id not in audiences:
            raise _rejected(f"token is for azp={claims.get('azp')!r} aud={audience!r}")
        token_type = claims.get("typ")
        if token_type is not None and str(token_type).lower() != "bearer":
            raise _rejected(f"token typ {token_type!r} is not Bearer")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _rejected("token has no subject")
