"""The security rules of the API, proved through the app and real services: the role matrix of
every route, the per-user upload rate limit, presigned URLs bound to one object and expiring,
secrets read from files and never written to logs, security headers and CORS, and the token rules
that only show at the HTTP level (key rotation, refresh limit, clock skew, other realms)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import falcon
import falcon.inspect
import falcon.testing
import pytest
import redis

from common.config import ConfigError, Settings
from common.errors import DependencyUnavailable, TooManyRequests
from common.logs import configure_logging
from common.storage import ObjectStore
from ingest.rate_limit import UploadRateLimiter
from ops.issuer import LocalIssuer, running
from tests.support import (
    ROOT,
    S3_SECRET_KEY,
    ApiClient,
    StackProbe,
    free_port,
    jpeg,
    multipart,
    served_api,
    wait_for,
)

ROLES = ("none", "no_roles", "user", "admin", "client_user")
ORIGIN = "https://app.example"
CLOSED = "127.0.0.1:9"  # the discard port: nothing listens there

AppWith = Callable[..., falcon.App]


# --- helpers ---------------------------------------------------------------------------------


def token_for(issuer: LocalIssuer, role: str, sub: str) -> str | None:
    """A token for one column of the role matrix; `none` sends no token at all."""
    if role == "none":
        return None
    if role == "client_user":
        return issuer.mint_token(sub, (), client_roles=("user",))
    return issuer.mint_token(sub, {"no_roles": (), "user": ("user",), "admin": ("admin",)}[role])


def new_sub() -> str:
    return f"user-{uuid.uuid4()}"


def user_client(app: falcon.App, issuer: LocalIssuer, sub: str | None = None) -> ApiClient:
    return ApiClient(app, issuer.mint_token(sub or new_sub(), ("user",)))


def bulk_body(count: int, seed: int = 0) -> tuple[bytes, str]:
    return multipart(
        [("image", f"{n}.jpg", jpeg(64, 48, seed=seed + n), "image/jpeg") for n in range(count)]
    )


def served_routes(app: falcon.App) -> list[tuple[str, str]]:
    """(method, URI template) of every responder the app really has, Falcon's defaults aside."""
    return sorted(
        (method.method, route.path)
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal
    )


def fetch(url: str) -> tuple[int, bytes]:
    """GET `url` over real HTTP; the status and body, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def completed_document(client: ApiClient, image_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        document: dict[str, Any] = client.get(f"/api/v1/images/{image_id}").json
        return document if document["status"] == "completed" else None

    result: dict[str, Any] = wait_for(done, timeout=60)
    return result


def upload_and_complete(client: ApiClient, seed: int) -> dict[str, Any]:
    created = client.upload(jpeg(320, 200, seed=seed))
    assert created.status_code == 201, created.text
    return completed_document(client, created.json["id"])


def signature_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]


@pytest.fixture
def app_with(env: dict[str, str], settings: Settings) -> Iterator[AppWith]:
    """Build an API whose environment differs from the session's by `overrides`."""
    from ingest.app import Dependencies, create_app

    built: list[Dependencies] = []

    def build(**overrides: str) -> falcon.App:
        custom = Settings.from_env({**env, **overrides})
        deps = Dependencies.connect(custom)
        built.append(deps)
        return create_app(custom, deps)

    yield build
    for deps in built:
        deps.close()


@pytest.fixture
def own_issuer(tmp_path: Path) -> Iterator[LocalIssuer]:
    """An issuer of this test alone, so rotating its key disturbs no other test."""
    with running(tmp_path / "own-issuer") as served:
        yield served


# --- 1. role matrix --------------------------------------------------------------------------


def protected(user: int, admin: int, client_user: int) -> dict[str, int]:
    return {"none": 401, "no_roles": 403, "user": user, "admin": admin, "client_user": client_user}


