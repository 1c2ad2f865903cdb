"""The API against the real Keycloak (one server per test session, the `keycloak` fixture): the
README's token request, realm roles, foreign tokens, expiry and refresh, key rotation, and
setup_keycloak.sh. Skipped, with the reason, only where Java or Maven is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from common.config import Settings
from ops import keycloak_server
from ops.__main__ import keycloak_token
from ops.keycloak_server import (
    KEYCLOAK_FILES,
    REALM_FILE,
    KeycloakDistribution,
    KeycloakError,
    KeycloakServer,
    password_grant,
    token_request,
)
from ops.stack import LOCAL_KEYCLOAK_DB_URL, LocalStack, StatePaths
from tests.support import (
    ROOT,
    ApiClient,
    KeycloakAdmin,
    api_for,
    jpeg,
    multipart,
    served_api,
    start_worker,
    stop_worker,
    wait_for,
)

# The first test also waits for the session's Keycloak, whose first start on a busy 2-core
# machine has taken over 3 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REALM = "ImageProcessor"
CLIENT = "api-gateway-client"
needs_jq = pytest.mark.skipif(
    shutil.which("jq") is None, reason="jq is missing (setup_keycloak.sh needs it): make test-tools"
)


@pytest.fixture(scope="module")
def admin(keycloak: KeycloakServer) -> KeycloakAdmin:
    return KeycloakAdmin(keycloak.url)


@pytest.fixture(scope="module")
def kc_env(env: dict[str, str], keycloak: KeycloakServer) -> dict[str, str]:
    """The session's environment pointed at Keycloak; the API takes a withdrawn key out of use
    within a second and allows no clock leeway, so expiry and rotation show at once."""
    return {
        **env,
        "KEYCLOAK_URL": keycloak.url,
        "JWKS_REFRESH_SECONDS": "1",
        "JWT_LEEWAY_SECONDS": "0",
    }


@pytest.fixture(scope="module")
def kc_settings(kc_env: dict[str, str], settings: Settings) -> Settings:
    return Settings.from_env(kc_env)


@pytest.fixture
def api_as(kc_settings: Settings) -> Iterator[Any]:
    """`api_as(token)`: the app built as gunicorn builds it, on Keycloak, with that token."""
    with api_for(kc_settings, None) as api:

        def with_token(token: str) -> ApiClient:
            api.token = token
            return api

        yield with_token


def token_of(keycloak: KeycloakServer, username: str, password: str, realm: str = REALM) -> str:
    return str(password_grant(keycloak.url, realm, CLIENT, username, password)["access_token"])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def readme_token_request() -> str:
    """The token request of the README's Tokens section, as a reader pastes it."""
    readme = (ROOT / "README.md").read_text()
    pattern = r"^ *(TOKEN=\$\(curl -s -X POST http://localhost:8080/.*?\)$)"
    found = re.search(pattern, readme, re.M | re.S)
    assert found, "the README has no token request for Keycloak on localhost:8080"
    return found.group(1)


