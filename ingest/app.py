"""The Falcon application: `create_app` wires resources to the clients it is given;
`get_app` builds settings and clients from the environment, for a gunicorn started by hand
(`pixelmill-api` passes its own settings to `create_app`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import falcon
from falcon.media.multipart import MultipartParseOptions

from common.broker import JobPublisher
from common.cache import ImageCache, cache_signing_key
from common.config import Settings
from common.storage import ObjectStore
from db.pool import Database
from ingest import errors
from ingest.auth import TokenVerifier
from ingest.connection_close import CloseRefusedConnections
from ingest.intake import ImageIntake
from ingest.metrics import MetricsMiddleware, MetricsResource
from ingest.middleware import (
    AuthMiddleware,
    BodyDeadlines,
    BodyTimeoutMiddleware,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
    UploadSlotMiddleware,
    UploadSlots,
)
from ingest.openapi import OpenApiResource, openapi_document
from ingest.rate_limit import BatchRateLimiter, InteractiveAllowance, UploadRateLimiter
from ingest.routes.archive import BatchArchiveResource
from ingest.routes.batches import (
    BatchCancelResource,
    BatchCloseResource,
    BatchCollectionResource,
    BatchImagesResource,
    BatchResource,
    BatchRetryResource,
)
from ingest.routes.console import CONSOLE_PATH, ConsoleSink
from ingest.routes.health import HealthResource, ReadinessResource
from ingest.routes.images import ImageCollectionResource, ImageResource, RenditionResource
from ingest.routes.upload import BulkUploadResource, UploadResource

log = logging.getLogger(__name__)

SINGLE_UPLOAD_ROUTE = "/api/v1/upload"
BULK_UPLOAD_ROUTE = "/api/v1/uploads"


@dataclass(frozen=True)
class Dependencies:
    """The clients the API talks through, built once per process."""

    db: Database
    store: ObjectStore
    publisher: JobPublisher
    cache: ImageCache
    verifier: TokenVerifier

    @classmethod
    def connect(cls, settings: Settings) -> Dependencies:
        return cls(
            db=Database(settings.postgres_url),
            store=ObjectStore(settings.storage),
            publisher=JobPublisher(settings.queue),
            cache=ImageCache.from_url(
                settings.redis_url,
                settings.redis_prefix,
                cache_signing_key(settings.storage.secret_key),
            ),
            verifier=TokenVerifier(settings.auth),
        )

    def close(self) -> None:
        self.publisher.close()
        self.db.close()


def create_app(settings: Settings, deps: Dependencies) -> falcon.App:
    """The app of one process; call it in each worker after fork (it starts the process's body
    deadline thread)."""
    upload_slots = UploadSlots(settings.server.upload_slots, settings.api.max_uploads_per_user)
    middleware: list[Any] = [
        MetricsMiddleware(),
        RequestIdMiddleware(),
        BodyTimeoutMiddleware(settings.api, BodyDeadlines()),
        SecurityHeadersMiddleware(),
        AuthMiddleware(deps.verifier),
        UploadSlotMiddleware(upload_slots, frozenset({SINGLE_UPLOAD_ROUTE, BULK_UPLOAD_ROUTE})),
    ]
    if settings.api.cors_origins:
        middleware.insert(0, falcon.CORSMiddleware(allow_origins=list(settings.api.cors_origins)))
    app = falcon.App(middleware=middleware)
    _configure_multipart(app)
    errors.install(app)

    allowance = InteractiveAllowance(
        deps.cache.client, settings.redis_prefix, settings.queue.interactive_images_per_minute
    )
    intake = ImageIntake(
        deps.db,
        deps.store,
        deps.publisher,
        settings.api.idempotency_ttl_seconds,
        settings.queue,
        allowance.take,
    )
    limiter = UploadRateLimiter(
        deps.cache.client, settings.redis_prefix, settings.api.uploads_per_minute
    )
    app.add_route("/health", HealthResource())
    app.add_route("/openapi.json", OpenApiResource(openapi_document(settings)))
    app.add_route("/metrics", MetricsResource(settings.server.metrics_dir))
    app.add_route(
        "/ready",
        ReadinessResource(
            {
                "database": deps.db.check,
                "message broker": deps.publisher.check,
                "object storage": deps.store.check,
            }
        ),
    )
    app.add_route(
        SINGLE_UPLOAD_ROUTE, UploadResource(intake, limiter, settings.api, settings.engine)
    )
    app.add_route(
        BULK_UPLOAD_ROUTE, BulkUploadResource(intake, limiter, settings.api, settings.engine)
    )
    app.add_route("/api/v1/images", ImageCollectionResource(deps.db))
    image = ImageResource(
        deps.db,
        deps.store,
        deps.cache,
        settings.api.cache_ttl_seconds,
        settings.api.max_wait_seconds,
    )
    app.add_route("/api/v1/images/{image_id}", image)
    app.add_route(
        "/api/v1/images/{image_id}/renditions/{name}", RenditionResource(image, deps.store)
    )
    _add_batch_routes(app, settings, deps)
    app.add_sink(ConsoleSink(settings), CONSOLE_PATH)
    return app


def _add_batch_routes(app: falcon.App, settings: Settings, deps: Dependencies) -> None:
    app.add_route(
        "/api/v1/batches",
        BatchCollectionResource(
            deps.db,
            settings.webhooks,
            settings.engine.renditions,
            settings.api.max_open_batches_per_user,
            BatchRateLimiter(
                deps.cache.client, settings.redis_prefix, settings.api.batches_per_minute
            ),
        ),
    )
    app.add_route("/api/v1/batches/{batch_id}", BatchResource(deps.db))
    app.add_route("/api/v1/batches/{batch_id}/images", BatchImagesResource(deps.db))
    app.add_route("/api/v1/batches/{batch_id}/close", BatchCloseResource(deps.db))
    app.add_route(
        "/api/v1/batches/{batch_id}/retry",
        BatchRetryResource(deps.db, deps.publisher, deps.cache),
    )
    app.add_route("/api/v1/batches/{batch_id}/cancel", BatchCancelResource(deps.db, deps.cache))
    app.add_route(
        "/api/v1/batches/{batch_id}/archive",
        BatchArchiveResource(deps.db, deps.store, settings.engine.renditions),
    )


def _configure_multipart(app: falcon.App) -> None:
    options = MultipartParseOptions()
    options.max_body_part_count = 16
    options.max_body_part_headers_size = 32 * 1024
    handler = falcon.media.MultipartFormHandler(options)
    app.req_options.media_handlers[falcon.MEDIA_MULTIPART] = handler


def get_app() -> CloseRefusedConnections:
    """Entry point for gunicorn (`ingest.app:get_app()`), called after fork in each worker.
    (`pixelmill-api` also sets the hook that makes a refused upload's answer say
    `Connection: close`; see ingest.connection_close.)"""
    settings = Settings.from_env()
    return CloseRefusedConnections(create_app(settings, Dependencies.connect(settings)))
