"""The console's files as the API serves them: a strict Content-Security-Policy, the sign-in
configuration from the API's own settings, and nothing else under `/console`."""

from __future__ import annotations

from typing import Any

import falcon.testing

from common.config import Settings


def test_console_page_has_a_strict_policy_naming_only_the_issuer_and_s3(
    app: Any, settings: Settings
) -> None:
    response = falcon.testing.TestClient(app).simulate_get("/console/")
    policy = response.headers["Content-Security-Policy"]
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == f"'self' {settings.auth.keycloak_url}"
    storage = settings.storage
    assert directives["img-src"] == f"'self' blob: http://{storage.endpoint}"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy
    assert "<script>" not in response.text and "style=" not in response.text


def test_console_config_names_the_issuer_and_the_console_client(
    app: Any, settings: Settings
) -> None:
    response = falcon.testing.TestClient(app).simulate_get("/console/config.json")
    assert response.json == {
        "issuer": settings.auth.issuer,
        "client_id": "pixelmill-console",
        "scope": "openid profile",
    }


def test_console_without_slash_redirects_and_unknown_files_are_404_without_a_token(
    app: Any,
) -> None:
    client = falcon.testing.TestClient(app)
    moved = client.simulate_get("/console")
    assert (moved.status_code, moved.headers["Location"]) == (301, "/console/")
    missing = client.simulate_get("/console/secrets.py")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"
    assert client.simulate_get("/console/../ingest/app.py").status_code == 404
    assert client.simulate_post("/console/").status_code == 405


def test_api_answers_keep_their_own_policy(app: Any) -> None:
    response = falcon.testing.TestClient(app).simulate_get("/health")
    assert (
        response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    )