PUBLIC = dict.fromkeys(ROLES, 200)
ITEM = "/api/v1/images/{image_id}"
BATCH = "/api/v1/batches/{batch_id}"
# The image of `{image_id}` routes belongs to the `user` column's subject.
ROLE_MATRIX: dict[tuple[str, str], dict[str, int]] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/ready"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("POST", "/api/v1/upload"): protected(user=201, admin=403, client_user=201),
    ("POST", "/api/v1/uploads"): protected(user=207, admin=403, client_user=207),
    ("GET", "/api/v1/images"): protected(user=200, admin=200, client_user=200),
    ("GET", ITEM): protected(user=200, admin=200, client_user=404),
    ("DELETE", ITEM): protected(user=403, admin=204, client_user=403),
    # Not processed in this test: no image has its rendition yet, whoever asks.
    ("GET", f"{ITEM}/renditions/{{name}}"): protected(user=404, admin=404, client_user=404),
    ("POST", "/api/v1/batches"): protected(user=201, admin=403, client_user=201),
    ("GET", "/api/v1/batches"): protected(user=200, admin=200, client_user=200),
    ("GET", BATCH): protected(user=200, admin=200, client_user=404),
    ("GET", f"{BATCH}/images"): protected(user=200, admin=200, client_user=404),
    ("GET", f"{BATCH}/archive"): protected(user=200, admin=200, client_user=404),
    ("POST", f"{BATCH}/close"): protected(user=200, admin=200, client_user=404),
    ("POST", f"{BATCH}/retry"): protected(user=202, admin=202, client_user=404),
    ("POST", f"{BATCH}/cancel"): protected(user=202, admin=202, client_user=404),
}


def matrix_request(
    app: falcon.App, owner: ApiClient, token: str | None, method: str, template: str
) -> falcon.testing.Result:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: bytes | None = None
    path = template
    if "{image_id}" in template:
        created = owner.upload(jpeg(64, 48, seed=7))
        assert created.status_code == 201, created.text
        path = template.replace("{image_id}", created.json["id"])
    if "{batch_id}" in template:
        created = owner.client.simulate_post(
            "/api/v1/batches", json={"name": "matrix"}, headers=owner.headers()
        )
        assert created.status_code == 201, created.text
        path = template.replace("{batch_id}", created.json["id"])
    path = path.replace("{name}", "default")
    if template == "/api/v1/upload":
        body, headers["Content-Type"] = multipart([("image", "a.jpg", jpeg(64, 48), "image/jpeg")])
    elif template == "/api/v1/uploads":
        body, headers["Content-Type"] = bulk_body(2)
    elif template == "/api/v1/batches" and method == "POST":
        body, headers["Content-Type"] = b'{"name": "matrix"}', "application/json"
    return falcon.testing.TestClient(app).simulate_request(method, path, headers=headers, body=body)


def test_every_route_answers_each_role_as_the_matrix_says(app, issuer: LocalIssuer) -> None:
    assert served_routes(app) == sorted(ROLE_MATRIX), "every route needs a role-matrix entry"
    tokens = {role: token_for(issuer, role, new_sub()) for role in ROLES}
    owner = ApiClient(app, tokens["user"])

    actual: dict[tuple[str, str], dict[str, int]] = {}
    for method, template in served_routes(app):
        row = actual.setdefault((method, template), {})
        for role in ROLES:
            response = matrix_request(app, owner, tokens[role], method, template)
            row[role] = response.status_code
            if response.status_code == 401:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            if response.status_code == 403:
                assert response.json["error"]["code"] == "insufficient_scope"

    assert actual == ROLE_MATRIX


def test_admin_delete_is_final_for_owner_and_admin(app, issuer: LocalIssuer) -> None:
    owner = user_client(app, issuer)
    admin = ApiClient(app, issuer.mint_token(new_sub(), ("admin",)))
    image_id = owner.upload(jpeg(64, 48)).json["id"]

    assert admin.delete(f"/api/v1/images/{image_id}").status_code == 204
    assert owner.get(f"/api/v1/images/{image_id}").status_code == 404
    assert admin.get(f"/api/v1/images/{image_id}").status_code == 404
    assert owner.get("/api/v1/images", ids=image_id).json["items"] == []


# --- 2. rate limit ---------------------------------------------------------------------------


