"""Liveness (`/health`, no dependencies) and readiness (`/ready`, every dependency answers)."""

from __future__ import annotations

from collections.abc import Callable

import falcon

from common.errors import DependencyUnavailable


class HealthResource:
    """Answers 200 while the process serves requests."""

    auth_required = False

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadinessResource:
    """Answers 200 only when PostgreSQL, RabbitMQ and object storage all answer."""

    auth_required = False

    def __init__(self, checks: dict[str, Callable[[], None]]) -> None:
        self._checks = checks

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        results: dict[str, str] = {}
        for name, check in self._checks.items():
            try:
                check()
                results[name] = "ok"
            except DependencyUnavailable:
                results[name] = "unavailable"
        failed = [name for name, state in results.items() if state != "ok"]
        if not failed:
            resp.media = {"status": "ready", "checks": results}
            return
        resp.status = falcon.HTTP_503
        resp.set_header("Retry-After", "5")
        resp.media = {
            "error": {
                "code": "not_ready",
                "message": f"unavailable: {', '.join(failed)}",
                "dependencies": failed,
            },
            "checks": results,
        }