def test_the_readme_token_request_gets_a_token_that_uploads_an_image_which_completes(
    keycloak: KeycloakServer, kc_env: dict[str, str], private_queue: Settings, tmp_path: Any
) -> None:
    assert keycloak.realm_files == [REALM_FILE]  # what compose imports (test_production_config)
    # Pasted as it stands, only the port is this session's server's.
    command = readme_token_request().replace("http://localhost:8080", keycloak.url)
    token = subprocess.run(
        ["bash", "-c", f'{command}\nprintf %s "$TOKEN"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert token.count(".") == 2, token
    own_env = {
        **kc_env,
        "RABBITMQ_QUEUE": private_queue.queue.queue,
        "REDIS_PREFIX": private_queue.redis_prefix,
    }
    worker = start_worker(own_env, tmp_path / "worker.log")
    try:
        with served_api(own_env, tmp_path / "api.log") as (base, _):
            body, content_type = multipart([("image", "photo.jpg", jpeg(640, 480), "image/jpeg")])
            created = http_json("POST", f"{base}/api/v1/upload", token, body, content_type)
            assert created["status"] == "pending"
            assert created["owner"] == claims(token)["sub"]

            def completed() -> dict[str, Any] | None:
                image = http_json("GET", f"{base}/api/v1/images/{created['id']}", token)
                return image if image["status"] in ("completed", "failed") else None

            assert wait_for(completed, timeout=120)["status"] == "completed"
    finally:
        stop_worker(worker)


def test_make_token_asks_the_running_keycloak_for_a_demo_users_token(
    keycloak: KeycloakServer, api_as: Any, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    environ = {"PIXELMILL_ENV": "local", "KEYCLOAK_URL": keycloak.url}
    stack = LocalStack(
        Settings.from_env(environ),
        StatePaths(tmp_path),
        child_env=environ,
        keycloak_db_url=LOCAL_KEYCLOAK_DB_URL,
    )

    assert keycloak_token(stack, ["--user", "admin", "--roles", "user"]) == 0

    token = capsys.readouterr().out.strip()
    assert sorted(claims(token)["realm_access"]["roles"]) == ["admin", "user"]
    assert api_as(token).upload(jpeg(64, 48)).status_code == 201
    with pytest.raises(KeycloakError, match="not a demo user"):
        keycloak_token(stack, ["--user", "mallory"])


def test_a_distribution_whose_sha256_is_not_the_pinned_one_is_refused_and_removed(
    keycloak: KeycloakServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real download (from the local Maven repository now), checked against another digest.
    monkeypatch.setattr(keycloak_server, "DISTRIBUTION_SHA256", "0" * 64)
    distribution = KeycloakDistribution(tmp_path / "cache")

    with pytest.raises(KeycloakError, match="not the pinned"):
        distribution.ensure()

    assert not distribution.archive.exists()
    assert not distribution.home.exists()


def test_realm_roles_decide_access_user_uploads_admin_deletes_a_user_without_it_is_403(
    keycloak: KeycloakServer, admin: KeycloakAdmin, api_as: Any
) -> None:
    uploaded = api_as(token_of(keycloak, "user", "password")).upload(jpeg(64, 48))
    assert uploaded.status_code == 201
    image = f"/api/v1/images/{uploaded.json['id']}"

    assert api_as(token_of(keycloak, "user", "password")).delete(image).status_code == 403
    assert api_as(token_of(keycloak, "admin", "admin")).delete(image).status_code == 204
    assert api_as(token_of(keycloak, "admin", "admin")).get(image).status_code == 404

    nobody = unique("norole")
    admin.add_user(REALM, nobody, "norole-password", roles=[])
    refused = api_as(token_of(keycloak, nobody, "norole-password")).upload(jpeg(64, 48))
    assert refused.status_code == 403
    assert refused.json["error"]["code"] == "insufficient_scope"


def test_a_token_of_another_realm_is_401(
    keycloak: KeycloakServer, admin: KeycloakAdmin, api_as: Any
) -> None:
    # Same client, same user, same roles: only the issuer differs.
    other = admin.copy_of_realm_file(unique("Other"), demo=True)
    foreign = token_of(keycloak, "user", "password", realm=other)
    assert claims(foreign)["realm_access"]["roles"] == ["user"]

    refused = api_as(foreign).upload(jpeg(64, 48))
    assert refused.status_code == 401
    assert api_as(token_of(keycloak, "user", "password")).upload(jpeg(64, 48)).status_code == 201


def test_a_token_of_another_client_of_the_realm_is_401(
    keycloak: KeycloakServer, admin: KeycloakAdmin, api_as: Any
) -> None:
    other_client = unique("other-client")
    admin.call(
        "POST",
        f"/{REALM}/clients",
        {"clientId": other_client, "publicClient": True, "directAccessGrantsEnabled": True},
    )
    token = password_grant(keycloak.url, REALM, other_client, "user", "password")["access_token"]
    assert claims(token)["azp"] == other_client
    assert CLIENT not in claims(token).get("aud", [])

    assert api_as(token).upload(jpeg(64, 48)).status_code == 401


def test_an_expired_token_is_401_and_a_refreshed_one_is_accepted(
    keycloak: KeycloakServer, admin: KeycloakAdmin, api_as: Any, kc_env: dict[str, str]
) -> None:
    admin.update_client(REALM, CLIENT, {"attributes": {"access.token.lifespan": "2"}})
    try:
        answer = password_grant(keycloak.url, REALM, CLIENT, "user", "password")
    finally:
        admin.update_client(REALM, CLIENT, {"attributes": {"access.token.lifespan": ""}})
    token = answer["access_token"]
    assert answer["expires_in"] == 2
    wait_for(lambda: time.time() > claims(token)["exp"] + 1, timeout=30)

    assert api_as(token).get("/api/v1/images").status_code == 401
    # The same token within an hour's clock leeway: nothing but its expiry was refused.
    lenient = Settings.from_env({**kc_env, "JWT_LEEWAY_SECONDS": "3600"})
    with api_for(lenient, token) as api:
        assert api.get("/api/v1/images").status_code == 200

    form = {"grant_type": "refresh_token", "client_id": CLIENT}
    form["refresh_token"] = answer["refresh_token"]
    refreshed = token_request(keycloak.url, REALM, form)
    assert refreshed["expires_in"] > 2  # the client's own lifespan is back
    assert api_as(refreshed["access_token"]).get("/api/v1/images").status_code == 200


def test_the_api_follows_a_key_rotation_without_restart(
    keycloak: KeycloakServer, admin: KeycloakAdmin, kc_env: dict[str, str]
) -> None:
    realm = admin.copy_of_realm_file(unique("Rotation"), demo=True)
    with api_for(Settings.from_env({**kc_env, "KEYCLOAK_REALM": realm}), None) as api:
        before = token_of(keycloak, "user", "password", realm=realm)
        api.token = before
        assert api.get("/api/v1/images").status_code == 200
        old_key = kid(before)

        rotate_signing_key(admin, realm)
        after = token_of(keycloak, "user", "password", realm=realm)
        assert kid(after) != old_key

        api.token = after
        wait_for(lambda: api.get("/api/v1/images").status_code == 200, timeout=30)
        api.token = before
        wait_for(lambda: api.get("/api/v1/images").status_code == 401, timeout=30)


def rotate_signing_key(admin: KeycloakAdmin, realm: str) -> None:
    """A new RSA signing key of higher priority, then every older one disabled (no longer
    published nor used), as an operator rotates keys through the admin API."""
    realm_id = admin.call("GET", f"/{realm}")["id"]
    providers = admin.call("GET", f"/{realm}/components?type=org.keycloak.keys.KeyProvider")
    old = [component for component in providers if component["providerId"] == "rsa-generated"]
    admin.call(
        "POST",
        f"/{realm}/components",
        {
            "name": "rsa-rotated",
            "providerId": "rsa-generated",
            "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": realm_id,
            "config": {"priority": ["500"], "enabled": ["true"], "active": ["true"]},
        },
    )
    for component in old:
        disabled = {**component["config"], "enabled": ["false"], "active": ["false"]}
        changed = {**component, "config": disabled}
        admin.call("PUT", f"/{realm}/components/{component['id']}", changed)


@needs_jq
def test_setup_keycloak_creates_the_realm_the_api_accepts_and_a_second_run_changes_nothing(
    keycloak: KeycloakServer, admin: KeycloakAdmin, kc_env: dict[str, str]
) -> None:
    realm = unique("Setup")
    first = run_setup_keycloak(keycloak, realm, "--with-demo-users")
    assert f"creating realm {realm}" in first
    state = realm_state(admin, realm)

    second = run_setup_keycloak(keycloak, realm, "--with-demo-users")
    assert "creating" not in second and "adding" not in second, second
    assert realm_state(admin, realm) == state

    with api_for(Settings.from_env({**kc_env, "KEYCLOAK_REALM": realm}), None) as api:
        api.token = token_of(keycloak, "user", "password", realm=realm)
        assert api.upload(jpeg(64, 48)).status_code == 201


@needs_jq
def test_the_realm_file_and_setup_without_demo_users_keep_password_logins_off(
    keycloak: KeycloakServer, admin: KeycloakAdmin
) -> None:
    imported = admin.copy_of_realm_file(unique("Imported"), demo=False)
    admin.add_user(imported, "someone", "someone-password", roles=["user"])
    production = unique("Production")
    run_setup_keycloak(keycloak, production)
    admin.add_user(production, "someone", "someone-password", roles=["user"])

    for realm in (imported, production):
        with pytest.raises(KeycloakError, match="unauthorized_client"):
            token_of(keycloak, "someone", "someone-password", realm=realm)


def run_setup_keycloak(keycloak: KeycloakServer, realm: str, *args: str) -> str:
    """Run setup_keycloak.sh for `realm` (the realm file's definitions under that name); its
    log lines."""
    done = subprocess.run(
        ["bash", str(KEYCLOAK_FILES / "setup_keycloak.sh"), *args],
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "KEYCLOAK_URL": keycloak.url,
            "KEYCLOAK_ADMIN_PASSWORD": keycloak.options.admin_password,
            "KEYCLOAK_REALM": realm,
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def realm_state(admin: KeycloakAdmin, realm: str) -> dict[str, Any]:
    """What setup_keycloak.sh makes in a realm, as the admin API shows it."""
    client_uuid = admin.client_uuid(realm, CLIENT)
    client = admin.call("GET", f"/{realm}/clients/{client_uuid}")
    users = admin.call("GET", f"/{realm}/users")
    return {
        "realm": admin.call("GET", f"/{realm}"),
        "roles": sorted(r["name"] for r in admin.call("GET", f"/{realm}/roles")),
        "client": client,
        "users": sorted((u["username"], u["id"]) for u in users),
        "profile": admin.call("GET", f"/{realm}/users/profile"),
    }


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def http_json(
    method: str, url: str, token: str, body: bytes | None = None, content_type: str = ""
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {url}: {exc.code} {exc.read()[:500]!r}") from exc