def test_fourth_upload_in_the_window_is_429_and_other_users_are_unaffected(
    app_with: AppWith, issuer: LocalIssuer, probe: StackProbe
) -> None:
    app = app_with(UPLOADS_PER_MINUTE="3")
    alice_sub = new_sub()
    alice, bob = user_client(app, issuer, alice_sub), user_client(app, issuer)
    for seed in range(3):
        assert alice.upload(jpeg(64, 48, seed=seed)).status_code == 201
    originals = probe.originals()

    refused = alice.upload(jpeg(64, 48, seed=3))

    assert refused.status_code == 429, refused.text
    # Three images a minute: the next one fits 20 s after the first.
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert refused.json["error"]["code"] == "too_many_requests"
    assert len(probe.rows_for(alice_sub)) == 3
    assert probe.originals() == originals
    assert bob.upload(jpeg(64, 48, seed=4)).status_code == 201


def test_bulk_uploads_are_charged_per_image(
    app_with: AppWith, issuer: LocalIssuer, probe: StackProbe
) -> None:
    app = app_with(UPLOADS_PER_MINUTE="3")
    carol_sub, dave_sub = new_sub(), new_sub()
    carol, dave = user_client(app, issuer, carol_sub), user_client(app, issuer, dave_sub)

    three = carol.post_raw("/api/v1/uploads", *bulk_body(3))
    assert three.status_code == 207 and three.json["accepted"] == 3, three.text
    assert carol.upload(jpeg(64, 48, seed=9)).status_code == 429

    originals = probe.originals()
    four = dave.post_raw("/api/v1/uploads", *bulk_body(4, seed=20))
    assert four.status_code == 429, four.text
    assert four.headers["Retry-After"].isdigit()
    assert "smaller requests" in four.json["error"]["message"]
    assert probe.rows_for(dave_sub) == []
    assert probe.originals() == originals
    assert len(probe.rows_for(carol_sub)) == 3
    # The refused request took nothing from dave's allowance.
    assert dave.post_raw("/api/v1/uploads", *bulk_body(3, seed=30)).json["accepted"] == 3


