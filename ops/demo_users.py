"""The demo users of development: `ops/keycloak/demo-ImageProcessor.json`, read in one place.

Keycloak's development profile imports that file; the local issuer signs the same users in and
`make token` asks Keycloak for their tokens, so every sign-in takes the same names and passwords.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

DEMO_FILE = Path(__file__).resolve().parent / "keycloak" / "demo-ImageProcessor.json"


@dataclass(frozen=True)
class DemoUser:
    """A development login: its name, password and realm roles."""

    username: str
    password: str
    roles: tuple[str, ...]


@functools.cache
def demo_users() -> tuple[DemoUser, ...]:
    """The users of the demo file, in its order."""
    document = json.loads(DEMO_FILE.read_text(encoding="utf-8"))
    return tuple(_demo_user(entry) for entry in document["users"])


def demo_user(username: str) -> DemoUser | None:
    return next((user for user in demo_users() if user.username == username), None)


def _demo_user(entry: dict) -> DemoUser:
    [password] = [c["value"] for c in entry["credentials"] if c["type"] == "password"]
    return DemoUser(entry["username"], password, tuple(entry["realmRoles"]))
