"""Session fixtures: real PostgreSQL, Redis, RabbitMQ, a SeaweedFS S3 server and a local OIDC
issuer. Each test session gets its own database schema, queue, buckets and Redis prefix, and each
test its own user, so tests never see each other's data."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.broker import delete_topology
from common.config import Settings
from db.migrate import apply_migrations
from db.pool import Database
from db.schemas import throwaway_schema, with_search_path
from ops.issuer import LocalIssuer, running
from ops.keycloak_server import (
    KeycloakDistribution,
    KeycloakOptions,
    KeycloakServer,
    missing_tools,
)
from ops.s3server import LocalS3Server, pick_free_s3_port
from tests.browser import chromium
from tests.support import (
    BASE_POSTGRES_URL,
    KEYCLOAK_TEST_ADMIN_PASSWORD,
    RABBITMQ_URL,
    REDIS_URL,
    ROOT,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    ApiClient,
    OwnStack,
    StackProbe,
    free_port,
    renditions_stack,
    start_worker,
    stop_worker,
)


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    server = LocalS3Server(
        tmp_path_factory.mktemp("s3"),
        port=pick_free_s3_port(),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIssuer]:
    with running(tmp_path_factory.mktemp("issuer")) as served:
        yield served


@pytest.fixture(scope="session")
def keycloak(run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeycloakServer]:
    """The real Keycloak, started once per session as `make up KEYCLOAK=1` starts it (the
    realm file compose imports, then demo_users.sh), on free ports, its tables in a schema of
    its own. The distribution is fetched once into .state/keycloak, like the local stack's."""
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    with throwaway_schema(BASE_POSTGRES_URL, f"kc_test_{run_id}") as kc_schema:
        options = KeycloakOptions(
            url=f"http://127.0.0.1:{free_port()}",
            management_port=free_port(),
            database_url=BASE_POSTGRES_URL,
            admin_password=KEYCLOAK_TEST_ADMIN_PASSWORD,
            database_schema=kc_schema,
        )
        instance = tmp_path_factory.mktemp("keycloak")
        distribution = KeycloakDistribution(ROOT / ".state" / "keycloak")
        server = KeycloakServer(distribution, instance, options, base_env=os.environ)
        try:
            server.start()
            server.add_demo_users(os.environ)
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def schema(run_id: str) -> Iterator[str]:
    with throwaway_schema(BASE_POSTGRES_URL, f"pm_test_{run_id}") as name:
        yield name


@pytest.fixture(scope="session")
def env(run_id: str, schema: str, s3_server: LocalS3Server, issuer: LocalIssuer) -> dict[str, str]:
    """The environment a pixelmill process of this test session runs with."""
    return {
        # Development secrets on purpose: the tests' services are throwaway and local.
        "PIXELMILL_ENV": "local",
        "POSTGRES_URL": with_search_path(BASE_POSTGRES_URL, schema),
        "REDIS_URL": REDIS_URL,
        "REDIS_PREFIX": f"pmtest:{run_id}:",
        "RABBITMQ_URL": RABBITMQ_URL,
        "RABBITMQ_QUEUE": f"pm-test-{run_id}",
        "MINIO_ENDPOINT": s3_server.endpoint,
        "MINIO_ACCESS_KEY": S3_ACCESS_KEY,
        "MINIO_SECRET_KEY": S3_SECRET_KEY,
        "MINIO_RAW_BUCKET": f"raw-{run_id}",
        "MINIO_PROCESSED_BUCKET": f"processed-{run_id}",
        "KEYCLOAK_URL": issuer.base_url,
        "WORKER_PROCESSES": "2",
        "WORKER_BATCH_WAIT_MS": "20",
        "WORKER_MEMORY_MB": "128",
        "UPLOADS_PER_MINUTE": "100000",
        "METRICS_PORT": "0",
        # Webhook tests receive deliveries on 127.0.0.1.
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_SWEEP_SECONDS": "0.2",
    }


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Iterator[Settings]:
    settings = Settings.from_env(env)
    apply_migrations(settings.postgres_url)
    from common.storage import ObjectStore

    ObjectStore(settings.storage).ensure_buckets()
    yield settings
    delete_topology(settings.queue)
    _delete_redis_keys(settings)


