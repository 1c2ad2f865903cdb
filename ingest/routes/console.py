"""The web console at `/console/`: static pages and ES modules from `ingest/console/`, and
`config.json`, which tells the page its issuer and client id. Nothing here keeps a session: the
page signs in with the issuer itself and calls the API with a bearer token.

A sink rather than routes: the console is not part of the API, so the OpenAPI document (which
lists every route) leaves it out, and no token is asked for its files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import falcon

from common.config import Settings
from common.errors import NotFound

CONSOLE_DIRECTORY = Path(__file__).resolve().parent.parent / "console"
CONSOLE_PATH = re.compile(r"/console(?:/(?P<name>[A-Za-z0-9_-]+\.[a-z]+)?)?$")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
}
CONFIG_NAME = "config.json"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def console_policy(settings: Settings) -> str:
    """The console's Content-Security-Policy: its own files only, no inline script or style;
    it may call the issuer (discovery, tokens) and show result images from S3 (presigned)."""
    storage = settings.storage
    scheme = "https" if storage.secure else "http"
    s3_origin = f"{scheme}://{storage.public_endpoint or storage.endpoint}"
    issuer_origin = _origin(settings.auth.keycloak_url)
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src 'self' blob: {s3_origin}",
            f"connect-src 'self' {issuer_origin}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def console_config(settings: Settings) -> dict[str, str]:
    """What the page needs to sign in: the issuer (it reads the discovery document) and the
    public client it signs in as."""
    return {
        "issuer": settings.auth.issuer,
        "client_id": settings.auth.console_client_id,
        "scope": "openid profile",
    }


def load_console_files(settings: Settings) -> dict[str, tuple[bytes, str]]:
    """Every file of the console by name, with its content type, read once at start-up."""
    files = {
        path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
        for path in sorted(CONSOLE_DIRECTORY.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }
    files[CONFIG_NAME] = (json.dumps(console_config(settings)).encode(), CONTENT_TYPES[".json"])
    return files


class ConsoleSink:
    """GET (and HEAD) `/console/` and its files; `/console` redirects to `/console/` so that the
    page's relative module URLs resolve."""

    def __init__(self, settings: Settings) -> None:
        self._files = load_console_files(settings)
        self._policy = console_policy(settings)

    def __call__(self, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        name = params.get("name")
        if req.method not in ("GET", "HEAD"):
            raise falcon.HTTPMethodNotAllowed(["GET", "HEAD"])
        if req.path == "/console":
            raise falcon.HTTPMovedPermanently("/console/")
        found = self._files.get(name or "index.html")
        if found is None:
            raise NotFound("no such console file")
        body, content_type = found
        resp.context.content_security_policy = self._policy
        resp.content_type = content_type
        resp.data = body
