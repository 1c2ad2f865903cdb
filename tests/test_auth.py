"""Bearer-token verification against a real local OIDC issuer served over HTTP on a free port."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from common.config import AuthSettings
from common.errors import DependencyUnavailable
from ingest.auth import (
    RETRY_AFTER_FAILURE_SECONDS,
    AuthenticationError,
    AuthorizationError,
    Principal,
    TokenVerifier,
    require_role,
)
from ops.issuer import LocalIssuer, rfc7638_thumbprint, running, serve, stop, token_command
from tests.support import free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
REFRESH_SECONDS = 60
LEEWAY_SECONDS = 30


class ManualClock:
    """A monotonic clock the test moves by hand, so refresh intervals pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings_for(issuer: LocalIssuer, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "keycloak_url": issuer.base_url,
        "realm": issuer.realm,
        "client_id": issuer.client_id,
        "leeway_seconds": LEEWAY_SECONDS,
        "jwks_refresh_seconds": REFRESH_SECONDS,
        **overrides,
    }
    return AuthSettings(**values)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(signature)}"


def hs256_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = unsigned_token(header, claims).rsplit(".", 1)[0]
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def assert_rejected(verifier: TokenVerifier, header: str | None) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(header)
    assert caught.value.status == 401
    return caught.value


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[LocalIssuer]:
    with running(tmp_path / "state") as served:
        yield served


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def verifier(issuer: LocalIssuer, clock: ManualClock) -> TokenVerifier:
    return TokenVerifier(settings_for(issuer), clock=clock)


# --- accepted tokens -------------------------------------------------------------------------


