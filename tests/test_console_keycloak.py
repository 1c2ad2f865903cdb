"""The web console against the real Keycloak (the session's `keycloak` fixture) in headless
Chromium: signing in on Keycloak's own login page, uploading a folder that a worker node
completes, and the access token refreshed at Keycloak's token endpoint. Screenshots go to
`.test-artifacts/console/keycloak/`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.config import Settings
from ops.keycloak_server import KeycloakServer
from tests.browser import (
    KEYCLOAK_LOGIN,
    artifacts,
    count,
    page_errors,
    pick_folder,
    require_chromium,
    shot,
    sign_in,
    text_of,
    wait_for_text,
)
from tests.support import (
    KeycloakAdmin,
    jpeg,
    renditions_env,
    served_api,
    start_worker,
    stop_worker,
    wait_for,
)

# Like tests/test_keycloak.py: the first Keycloak test of a session waits for its start.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REALM = "ImageProcessor"
CONSOLE_CLIENT = "pixelmill-console"
# Short-lived access tokens: the console refreshes them (at 70 % of their lifetime) while the
# test runs, and Keycloak records each refresh.
ACCESS_TOKEN_SECONDS = 10
RECORDED_EVENTS = ["LOGIN", "CODE_TO_TOKEN", "REFRESH_TOKEN", "REFRESH_TOKEN_ERROR"]


@dataclass(frozen=True)
class KeycloakConsole:
    url: str
    admin: KeycloakAdmin


@contextlib.contextmanager
def console_client_for(admin: KeycloakAdmin, callback: str) -> Iterator[None]:
    """The realm's console client with `callback` added to its redirect URIs (its web origins
    `+` then let that origin call the token endpoint), access tokens of ACCESS_TOKEN_SECONDS,
    and the realm's sign-in and refresh events recorded; all as before afterwards. The realm
    file registers only the console on port 3000: an API elsewhere adds its callback so, as an
    operator would (docs/console.md)."""
    client = admin.call("GET", f"/{REALM}/clients/{admin.client_uuid(REALM, CONSOLE_CLIENT)}")
    lifespan = client.get("attributes", {}).get("access.token.lifespan", "")
    events = admin.call("GET", f"/{REALM}/events/config")
    admin.update_client(
        REALM,
        CONSOLE_CLIENT,
        {
            "redirectUris": [*client["redirectUris"], callback],
            "attributes": {"access.token.lifespan": str(ACCESS_TOKEN_SECONDS)},
        },
    )
    # Keycloak keeps no refresh events unless asked to, even with events on.
    recorded = {**events, "eventsEnabled": True, "enabledEventTypes": RECORDED_EVENTS}
    admin.call("PUT", f"/{REALM}/events/config", recorded)
    try:
        yield
    finally:
        admin.call("PUT", f"/{REALM}/events/config", events)
        admin.update_client(
            REALM,
            CONSOLE_CLIENT,
            {
                "redirectUris": client["redirectUris"],
                "attributes": {"access.token.lifespan": lifespan},
            },
        )


@pytest.fixture
def keycloak_console(
    keycloak: KeycloakServer,
    env: dict[str, str],
    private_queue: Settings,
    own_database: Settings,
    tmp_path: Path,
) -> Iterator[KeycloakConsole]:
    """An API served by gunicorn and a worker node, on Keycloak, on a database schema and job
    queue of this test, with the console's callback registered for its port."""
    require_chromium()
    admin = KeycloakAdmin(keycloak.url)
    own_env = {
        **renditions_env(env, private_queue),
        "POSTGRES_URL": own_database.postgres_url,
        "KEYCLOAK_URL": keycloak.url,
    }
    logs = tmp_path / "stack.log"
    worker = start_worker({**own_env, "WORKER_PROCESSES": "1"}, logs)
    try:
        with (
            served_api(own_env, logs) as (url, _),
            console_client_for(admin, f"{url}/console/callback.html"),
        ):
            yield KeycloakConsole(url, admin)
    finally:
        stop_worker(worker)


def refreshes(admin: KeycloakAdmin, username: str) -> int:
    """Refresh grants Keycloak has recorded for the console's client and `username`."""
    [user] = admin.call("GET", f"/{REALM}/users?username={username}&exact=true")
    path = f"/{REALM}/events?client={CONSOLE_CLIENT}&type=REFRESH_TOKEN&user={user['id']}"
    return len(admin.call("GET", path))


def pictures(folder: Path, names: list[str], seed: int) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(jpeg(320, 240, seed=seed + i))
    return folder


def test_console_signs_in_on_keycloaks_login_page_uploads_a_folder_and_refreshes_its_token(
    keycloak_console: KeycloakConsole, browser: Any, tmp_path: Path
) -> None:
    steps = artifacts("keycloak")
    browser.get(f"{keycloak_console.url}/console/")
    shot(browser, steps, "01-signed-out")
    sign_in(browser, "user", "password", KEYCLOAK_LOGIN, login_shot=steps / "02-keycloak-login.png")
    who = text_of(browser, "who")
    assert who.startswith("Signed in as user ("), who
    assert "user" in who.removeprefix("Signed in as user (").rstrip(")").split(", "), who
    shot(browser, steps, "03-signed-in")

    pick_folder(browser, pictures(tmp_path / "holiday", ["a.jpg", "b.jpg", "c.jpg"], seed=600))
    summary = wait_for_text(browser, "upload-summary-text", "Done:", timeout=120)
    assert summary == "Done: 3 uploaded, 0 already in the batch, 0 refused."
    wait_for(lambda: count(browser, "completed") == 3, timeout=180, what="3 images completed")
    shot(browser, steps, "04-completed")

    # Two refreshes: the second is scheduled by the answer to the first, which the page took.
    admin = keycloak_console.admin
    wait_for(lambda: refreshes(admin, "user") >= 2, timeout=120, what="two token refreshes")
    target = text_of(browser, "upload-target")
    pick_folder(browser, pictures(tmp_path / "more", ["d.jpg", "e.jpg"], seed=700))
    wait_for_text(browser, "upload-summary-text", "Done: 2 uploaded", timeout=120)
    wait_for(lambda: count(browser, "completed") == 5, timeout=180, what="5 images completed")
    assert text_of(browser, "upload-target") == target, "the same batch"
    assert text_of(browser, "who") == who, "still signed in after the refreshes"
    shot(browser, steps, "05-uploaded-after-refresh")
    assert page_errors(browser) == []
