"""The API when a dependency is down: 503 naming it, with Retry-After, and nothing left behind;
Redis down degrades to PostgreSQL instead of failing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.config import Settings
from tests.support import ApiClient, StackProbe, jpeg

CLOSED = "127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture
def app_with(env, issuer, user_id):
    """Build an API whose settings differ from the session's by `overrides`."""
    from ingest.app import Dependencies, create_app

    built: list[Dependencies] = []

    def build(**overrides: str) -> ApiClient:
        settings = Settings.from_env({**env, **overrides})
        deps = Dependencies.connect(settings)
        built.append(deps)
        return ApiClient(create_app(settings, deps), issuer.mint_token(user_id, ("user",)))

    yield build
    for deps in built:
        deps.close()


OUTAGES = {
    "object storage": {"MINIO_ENDPOINT": CLOSED},
    "message broker": {"RABBITMQ_URL": f"amqp://guest:guest@{CLOSED}/%2F"},
    "database": {"POSTGRES_URL": f"postgresql://postgres@{CLOSED}/test"},
}


@pytest.mark.parametrize("dependency", sorted(OUTAGES))
def test_upload_during_outage_is_503_naming_it_and_leaves_nothing(
    dependency: str, app_with, probe: StackProbe, user_id: str
) -> None:
    before = probe.originals()
    api = app_with(**OUTAGES[dependency])
    response = api.upload(jpeg(200, 100))
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"].isdigit()
    assert response.json["error"]["code"] == "dependency_unavailable"
    assert response.json["error"]["dependency"] == dependency
    assert probe.rows_for(user_id) == []
    assert probe.originals() == before


@pytest.mark.parametrize("dependency", sorted(OUTAGES))
def test_ready_is_503_naming_the_missing_dependency(dependency: str, app_with) -> None:
    api = app_with(**OUTAGES[dependency])
    response = api.get("/ready")
    assert response.status_code == 503
    assert response.json["error"]["dependencies"] == [dependency]
    assert api.get("/health").status_code == 200


def test_redis_down_uploads_and_reads_still_work(app_with, probe: StackProbe) -> None:
    api = app_with(REDIS_URL=f"redis://{CLOSED}/0")
    created = api.upload(jpeg(200, 100))
    assert created.status_code == 201, created.text
    image_id = created.json["id"]
    for _ in range(2):
        read = api.get(f"/api/v1/images/{image_id}")
        assert read.status_code == 200
        assert read.headers["X-Cache"] == "miss"


@pytest.fixture
def own_s3(tmp_path) -> Iterator:
    from ops.s3server import LocalS3Server, pick_free_s3_port
    from tests.support import S3_ACCESS_KEY, S3_SECRET_KEY

    server = LocalS3Server(
        tmp_path / "s3",
        port=pick_free_s3_port(),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_api_recovers_by_itself_when_storage_returns(app_with, own_s3, env) -> None:
    from common.storage import ObjectStore

    overrides = {"MINIO_ENDPOINT": own_s3.endpoint}
    ObjectStore(Settings.from_env({**env, **overrides}).storage).ensure_buckets()
    api = app_with(**overrides)
    assert api.upload(jpeg(120, 80)).status_code == 201
    own_s3.stop()
    assert api.upload(jpeg(120, 80)).status_code == 503
    assert api.get("/ready").status_code == 503
    own_s3.start()
    assert api.get("/ready").status_code == 200
    assert api.upload(jpeg(120, 80)).status_code == 201
