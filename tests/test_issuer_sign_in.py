"""The local issuer's browser sign-in, over HTTP as a browser and the console drive it: the login
form, the authorization code with PKCE (S256), single-use codes, registered redirect URIs, the
refresh grant, CORS for the console's origin, and tokens the API accepts."""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from common.config import AuthSettings
from ingest.auth import TokenVerifier
from ops.issuer import LocalIssuer, running
from ops.issuer_flows import CONSOLE_CLIENT_ID

CONSOLE_ORIGIN = "http://127.0.0.1:41234"
REDIRECT_URI = f"{CONSOLE_ORIGIN}/console/callback.html"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


class _FormFields(html.parser.HTMLParser):
    """The named inputs of the login page, as a browser would submit them."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "input" and named.get("name"):
            self.fields[str(named["name"])] = named.get("value") or ""


def call(
    url: str, form: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if form is None else urlencode(form).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with _opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def challenge_of(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[LocalIssuer]:
    with running(tmp_path) as served:
        yield served


def auth_query(verifier: str, **overrides: str) -> dict[str, str]:
    query = {
        "response_type": "code",
        "client_id": CONSOLE_CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "state": "state-123",
        "scope": "openid profile",
        "code_challenge": challenge_of(verifier),
        "code_challenge_method": "S256",
    }
    return {**query, **overrides}


def auth_url(issuer: LocalIssuer) -> str:
    return f"{issuer.base_url}{issuer.authorization_path}"


def token_url(issuer: LocalIssuer) -> str:
    return f"{issuer.base_url}{issuer.token_path}"


def sign_in(issuer: LocalIssuer, verifier: str, password: str = "password") -> tuple[int, str]:
    """GET the login form, post it back with the credentials; (status, Location)."""
    status, _, page = call(f"{auth_url(issuer)}?{urlencode(auth_query(verifier))}")
    assert status == 200, page
    parser = _FormFields()
    parser.feed(page.decode())
    fields = {**parser.fields, "username": "user", "password": password}
    status, headers, _ = call(auth_url(issuer), fields)
    return status, headers.get("Location", "")


def code_for(issuer: LocalIssuer, verifier: str) -> str:
    status, location = sign_in(issuer, verifier)
    assert status == 302
    answer = parse_qs(urlsplit(location).query)
    assert location.startswith(REDIRECT_URI + "?")
    assert answer["state"] == ["state-123"]
    assert answer["iss"] == [issuer.issuer]
    return answer["code"][0]


def redeem(issuer: LocalIssuer, code: str, verifier: str, **overrides: str):
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "client_id": CONSOLE_CLIENT_ID,
        "code_verifier": verifier,
        **overrides,
    }
    status, headers, body = call(token_url(issuer), form, {"Origin": CONSOLE_ORIGIN})
    return status, headers, json.loads(body)


def verifier_of(issuer: LocalIssuer) -> TokenVerifier:
    return TokenVerifier(AuthSettings(keycloak_url=issuer.base_url, realm=issuer.realm))


def test_login_form_code_and_verifier_give_tokens_the_api_accepts(issuer: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    status, headers, tokens = redeem(issuer, code_for(issuer, verifier), verifier)
    assert status == 200, tokens
    assert headers["Access-Control-Allow-Origin"] == CONSOLE_ORIGIN
    assert tokens["token_type"] == "Bearer" and tokens["refresh_token"]
    principal = verifier_of(issuer).verify(f"Bearer {tokens['access_token']}")
    assert (principal.username, principal.roles) == ("user", frozenset({"user"}))


def test_wrong_password_shows_the_form_again_and_gives_no_code(issuer: LocalIssuer) -> None:
    status, location = sign_in(issuer, secrets.token_urlsafe(48), password="wrong")
    assert (status, location) == (200, "")


def test_a_verifier_that_does_not_match_the_challenge_is_refused(issuer: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    code = code_for(issuer, verifier)
    status, _, body = redeem(issuer, code, secrets.token_urlsafe(48))
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "PKCE" in body["error_description"]
    status, _, body = redeem(issuer, code, verifier)
    assert (status, body["error"]) == (400, "invalid_grant"), "a code is spent by any attempt"


def test_a_code_is_good_once_and_its_reuse_revokes_the_refresh_token(issuer: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    code = code_for(issuer, verifier)
    status, _, tokens = redeem(issuer, code, verifier)
    assert status == 200
    status, _, body = redeem(issuer, code, verifier)
    assert (status, body["error_description"]) == (400, "code already used")
    refreshed = call(
        token_url(issuer),
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": CONSOLE_CLIENT_ID,
        },
    )
    assert refreshed[0] == 400


def test_a_redirect_uri_other_than_the_one_asked_with_is_refused(issuer: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    code = code_for(issuer, verifier)
    other = f"{CONSOLE_ORIGIN}/console/other.html"
    status, _, body = redeem(issuer, code, verifier, redirect_uri=other)
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "http://evil.example/console/callback.html",
        "http://127.0.0.1:41234/elsewhere/callback.html",
        "https://127.0.0.1:41234/console/callback.html",
    ],
)
def test_an_unregistered_redirect_uri_gets_an_error_page_and_no_redirect(
    issuer: LocalIssuer, redirect_uri: str
) -> None:
    query = auth_query(secrets.token_urlsafe(48), redirect_uri=redirect_uri)
    status, headers, page = call(f"{auth_url(issuer)}?{urlencode(query)}")
    assert status == 400 and "Location" not in headers
    assert b"redirect_uri is not registered" in page


def test_a_request_without_s256_pkce_is_sent_back_with_an_error(issuer: LocalIssuer) -> None:
    query = auth_query("unused", code_challenge_method="plain")
    status, headers, _ = call(f"{auth_url(issuer)}?{urlencode(query)}")
    answer = parse_qs(urlsplit(headers["Location"]).query)
    assert status == 302 and answer["error"] == ["invalid_request"]
    assert answer["state"] == ["state-123"]


def test_refresh_gives_new_tokens_and_spends_the_old_refresh_token(issuer: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    _, _, tokens = redeem(issuer, code_for(issuer, verifier), verifier)
    form = {
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
        "client_id": CONSOLE_CLIENT_ID,
    }
    status, headers, body = call(token_url(issuer), form, {"Origin": CONSOLE_ORIGIN})
    fresh = json.loads(body)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == CONSOLE_ORIGIN
    assert fresh["refresh_token"] != tokens["refresh_token"]
    assert verifier_of(issuer).verify(f"Bearer {fresh['access_token']}").username == "user"
    assert issuer.flows.refresh_grants == 1
    status, _, body = call(token_url(issuer), form)
    assert (status, json.loads(body)["error"]) == (400, "invalid_grant")


def test_discovery_names_the_endpoints_and_answers_only_registered_origins(
    issuer: LocalIssuer,
) -> None:
    url = f"{issuer.base_url}{issuer.discovery_path}"
    status, headers, body = call(url, headers={"Origin": CONSOLE_ORIGIN})
    document = json.loads(body)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == CONSOLE_ORIGIN
    assert document["authorization_endpoint"] == auth_url(issuer)
    assert document["token_endpoint"] == token_url(issuer)
    assert document["code_challenge_methods_supported"] == ["S256"]
    _, headers, _ = call(url, headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers
