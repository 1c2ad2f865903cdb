"""The API drops a signing key its issuer withdrew, without a restart and without being shown an
unknown `kid`: the key set is refreshed on a schedule (JWKS_REFRESH_SECONDS, short here)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.config import Settings
from ops.issuer import LocalIssuer, running
from tests.support import ApiClient, wait_for


@pytest.fixture
def own_issuer(tmp_path: Path) -> Iterator[LocalIssuer]:
    """An issuer of this test alone, so withdrawing its keys disturbs no other test."""
    with running(tmp_path / "own-issuer") as served:
        yield served


@pytest.fixture
def api_of_own_issuer(env: dict[str, str], settings: Settings, own_issuer: LocalIssuer):
    from ingest.app import Dependencies, create_app

    custom = Settings.from_env(
        {**env, "KEYCLOAK_URL": own_issuer.base_url, "JWKS_REFRESH_SECONDS": "1"}
    )
    deps = Dependencies.connect(custom)
    yield create_app(custom, deps)
    deps.close()


def listing_status(app: Any, token: str) -> int:
    return ApiClient(app, token).get("/api/v1/images").status_code


def test_token_signed_by_a_withdrawn_key_is_refused_after_the_next_refresh(
    api_of_own_issuer: Any, own_issuer: LocalIssuer
) -> None:
    old_token = own_issuer.mint_token(f"user-{uuid.uuid4()}")
    assert listing_status(api_of_own_issuer, old_token) == 200
    own_issuer.rotate_key(keep_old=True)
    new_token = own_issuer.mint_token(f"user-{uuid.uuid4()}")
    # Its kid is unknown until the interval since the first fetch has passed.
    wait_for(lambda: listing_status(api_of_own_issuer, new_token) == 200, timeout=30)

    own_issuer.withdraw_retired_keys()

    # Only requests carrying the old, known kid: nothing but the schedule can drop it.
    wait_for(lambda: listing_status(api_of_own_issuer, old_token) == 401, timeout=30)
    assert listing_status(api_of_own_issuer, new_token) == 200