def test_rate_limit_slides_instead_of_resetting_at_a_window_edge(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    limiter = UploadRateLimiter(client, f"pmtest:{uuid.uuid4().hex}:", per_minute=120)
    started = time.monotonic()
    limiter.charge("erin", 120)  # the whole minute's allowance at once

    with pytest.raises(TooManyRequests) as refused:
        limiter.charge("erin")
    assert refused.value.retry_after == 1  # one image every 0.5 s comes back
    limiter.charge("frank", 5)  # other users are unaffected
    for _ in range(10):
        limiter.ensure_room("grace")  # checks, takes nothing
    limiter.charge("grace", 120)

    time.sleep(0.6)
    came_back = 0
    for _ in range(120):
        try:
            limiter.charge("erin")
        except TooManyRequests:
            break
        came_back += 1
    # One image per 0.5 s since the burst: at least one after 0.6 s, and never more than the
    # time that really passed allows (a fixed window would give a whole minute's worth).
    assert 1 <= came_back <= (time.monotonic() - started) / 0.5
    client.close()


# --- 3. presigned URLs -----------------------------------------------------------------------


def test_presigned_url_opens_its_own_result_and_no_other(
    app, issuer: LocalIssuer, worker, probe: StackProbe
) -> None:
    owner = user_client(app, issuer)
    first, second = upload_and_complete(owner, 1), upload_and_complete(owner, 2)
    url = first["download_url"]

    status, body = fetch(url)
    assert status == 200
    assert body == probe.result_bytes(first["result"]["key"])
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["900"]
    swapped = url.replace(first["result"]["key"], second["result"]["key"])
    assert swapped != url
    assert fetch(swapped)[0] == 403


def test_presigned_url_stops_working_after_presign_seconds(
    app_with: AppWith, issuer: LocalIssuer, worker
) -> None:
    owner = user_client(app_with(PRESIGN_SECONDS="1"), issuer)
    url = upload_and_complete(owner, 3)["download_url"]
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["1"]

    time.sleep(2)

    assert fetch(url)[0] == 403


# --- 4. secrets from files -------------------------------------------------------------------


def environ_with_secret_file(env: dict[str, str], secret_file: Path) -> dict[str, str]:
    environ = {name: value for name, value in env.items() if name != "MINIO_SECRET_KEY"}
    return {**environ, "MINIO_SECRET_KEY_FILE": str(secret_file)}


def test_s3_secret_key_is_read_from_its_file_and_works(env, settings, tmp_path: Path) -> None:
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text(f"{S3_SECRET_KEY}\n")
    from_file = Settings.from_env(environ_with_secret_file(env, secret_file))
    assert from_file.storage.secret_key == S3_SECRET_KEY

    store = ObjectStore(from_file.storage)
    key = f"originals/{uuid.uuid4()}"
    store.put_original(key, b"stored with a file secret", "application/octet-stream")
    try:
        assert store.get_original(key) == b"stored with a file secret"
    finally:
        store.delete_original(key)


def test_secret_file_wins_over_the_plain_variable(env, settings, tmp_path: Path) -> None:
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text("not-the-secret")
    environ = {**env, "MINIO_SECRET_KEY_FILE": str(secret_file)}
    store = ObjectStore(Settings.from_env(environ).storage)

    with pytest.raises(DependencyUnavailable):
        store.check()


def test_missing_secret_file_stops_start_up_naming_the_variable(env, tmp_path: Path) -> None:
    environ = environ_with_secret_file(env, tmp_path / "absent")
    with pytest.raises(ConfigError, match="MINIO_SECRET_KEY_FILE"):
        Settings.from_env(environ)

    started = subprocess.run(
        [sys.executable, "-m", "ingest.serve", "--bind", f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if k != "MINIO_SECRET_KEY"}, **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2
    assert "MINIO_SECRET_KEY_FILE" in started.stderr


# --- 5. no secrets in logs -------------------------------------------------------------------


UNMASKED_CREDENTIAL = re.compile(r"X-Amz-(Signature|Credential)=(?!\[redacted\])|Bearer ey")


def assert_no_secrets(text: str, secrets: list[str]) -> None:
    assert text, "nothing was logged: the test would prove nothing"
    for secret in secrets:
        assert secret not in text, f"a secret reached the log: {secret[:12]}..."
    assert not UNMASKED_CREDENTIAL.search(text)


def rejected_tokens(issuer: LocalIssuer, tmp_path: Path) -> list[str]:
    valid = issuer.mint_token(new_sub())
    stranger = LocalIssuer(tmp_path / "stranger", issuer.base_url, issuer.realm, issuer.client_id)
    return [
        issuer.mint_token(new_sub(), expires_in=-600),
        valid[:-4] + ("AAAA" if not valid.endswith("AAAA") else "BBBB"),
        stranger.sign(issuer.access_claims(new_sub()), headers={"kid": issuer.kid}),
    ]


def test_tokens_signatures_and_s3_secret_never_reach_the_log(
    app, app_with: AppWith, issuer: LocalIssuer, worker, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    token = issuer.mint_token(new_sub(), ("user",))
    owner = ApiClient(app, token)
    url = upload_and_complete(owner, 4)["download_url"]
    bad_tokens = rejected_tokens(issuer, tmp_path)
    for bad in bad_tokens:
        assert ApiClient(app, bad).get("/api/v1/images").status_code == 401
    wrong_secret = f"wrong-{uuid.uuid4().hex}"
    for broken in ({"MINIO_SECRET_KEY": wrong_secret}, {"MINIO_ENDPOINT": CLOSED}):
        failed = ApiClient(app_with(**broken), token).upload(jpeg(64, 48))
        assert failed.status_code >= 500, failed.text

    assert "bearer token rejected" in caplog.text
    assert "object storage" in caplog.text
    secrets = [token, *bad_tokens, S3_SECRET_KEY, wrong_secret, signature_of(url)]
    secrets += [t.rsplit(".", 1)[1] for t in (token, *bad_tokens)]
    assert_no_secrets(caplog.text, secrets)


@pytest.fixture
def served_with_access_log(env, settings, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Real gunicorn with its access log on, writing everything it logs to one file."""
    log_path = tmp_path / "api.log"
    options = ("--workers", "1", "--threads", "4", "--access-log")
    with served_api(env, log_path, *options) as (base, _):
        yield base, log_path


def answers(url: str) -> bool:
    try:
        return fetch(url)[0] == 200
    except OSError:
        return False


def http_call(url: str, token: str | None, body: bytes | None = None, content_type: str = ""):
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_gunicorn_logs_hold_no_token_or_signature(
    served_with_access_log: tuple[str, Path], issuer: LocalIssuer, worker, tmp_path: Path
) -> None:
    base, log_path = served_with_access_log
    token = issuer.mint_token(new_sub(), ("user",))
    body, content_type = multipart([("image", "a.jpg", jpeg(320, 200), "image/jpeg")])
    status, created = http_call(f"{base}/api/v1/upload", token, body, content_type)
    assert status == 201, created
    image_id = json.loads(created)["id"]
    status, read = http_call(f"{base}/api/v1/images/{image_id}?wait=30", token)
    document = json.loads(read)
    assert document["status"] == "completed", document
    bad_tokens = rejected_tokens(issuer, tmp_path)
    for bad in bad_tokens:
        assert http_call(f"{base}/api/v1/images", bad)[0] == 401

    logged = log_path.read_text(errors="replace")
    assert re.search(r'"POST /api/v1/upload HTTP/1\.1" 201', logged), logged[-2000:]
    secrets = [token, *bad_tokens, S3_SECRET_KEY, signature_of(document["download_url"])]
    assert_no_secrets(logged, secrets)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("pika", "urllib3")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_configured_logging_masks_credentials_any_library_logs(
    log_format: str, issuer: LocalIssuer, restored_logging, capsys
) -> None:
    configure_logging(log_format)
    token = issuer.mint_token(new_sub())
    url = "http://s3/b/k?X-Amz-Credential=AKIA%2F20250101&X-Amz-Signature=0123abcdef&X-Amz-Date=1"
    log = logging.getLogger("some.library")
    log.warning("sending Authorization: Bearer %s", token)
    log.warning("fetched %s", url)
    try:
        raise ValueError(f"bad token {token}")
    except ValueError:
        log.exception("request failed")

    written = capsys.readouterr().err
    assert "sending Authorization: Bearer [redacted]" in written
    assert "X-Amz-Date=1" in written and "request failed" in written
    assert_no_secrets(written, [token, token.rsplit(".", 1)[1], "0123abcdef", "AKIA"])


# --- 6. security headers and CORS ------------------------------------------------------------

EXPECTED_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def assert_security_headers(response: falcon.testing.Result, what: str) -> None:
    for name, value in EXPECTED_HEADERS.items():
        assert response.headers.get(name) == value, f"{what}: {name}"
    assert "frame-ancestors 'none'" in response.headers.get("Content-Security-Policy", ""), what


def test_security_headers_on_every_route_and_on_errors(app, issuer: LocalIssuer) -> None:
    client = falcon.testing.TestClient(app)
    token = issuer.mint_token(new_sub(), ("user",))
    authorized = {"Authorization": f"Bearer {token}"}
    seen: set[int] = set()
    for method, template in served_routes(app):
        path = template.replace("{image_id}", str(uuid.uuid4()))
        for headers in ({}, authorized):
            response = client.simulate_request(method, path, headers=headers)
            seen.add(response.status_code)
            assert_security_headers(response, f"{method} {template} -> {response.status_code}")

    oversize = b"\0" * (11 * 1024 * 1024)
    content_type = "multipart/form-data; boundary=b"
    errors = {
        404: client.simulate_get("/no/such/route"),
        401: client.simulate_get("/api/v1/images", headers={"Authorization": "Bearer x"}),
        413: client.simulate_post(
            "/api/v1/upload", body=oversize, headers={**authorized, "Content-Type": content_type}
        ),
        400: client.simulate_get("/api/v1/images/not-a-uuid", headers=authorized),
        405: client.simulate_put("/health"),
    }
    for status, response in errors.items():
        assert response.status_code == status, response.text
        assert_security_headers(response, f"error {status}")
    assert {200, 401, 404, 415} <= seen


def test_cors_is_off_by_default(app, issuer: LocalIssuer) -> None:
    client = falcon.testing.TestClient(app)
    token = issuer.mint_token(new_sub(), ("user",))
    simple = client.simulate_get(
        "/api/v1/images", headers={"Origin": ORIGIN, "Authorization": f"Bearer {token}"}
    )
    preflight = client.simulate_options("/api/v1/upload", headers=preflight_headers(ORIGIN))

    assert simple.status_code == 200
    for response in (simple, preflight):
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Methods" not in response.headers


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


def test_cors_allows_only_the_configured_origin(app_with: AppWith, issuer: LocalIssuer) -> None:
    client = falcon.testing.TestClient(app_with(CORS_ORIGINS=ORIGIN))
    authorized = {"Authorization": f"Bearer {issuer.mint_token(new_sub(), ('user',))}"}

    allowed = client.simulate_get("/api/v1/images", headers={**authorized, "Origin": ORIGIN})
    other = client.simulate_get(
        "/api/v1/images", headers={**authorized, "Origin": "https://evil.example"}
    )
    preflight = client.simulate_options("/api/v1/upload", headers=preflight_headers(ORIGIN))
    foreign_preflight = client.simulate_options(
        "/api/v1/upload", headers=preflight_headers("https://evil.example")
    )

    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert other.status_code == 200
    assert "Access-Control-Allow-Origin" not in other.headers
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Origin" not in foreign_preflight.headers
    assert "Access-Control-Allow-Methods" not in foreign_preflight.headers
    assert_security_headers(preflight, "preflight")


# --- 7. tokens at the HTTP level -------------------------------------------------------------


def listing_status(app: falcon.App, token: str) -> int:
    return ApiClient(app, token).get("/api/v1/images").status_code


def test_rotated_issuer_key_is_accepted_without_restart(
    app_with: AppWith, own_issuer: LocalIssuer
) -> None:
    app = app_with(KEYCLOAK_URL=own_issuer.base_url, JWKS_REFRESH_SECONDS="1")
    old_token = own_issuer.mint_token(new_sub())
    assert listing_status(app, old_token) == 200
    own_issuer.rotate_key()
    new_token = own_issuer.mint_token(new_sub())

    time.sleep(1.1)  # let the refresh interval pass, as a key rotation's grace period would

    assert listing_status(app, new_token) == 200
    assert own_issuer.jwks_requests == 2
    assert listing_status(app, old_token) == 401


def test_unknown_kids_do_not_make_the_api_hammer_the_issuer(
    app_with: AppWith, own_issuer: LocalIssuer, tmp_path: Path
) -> None:
    app = app_with(KEYCLOAK_URL=own_issuer.base_url)
    stranger = LocalIssuer(
        tmp_path / "stranger", own_issuer.base_url, own_issuer.realm, own_issuer.client_id
    )
    claims = own_issuer.access_claims(new_sub())

    for _ in range(30):
        forged = stranger.sign(claims, headers={"kid": uuid.uuid4().hex})
        assert listing_status(app, forged) == 401

    assert listing_status(app, own_issuer.mint_token(new_sub())) == 200
    assert (own_issuer.discovery_requests, own_issuer.jwks_requests) == (1, 1)


def test_clock_skew_within_leeway_is_accepted_and_beyond_is_rejected(
    app, issuer: LocalIssuer
) -> None:
    now = int(time.time())
    within = [
        issuer.mint_token(new_sub(), iat=now + 10, nbf=now + 10),
        issuer.mint_token(new_sub(), expires_in=-10),
    ]
    beyond = [
        issuer.mint_token(new_sub(), iat=now + 120, nbf=now + 120),
        issuer.mint_token(new_sub(), expires_in=-120),
    ]
    assert [listing_status(app, token) for token in within] == [200, 200]
    assert [listing_status(app, token) for token in beyond] == [401, 401]


def test_token_of_another_realm_is_rejected(app, issuer: LocalIssuer) -> None:
    other_realm = f"{issuer.base_url}/realms/OtherRealm"
    response = ApiClient(app, issuer.mint_token(new_sub(), iss=other_realm)).get("/api/v1/images")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