def _delete_redis_keys(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    keys = list(client.scan_iter(f"{settings.redis_prefix}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def worker(env: dict[str, str], settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    """A real worker node (`python -m engine`) consuming this session's queue."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    process = start_worker(env, log_path)
    yield process
    stop_worker(process)


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[Any]:
    """The Falcon app built exactly as gunicorn builds it, on this session's services."""
    from ingest.app import Dependencies, create_app

    deps = Dependencies.connect(settings)
    yield create_app(settings, deps)
    deps.close()


@pytest.fixture
def user_id() -> str:
    return f"user-{uuid.uuid4()}"


@pytest.fixture
def api(app: Any, issuer: LocalIssuer, user_id: str) -> ApiClient:
    return ApiClient(app, issuer.mint_token(user_id, ("user",)))


@pytest.fixture
def probe(settings: Settings) -> StackProbe:
    return StackProbe(settings)


@pytest.fixture
def private_queue(settings: Settings) -> Iterator[Settings]:
    """The session's services with a job queue, dead-letter queue and Redis prefix of this test
    only (declared by whoever uses them first), all removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    queue = dataclasses.replace(
        settings.queue, queue=f"pm-q-{tag}", dead_letter_queue=f"pm-q-{tag}.dead"
    )
    own = dataclasses.replace(settings, queue=queue, redis_prefix=f"pmq:{tag}:")
    yield own
    delete_topology(own.queue)
    _delete_redis_keys(own)


@pytest.fixture
def own_stack(
    env: dict[str, str], settings: Settings, issuer: LocalIssuer, user_id: str, tmp_path: Any
) -> Iterator[OwnStack]:
    """An API (as `user_id`) and worker nodes on a queue of this test only; nodes the test
    started are stopped afterwards and the queue deleted."""
    from ingest.app import Dependencies, create_app

    tag = uuid.uuid4().hex[:8]
    own_env = {**env, "RABBITMQ_QUEUE": f"pm-own-{tag}", "REDIS_PREFIX": f"pmown:{tag}:"}
    own = Settings.from_env(own_env)
    deps = Dependencies.connect(own)
    api = ApiClient(create_app(own, deps), issuer.mint_token(user_id, ("user",)))
    stack = OwnStack(own_env, own, api, tmp_path / "worker.log")
    yield stack
    stack.stop_nodes()
    deps.close()
    delete_topology(own.queue)
    _delete_redis_keys(own)


@pytest.fixture
def own_database(settings: Settings) -> Iterator[Settings]:
    """The session's services with a freshly migrated database schema of this test only, for
    tests of work that every worker node shares through the database (webhook deliveries)."""
    with throwaway_schema(BASE_POSTGRES_URL, f"pm_own_{uuid.uuid4().hex[:10]}") as name:
        own = dataclasses.replace(settings, postgres_url=with_search_path(BASE_POSTGRES_URL, name))
        apply_migrations(own.postgres_url)
        yield own


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    """A connection pool to the test session's schema."""
    db = Database(settings.postgres_url, max_size=4)
    yield db
    db.close()


@pytest.fixture
def renditions_service(
    env: dict[str, str], private_queue: Settings, tmp_path: Path, issuer: LocalIssuer, user_id: str
) -> Iterator[ApiClient]:
    """The API as `user_id`, and a worker node, both configured with several renditions
    (`tests.support.API_RENDITIONS`), on a private queue."""
    with renditions_stack(env, private_queue, tmp_path, issuer, user_id) as api:
        yield api


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium of this test (tests/browser.py), saving downloads into
    `browser.downloads`."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium(tmp_path / "profile", downloads) as driver:
        driver.downloads = downloads
        yield driver