def test_valid_token_yields_principal_with_realm_and_client_roles(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.mint_token(
        "subject-1", ["user", "admin"], username="alice", client_roles=["uploader"]
    )

    principal = verifier.verify(bearer(token))

    assert principal == Principal("subject-1", "alice", frozenset({"user", "admin", "uploader"}))
    assert principal.is_admin
    assert principal.has_role("uploader")


def test_plain_user_is_not_admin_and_username_defaults_to_subject(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    principal = verifier.verify(bearer(issuer.mint_token("bob", ["user"], preferred_username=None)))

    assert principal.username == "bob"
    assert not principal.is_admin
    assert principal.roles == frozenset({"user"})


def test_scheme_is_case_insensitive(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    assert verifier.verify(f"bEaReR {issuer.mint_token('u1')}").subject == "u1"


def test_token_for_other_azp_with_client_in_aud_is_accepted(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.mint_token("u1", azp="web-frontend", aud=["account", issuer.client_id])

    assert verifier.verify(bearer(token)).subject == "u1"


def test_clock_skew_within_leeway_is_accepted(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    now = int(time.time())
    issued_ahead = issuer.mint_token("u1", iat=now + 10, nbf=now + 10)
    just_expired = issuer.mint_token("u2", expires_in=-10)

    assert verifier.verify(bearer(issued_ahead)).subject == "u1"
    assert verifier.verify(bearer(just_expired)).subject == "u2"


def test_constructing_the_verifier_contacts_nobody(issuer: LocalIssuer) -> None:
    TokenVerifier(settings_for(issuer))

    assert (issuer.discovery_requests, issuer.jwks_requests) == (0, 0)


# --- rejected requests -----------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_credentials_are_401_without_error_code(
    verifier: TokenVerifier, header: str | None
) -> None:
    error = assert_rejected(verifier, header)

    assert error.www_authenticate == "Bearer"


@pytest.mark.parametrize("header", ["Basic x", "Bearer", "Bearer a b", "Token abc", "Bearer abc"])
def test_malformed_authorization_header_is_invalid_token(
    issuer: LocalIssuer, verifier: TokenVerifier, header: str
) -> None:
    error = assert_rejected(verifier, header)

    assert error.message == "invalid token"
    assert error.www_authenticate == 'Bearer error="invalid_token"'
    assert issuer.jwks_requests == 0


def test_token_signed_by_another_key_under_the_issuers_kid_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    impostor = LocalIssuer(tmp_path / "impostor", issuer.base_url, issuer.realm, issuer.client_id)
    forged = impostor.sign(issuer.access_claims("u1", ["admin"]), headers={"kid": issuer.kid})

    assert_rejected(verifier, bearer(forged))
    assert verifier.verify(bearer(issuer.mint_token("u1"))).subject == "u1"


def test_tampered_payload_is_rejected(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    header, _, signature = issuer.mint_token("u1", ["user"]).split(".")
    elevated = b64url(json.dumps(issuer.access_claims("u1", ["admin"])).encode())

    assert_rejected(verifier, bearer(f"{header}.{elevated}.{signature}"))


def test_expired_token_beyond_leeway_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    assert_rejected(verifier, bearer(issuer.mint_token("u1", expires_in=-(LEEWAY_SECONDS + 30))))


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_token_not_yet_valid_beyond_leeway_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier, claim: str
) -> None:
    claims = issuer.access_claims("u1", expires_in=600)
    claims[claim] = int(time.time()) + LEEWAY_SECONDS + 90

    assert_rejected(verifier, bearer(issuer.sign(claims)))


@pytest.mark.parametrize("missing", ["exp", "sub", "iss"])
def test_token_without_required_claim_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier, missing: str
) -> None:
    claims = issuer.access_claims("u1")
    del claims[missing]

    assert_rejected(verifier, bearer(issuer.sign(claims)))


@pytest.mark.parametrize(
    "wrong_issuer",
    ["https://evil.example/realms/ImageProcessor", "{issuer}/", "{issuer}x", "{base}/realms/Other"],
)
def test_token_with_wrong_issuer_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier, wrong_issuer: str
) -> None:
    iss = wrong_issuer.format(issuer=issuer.issuer, base=issuer.base_url)

    assert_rejected(verifier, bearer(issuer.mint_token("u1", iss=iss)))


def test_token_of_another_realm_sharing_the_key_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    other_realm = LocalIssuer(tmp_path / "state", issuer.base_url, "OtherRealm", issuer.client_id)
    assert other_realm.kid == issuer.kid

    assert_rejected(verifier, bearer(other_realm.mint_token("u1")))


def test_token_for_another_client_is_rejected(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint_token("u1", azp="other-client", aud=["account", "other-client"])

    assert_rejected(verifier, bearer(token))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_unsigned_alg_none_token_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier, alg: str
) -> None:
    token = unsigned_token(
        {"alg": alg, "typ": "JWT", "kid": issuer.kid}, issuer.access_claims("u1")
    )

    assert_rejected(verifier, bearer(token))


def test_hs256_token_keyed_with_the_public_key_pem_is_rejected(
    issuer: LocalIssuer, clock: ManualClock
) -> None:
    # Even a misconfigured allow-list naming HS256 must not let the public key act as a secret.
    lax = TokenVerifier(settings_for(issuer, algorithms=("RS256", "HS256")), clock=clock)
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    token = hs256_token(header, issuer.access_claims("u1", ["admin"]), issuer.public_key_pem())

    assert_rejected(lax, bearer(token))


def test_algorithm_not_in_allow_list_is_rejected(
    issuer: LocalIssuer, clock: ManualClock, tmp_path: Path
) -> None:
    only_es256 = TokenVerifier(settings_for(issuer, algorithms=("ES256",)), clock=clock)

    assert_rejected(only_es256, bearer(issuer.mint_token("u1")))


def test_token_without_kid_is_rejected_without_refreshing_keys(
    issuer: LocalIssuer, verifier: TokenVerifier, clock: ManualClock
) -> None:
    verifier.verify(bearer(issuer.mint_token("u1")))
    clock.advance(REFRESH_SECONDS)
    token = issuer.sign(issuer.access_claims("u1"), headers={"kid": None})

    assert_rejected(verifier, bearer(token))
    assert issuer.jwks_requests == 1


@pytest.mark.parametrize("token_type", ["ID", "Refresh", "Logout"])
def test_token_that_is_not_an_access_token_is_rejected(
    issuer: LocalIssuer, verifier: TokenVerifier, token_type: str
) -> None:
    assert_rejected(verifier, bearer(issuer.mint_token("u1", typ=token_type)))


def test_oversize_token_is_rejected_before_contacting_the_issuer(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.mint_token("u1", padding="x" * 9000)

    assert_rejected(verifier, bearer(token))
    assert issuer.jwks_requests == 0


# --- key cache -------------------------------------------------------------------------------


def test_rotated_key_is_picked_up_without_restarting_once_the_interval_allows(
    issuer: LocalIssuer, verifier: TokenVerifier, clock: ManualClock
) -> None:
    old_token = issuer.mint_token("u1")
    verifier.verify(bearer(old_token))
    new_kid = issuer.rotate_key()
    new_token = issuer.mint_token("u2")
    assert new_kid != jwt_kid(old_token)

    clock.advance(REFRESH_SECONDS)

    assert verifier.verify(bearer(new_token)).subject == "u2"
    assert_rejected(verifier, bearer(old_token))  # the old key is no longer published
    assert issuer.jwks_requests == 2


def test_rotation_keeping_the_old_key_verifies_both(
    issuer: LocalIssuer, verifier: TokenVerifier, clock: ManualClock
) -> None:
    old_token = issuer.mint_token("u1")
    verifier.verify(bearer(old_token))
    issuer.rotate_key(keep_old=True)
    clock.advance(REFRESH_SECONDS)

    assert verifier.verify(bearer(issuer.mint_token("u2"))).subject == "u2"
    assert verifier.verify(bearer(old_token)).subject == "u1"


def test_withdrawn_key_stops_verifying_at_the_scheduled_refresh_though_its_kid_is_known(
    issuer: LocalIssuer, verifier: TokenVerifier, clock: ManualClock
) -> None:
    old_token = issuer.mint_token("u1")
    verifier.verify(bearer(old_token))
    issuer.rotate_key(keep_old=True)
    new_token = issuer.mint_token("u2")
    clock.advance(REFRESH_SECONDS)
    assert verifier.verify(bearer(new_token)).subject == "u2"

    issuer.withdraw_retired_keys()
    clock.advance(REFRESH_SECONDS - 1)
    assert verifier.verify(bearer(old_token)).subject == "u1"  # cached until the set is due
    clock.advance(1)

    assert_rejected(verifier, bearer(old_token))
    assert verifier.verify(bearer(new_token)).subject == "u2"
    assert issuer.jwks_requests == 3


def test_scheduled_refresh_fetches_the_jwks_once_per_interval_however_many_requests(
    issuer: LocalIssuer, verifier: TokenVerifier, clock: ManualClock
) -> None:
    token = bearer(issuer.mint_token("u1"))
    for _ in range(3):
        for _ in range(20):
            verifier.verify(token)
            clock.advance(REFRESH_SECONDS / 40)

    # 60 requests over 1.5 intervals: the first fetch, then one refresh when the set was due.
    assert issuer.jwks_requests == 2
    assert issuer.discovery_requests == 1


def test_failed_scheduled_refresh_keeps_the_keys_and_retries_after_the_short_delay(
    tmp_path: Path, clock: ManualClock
) -> None:
    port = free_port()
    issuer = LocalIssuer(tmp_path / "state", f"http://127.0.0.1:{port}")
    verifier = TokenVerifier(settings_for(issuer), clock=clock)
    token = bearer(issuer.mint_token("u1"))
    server, thread = serve(issuer, port=port)
    try:
        verifier.verify(token)
    finally:
        stop(server, thread)
    clock.advance(REFRESH_SECONDS)
    assert verifier.verify(token).subject == "u1"  # the refresh failed; the key still serves

    issuer.rotate_key()
    server, thread = serve(issuer, port=port)
    try:
        clock.advance(RETRY_AFTER_FAILURE_SECONDS)
        assert_rejected(verifier, token)
        assert issuer.jwks_requests == 2  # the first fetch and this retry
    finally:
        stop(server, thread)


def test_unknown_kids_refresh_the_jwks_at_most_once_per_interval(
    issuer: LocalIssuer, verifier: TokenVerifier, clock: ManualClock, tmp_path: Path
) -> None:
    verifier.verify(bearer(issuer.mint_token("u1")))
    clock.advance(REFRESH_SECONDS)
    before = issuer.jwks_requests
    stranger = LocalIssuer(tmp_path / "stranger", issuer.base_url, issuer.realm, issuer.client_id)
    claims = issuer.access_claims("u1")

    for _ in range(50):
        assert_rejected(verifier, bearer(stranger.sign(claims, headers={"kid": uuid.uuid4().hex})))

    assert issuer.jwks_requests - before == 1
    assert issuer.discovery_requests == 1


def test_concurrent_first_requests_fetch_discovery_and_jwks_once(
    issuer: LocalIssuer, verifier: TokenVerifier
) -> None:
    tokens = [bearer(issuer.mint_token(f"u{n}")) for n in range(16)]
    start_together = threading.Barrier(len(tokens))

    def verify_after_barrier(header: str) -> str:
        start_together.wait()
        return verifier.verify(header).subject

    with ThreadPoolExecutor(max_workers=len(tokens)) as pool:
        subjects = list(pool.map(verify_after_barrier, tokens))

    assert subjects == [f"u{n}" for n in range(16)]
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)


def test_cached_key_keeps_verifying_when_the_issuer_is_down(
    tmp_path: Path, clock: ManualClock
) -> None:
    with running(tmp_path / "state") as issuer:
        verifier = TokenVerifier(settings_for(issuer), clock=clock)
        verifier.verify(bearer(issuer.mint_token("u1")))
        later_token = issuer.mint_token("u2")
        unknown_kid = issuer.sign(issuer.access_claims("u3"), headers={"kid": "not-published"})
    clock.advance(REFRESH_SECONDS)

    assert verifier.verify(bearer(later_token)).subject == "u2"
    assert_rejected(verifier, bearer(unknown_kid))


def test_verifier_made_while_issuer_down_answers_503_then_recovers(
    tmp_path: Path, clock: ManualClock
) -> None:
    port = free_port()
    issuer = LocalIssuer(tmp_path / "state", f"http://127.0.0.1:{port}")
    verifier = TokenVerifier(settings_for(issuer), clock=clock)
    token = issuer.mint_token("u1")

    with pytest.raises(DependencyUnavailable):
        verifier.verify(bearer(token))

    server, thread = serve(issuer, port=port)
    try:
        clock.advance(RETRY_AFTER_FAILURE_SECONDS)
        assert verifier.verify(bearer(token)).subject == "u1"
    finally:
        stop(server, thread)


def test_discovery_naming_another_issuer_is_not_trusted(
    issuer: LocalIssuer, clock: ManualClock
) -> None:
    # Same server reached under another host name: the issuer it advertises does not match.
    settings = settings_for(issuer, keycloak_url=issuer.base_url.replace("127.0.0.1", "localhost"))
    verifier = TokenVerifier(settings, clock=clock)

    with pytest.raises(DependencyUnavailable):
        verifier.verify(bearer(issuer.mint_token("u1")))
    assert issuer.jwks_requests == 0


# --- authorization ---------------------------------------------------------------------------


def test_require_role_raises_403_only_when_the_role_is_missing() -> None:
    user = Principal("s1", "user", frozenset({"user"}))
    admin = Principal("s2", "admin", frozenset({"user", "admin"}))

    require_role(admin, "admin")
    with pytest.raises(AuthorizationError) as caught:
        require_role(user, "admin")
    assert (caught.value.status, caught.value.code) == (403, "insufficient_scope")


# --- local issuer ----------------------------------------------------------------------------


def test_issuer_key_is_private_and_shared_by_instances_on_the_same_state(tmp_path: Path) -> None:
    first = LocalIssuer(tmp_path, "http://127.0.0.1:8180")
    second = LocalIssuer(tmp_path, "http://127.0.0.1:8180")

    assert first.kid == second.kid
    key_file = tmp_path / "issuer" / "signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # The example key and thumbprint of RFC 7638 section 3.1.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    modulus = int.from_bytes(base64.urlsafe_b64decode(n + "=" * (-len(n) % 4)), "big")
    public_key = rsa.RSAPublicNumbers(65537, modulus).public_key()

    assert rfc7638_thumbprint(public_key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_issuer_serves_discovery_and_jwks_and_404_elsewhere(issuer: LocalIssuer) -> None:
    discovery = get_json(f"{issuer.issuer}/.well-known/openid-configuration")
    jwks = get_json(discovery["jwks_uri"])

    assert discovery["issuer"] == issuer.issuer
    assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]
    assert [key["kid"] for key in jwks["keys"]] == [issuer.kid]
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)
    with pytest.raises(urllib.error.HTTPError) as caught:
        get_json(f"{issuer.base_url}/realms/OtherRealm/protocol/openid-connect/certs")
    assert caught.value.code == 404


def test_minted_token_is_shaped_like_keycloaks(issuer: LocalIssuer) -> None:
    token = issuer.mint_token("s1", ["user"], username="alice", client_roles=["uploader"])
    header, claims = (decode_segment(part) for part in token.split(".")[:2])

    assert header == {"alg": "RS256", "typ": "JWT", "kid": issuer.kid}
    assert claims["iss"] == issuer.issuer
    assert (claims["azp"], claims["aud"], claims["typ"]) == (issuer.client_id, "account", "Bearer")
    assert claims["realm_access"] == {"roles": ["user"]}
    assert claims["resource_access"] == {issuer.client_id: {"roles": ["uploader"]}}
    assert claims["exp"] - claims["iat"] == 300


def test_token_command_prints_only_a_token_the_verifier_accepts(
    issuer: LocalIssuer,
    clock: ManualClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KEYCLOAK_URL", issuer.base_url)
    state = str(tmp_path / "state")

    status = token_command(["--user", "admin", "--roles", "admin,user", "--state-dir", state])

    printed = capsys.readouterr().out
    assert status == 0
    assert printed.count("\n") == 1
    principal = TokenVerifier(settings_for(issuer), clock=clock).verify(bearer(printed.strip()))
    assert (principal.username, principal.roles) == ("admin", frozenset({"admin", "user"}))


def test_serve_command_serves_until_sigterm_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    code = "import sys; from ops.issuer import serve_command; sys.exit(serve_command(sys.argv[1:]))"
    args = ["--port", str(port), "--state-dir", str(tmp_path), "--realm", "Dev"]
    environ = {**os.environ, "KEYCLOAK_URL": base_url}
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=environ)
    try:
        discovery = wait_for_json(f"{base_url}/realms/Dev/.well-known/openid-configuration")
        assert discovery["issuer"] == f"{base_url}/realms/Dev"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- helpers ---------------------------------------------------------------------------------


def jwt_kid(token: str) -> str:
    return str(decode_segment(token.split(".")[0])["kid"])


def decode_segment(segment: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return decoded


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_json(url: str, timeout: float = 10.0) -> Any:
    def answer() -> Any:
        try:
            return get_json(url)
        except OSError:
            return None

    return wait_for(answer, timeout, what=f"{url} to answer")
