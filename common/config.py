"""Configuration: read once from the environment into frozen dataclasses, validated at start-up.

Every service calls `Settings.from_env()` at its edge and passes the result down. Nothing else in
the project reads `os.environ`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from common.cpu_limit import usable_cores
from common.decode_budget import DEFAULT_MAX_DECODE_MB
from common.formats import OUTPUT_FORMATS
from common.renditions import (
    Rendition,
    RenditionSpecError,
    default_renditions,
    parse_renditions,
)

T = TypeVar("T")

LOCAL = "local"
PRODUCTION = "production"
ENVIRONMENTS = (PRODUCTION, LOCAL)
# Secrets that ship in this repository, its examples or the images' own defaults. A production
# process refuses every one of them; the local stack and the tests use them knowingly.
WELL_KNOWN_SECRETS = frozenset(
    {"pixelmill", "pixelmill-secret", "guest", "admin", "minioadmin", "postgres", "change-me"}
)


# The local stack's and the tests' key for webhook secrets at rest; production refuses it.
DEVELOPMENT_WEBHOOK_KEY = "pixelmill-local-webhook-key"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


class _Env:
    """Typed reads from an environment mapping, each error naming its variable.

    A variable `NAME_FILE` holding a path is read instead of `NAME` when set, so secrets can come
    from mounted files (Docker/Kubernetes secrets).
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str, default: str) -> str:
        file_path = self._environ.get(f"{name}_FILE")
        if file_path:
            try:
                return Path(file_path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{name}_FILE: cannot read {file_path!r}: {exc.strerror}"
                ) from exc
        value = self._environ.get(name)
        return default if value is None or value == "" else value

    def text(self, name: str, default: str) -> str:
        return self.raw(name, default)

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.hostname:
            allowed = ", ".join(f"{s}://" for s in schemes)
            raise ConfigError(f"{name}={value!r} is not a URL starting with {allowed}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, "true" if default else "false").strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean (use true or false)")

    def number(self, name: str, default: T, parse: Callable[[str], T], minimum: float) -> T:
        value = self.raw(name, str(default))
        try:
            parsed = parse(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number") from None
        if parsed < minimum:  # type: ignore[operator]
            raise ConfigError(f"{name}={value!r} must be at least {minimum}")
        return parsed

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        return self.number(name, default, int, minimum)

    def decimal(self, name: str, default: float, minimum: float = 0.0) -> float:
        return self.number(name, default, float, minimum)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default).strip().lower()
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
        return value

    def host_port(self, name: str, default: str) -> str:
        value = self.raw(name, default)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or "/" in value:
            raise ConfigError(f"{name}={value!r} must be host:port (no scheme)")
        return value

    def names(self, name: str, default: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.raw(name, default).split(",") if item.strip())


@dataclass(frozen=True)
class StorageSettings:
    """S3-compatible object storage (MinIO in production, SeaweedFS locally)."""

    endpoint: str = "127.0.0.1:8333"
    access_key: str = "pixelmill"
    secret_key: str = "pixelmill-secret"
    secure: bool = False
    region: str = "us-east-1"
    raw_bucket: str = "raw-images"
    processed_bucket: str = "processed-images"
    public_endpoint: str = ""
    presign_seconds: int = 900
    # Signs download URLs: a key that can only read the results bucket, so a leaked or
    # tampered URL can never fetch an original. Locally it defaults to the main key.
    presign_access_key: str = "pixelmill"
    presign_secret_key: str = "pixelmill-secret"


@dataclass(frozen=True)
class QueueSettings:
    """RabbitMQ connection and the names of the job queue and its dead-letter queue."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue: str = "image-jobs"
    dead_letter_queue: str = "image-jobs.dead"
    delivery_limit: int = 20
    heartbeat_seconds: int = 30
    # How long a dead letter waits for an operator (`ops dlq requeue`) before the worker nodes
    # end its image as failed.
    dead_letter_grace_seconds: int = 300
    # Lanes: interactive work and each bulk shard get queues of their own (named after `queue`).
    # Off, every job goes to `queue` itself, as before lanes existed; nodes consume both ways.
    lanes: bool = True
    # Bulk queues; an owner's bulk work always goes to the same one (see common.jobs.bulk_shard).
    bulk_shards: int = 4
    # A bulk request of at most this many images is interactive work (0: only single uploads).
    interactive_max_parts: int = 4
    # Images one user may send as interactive work per minute; past it their requests go to the
    # bulk lane (0: no limit).
    interactive_images_per_minute: int = 60


@dataclass(frozen=True)
class AuthSettings:
    """OIDC resource-server settings: where the issuer lives and what tokens must carry."""

    keycloak_url: str = "http://127.0.0.1:8180"
    realm: str = "ImageProcessor"
    client_id: str = "api-gateway-client"
    # The public client the web console signs in with (its tokens carry `client_id` in `aud`).
    console_client_id: str = "pixelmill-console"
    algorithms: tuple[str, ...] = ("RS256",)
    leeway_seconds: int = 30
    jwks_refresh_seconds: int = 60
    max_token_bytes: int = 8192

    @property
    def issuer(self) -> str:
        return f"{self.keycloak_url.rstrip('/')}/realms/{self.realm}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"


@dataclass(frozen=True)
class ApiSettings:
    """Limits and behaviour of the HTTP API."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_bulk_parts: int = 100
    max_bulk_bytes: int = 100 * 1024 * 1024
    idempotency_ttl_seconds: int = 24 * 3600
    max_wait_seconds: int = 30
    body_timeout_seconds: float = 30.0
    cache_ttl_seconds: int = 30
    cors_origins: tuple[str, ...] = ()
    uploads_per_minute: int = 600
    # Batches one user may create in any 60 s (0: no limit).
    batches_per_minute: int = 60
    # A body must average this rate (after `body_timeout_seconds` of grace) or it is cut off.
    body_min_bytes_per_second: int = 16 * 1024
    # Uploads one user may send at once to one API process.
    max_uploads_per_user: int = 4
    # Batches one user may have open at once (0: no limit); closed ones do not count.
    max_open_batches_per_user: int = 100

    def body_deadline_seconds(self, content_length: int) -> float:
        """How long a body of `content_length` bytes may take to arrive, in all."""
        return self.body_timeout_seconds + content_length / self.body_min_bytes_per_second


@dataclass(frozen=True)
class ServerSettings:
    """How `pixelmill-api` runs gunicorn, and where its processes merge their metrics."""

    bind: str = "127.0.0.1:3000"
    workers: int = 2
    threads: int = 8
    # prometheus_client's multiprocess directory; empty: `pixelmill-api` makes a fresh one.
    metrics_dir: str = ""
    # Threads of a process that uploads may hold at once (0: see `upload_slots`), so that the
    # others answer /health, /metrics and reads however slowly upload bodies arrive.
    upload_threads: int = 0

    def __post_init__(self) -> None:
        if self.upload_threads >= self.threads:
            raise ConfigError(
                f"API_UPLOAD_THREADS={self.upload_threads} must be below API_THREADS="
                f"{self.threads}, leaving threads for /health and /metrics"
            )

    @property
    def upload_slots(self) -> int:
        """`upload_threads`, or all threads but two, but at least two: a process of two or three
        threads keeps fewer for the rest rather than take one upload at a time."""
        return self.upload_threads or max(self.threads - 2, min(self.threads, 2))


@dataclass(frozen=True)
class EngineSettings:
    """How a worker node processes images."""

    target_width: int = 800
    output_format: str = "png"
    max_pixels: int = 100_000_000
    # Memory one image may need while decoded (common.decode_budget); README: memory arithmetic.
    max_decode_mb: int = DEFAULT_MAX_DECODE_MB
    # A render that runs longer is stopped and its image fails.
    max_render_seconds: float = 30.0
    # How much lower the CPU priority (nice) of bulk renders is than interactive ones'.
    bulk_render_nice: int = 10
    # The node's local health record, which `python -m ops node-check` reads.
    health_file: str = field(
        default_factory=lambda: os.path.join(tempfile.gettempdir(), "pixelmill-worker-health.json")
    )
    processes: int = field(default_factory=usable_cores)
    prefetch: int = 64
    batch_size: int = 16
    batch_wait_ms: int = 50
    memory_mb: int = 512
    metrics_port: int = 9102
    abandoned_upload_sweep_seconds: float = 60.0
    abandoned_upload_age_seconds: float = 3600.0
    # A test hook: every batch lasts at least this long, whatever the CPU's speed. Always 0 in
    # production.
    test_hold_batch_seconds: float = 0.0
    # Upper bound on any process count, whoever asks (`engine:processes` in Redis included).
    max_processes: int = 64
    # The outputs made of every image (`RENDITIONS`); empty means the one that `target_width`
    # and `output_format` describe.
    renditions: tuple[Rendition, ...] = ()

    def __post_init__(self) -> None:
        if not self.renditions:
            defaults = default_renditions(self.target_width, self.output_format)
            object.__setattr__(self, "renditions", defaults)

    @property
    def max_decode_bytes(self) -> int:
        return self.max_decode_mb * 1024 * 1024


@dataclass(frozen=True)
class WebhookSettings:
    """Batch event deliveries (see common.webhooks)."""

    # A long random secret from which the key that encrypts signing secrets at rest is derived.
    encryption_key: str = DEVELOPMENT_WEBHOOK_KEY
    # Private, loopback and link-local targets (and plain http) are refused unless true.
    allow_private: bool = False
    # The whole of one attempt: resolving, connecting, TLS, sending and the response head.
    timeout_seconds: float = 5.0
    # A delivery is retried with backoff until it is this old, then abandoned.
    retry_hours: float = 24.0
    sweep_seconds: float = 2.0
    # The ports a callback URL may name; None: every port.
    allowed_ports: frozenset[int] | None = frozenset({80, 443})
    # Delivered and abandoned events are deleted once settled this long.
    retention_hours: float = 168.0


@dataclass(frozen=True)
class RetentionSettings:
    """How long settled work is kept before the worker nodes delete it, rows and objects
    (engine/retention.py); 0 keeps it forever. README: Retention."""

    # A finished or cancelled batch, its images and its events, this long after it settled.
    batch_days: float = 0.0
    # A completed, failed or cancelled image of no batch, this long after it last changed.
    image_days: float = 0.0
    sweep_seconds: float = 60.0
    # Images deleted per round per node (and as many empty batches).
    sweep_limit: int = 500

    @property
    def enabled(self) -> bool:
        return bool(self.batch_days or self.image_days)


@dataclass(frozen=True)
class Settings:
    """Everything a pixelmill process needs, read once at start-up."""

    postgres_url: str = "postgresql://pixelmill:pixelmill@127.0.0.1:5432/pixelmill"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "pixelmill:"
    storage: StorageSettings = field(default_factory=StorageSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    log_format: str = "text"
    server: ServerSettings = field(default_factory=ServerSettings)
    environment: str = PRODUCTION
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    @property
    def is_local(self) -> bool:
        return self.environment == LOCAL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate; a production environment also refuses well-known secrets."""
        env = _Env(os.environ if environ is None else environ)
        environment = env.choice("PIXELMILL_ENV", PRODUCTION, ENVIRONMENTS)
        if environment == PRODUCTION:
            _refuse_development_secrets(env)
        defaults = cls()
        return cls(
            postgres_url=env.url("POSTGRES_URL", defaults.postgres_url, ("postgresql", "postgres")),
            redis_url=env.url("REDIS_URL", defaults.redis_url, ("redis", "rediss")),
            redis_prefix=env.text("REDIS_PREFIX", defaults.redis_prefix),
            storage=_storage_from(env),
            queue=_queue_from(env),
            auth=_auth_from(env),
            api=_api_from(env),
            engine=_engine_from(env),
            log_format=env.choice("LOG_FORMAT", defaults.log_format, ("text", "json")),
            server=_server_from(env),
            environment=environment,
            webhooks=_webhooks_from(env),
            retention=_retention_from(env),
        )


def declare_local(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with PIXELMILL_ENV=local unless it names an environment itself: for the
    commands that only ever run the local stack (its start-up, the local issuer)."""
    return {**environ, "PIXELMILL_ENV": environ.get("PIXELMILL_ENV") or LOCAL}


def _url_password(value: str) -> str | None:
    password = urlsplit(value).password
    return None if password is None else unquote(password)


def _is_well_known(secret: str | None) -> bool:
    return secret is not None and secret.strip().lower() in WELL_KNOWN_SECRETS


def _refuse_development_secrets(env: _Env) -> None:
    """Raise ConfigError naming the first variable that still holds a development secret.

    Unset secrets count too: their defaults are the development ones. Only PIXELMILL_ENV=local
    (the local stack and the tests) skips this.
    """
    hint = "production needs its own secret (or set PIXELMILL_ENV=local for the local stack)"
    for name in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "POSTGRES_URL", "RABBITMQ_URL"):
        if env.raw(name, "") == "":
            raise ConfigError(f"{name} is not set; {hint}")
    for name in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"):
        if _is_well_known(env.raw(name, "")):
            raise ConfigError(f"{name} holds a well-known development secret; {hint}")
    for name in ("POSTGRES_URL", "RABBITMQ_URL", "REDIS_URL"):
        if _is_well_known(_url_password(env.raw(name, ""))):
            raise ConfigError(f"{name} holds a well-known development password; {hint}")
    if _url_password(env.raw("REDIS_URL", "")) in (None, ""):
        raise ConfigError(
            "REDIS_URL has no password; production Redis must require one "
            "(redis://:PASSWORD@host:6379/0 or rediss:// for TLS)"
        )
    _refuse_shared_presign_key(env, hint)
    if env.raw("WEBHOOK_ENCRYPTION_KEY", DEVELOPMENT_WEBHOOK_KEY) == DEVELOPMENT_WEBHOOK_KEY:
        raise ConfigError(
            "WEBHOOK_ENCRYPTION_KEY is not set or holds the development key; production encrypts "
            "webhook secrets with its own (for example `openssl rand -hex 24`)"
        )


def _refuse_shared_presign_key(env: _Env, hint: str) -> None:
    for name in ("MINIO_PRESIGN_ACCESS_KEY", "MINIO_PRESIGN_SECRET_KEY"):
        value = env.raw(name, "")
        if value == "":
            raise ConfigError(
                f"{name} is not set; production signs download URLs with a key that can only "
                "read the results bucket"
            )
        if _is_well_known(value):
            raise ConfigError(f"{name} holds a well-known development secret; {hint}")
    if env.raw("MINIO_PRESIGN_ACCESS_KEY", "") == env.raw("MINIO_ACCESS_KEY", ""):
        raise ConfigError(
            "MINIO_PRESIGN_ACCESS_KEY equals MINIO_ACCESS_KEY; download URLs need a key that can "
            "only read the results bucket"
        )


def _storage_from(env: _Env) -> StorageSettings:
    d = StorageSettings()
    access_key = env.text("MINIO_ACCESS_KEY", d.access_key)
    secret_key = env.text("MINIO_SECRET_KEY", d.secret_key)
    return StorageSettings(
        endpoint=env.host_port("MINIO_ENDPOINT", d.endpoint),
        access_key=access_key,
        secret_key=secret_key,
        secure=env.boolean("MINIO_SECURE", d.secure),
        region=env.text("MINIO_REGION", d.region),
        raw_bucket=env.text("MINIO_RAW_BUCKET", d.raw_bucket),
        processed_bucket=env.text("MINIO_PROCESSED_BUCKET", d.processed_bucket),
        public_endpoint=env.text("MINIO_PUBLIC_ENDPOINT", d.public_endpoint),
        presign_seconds=env.integer("PRESIGN_SECONDS", d.presign_seconds, minimum=1),
        # Production refuses a missing presign key before this point; locally it is the main one.
        presign_access_key=env.text("MINIO_PRESIGN_ACCESS_KEY", access_key),
        presign_secret_key=env.text("MINIO_PRESIGN_SECRET_KEY", secret_key),
    )


def _queue_from(env: _Env) -> QueueSettings:
    d = QueueSettings()
    queue = env.text("RABBITMQ_QUEUE", d.queue)
    return QueueSettings(
        url=env.url("RABBITMQ_URL", d.url, ("amqp", "amqps")),
        queue=queue,
        dead_letter_queue=env.text("RABBITMQ_DEAD_LETTER_QUEUE", f"{queue}.dead"),
        delivery_limit=env.integer("RABBITMQ_DELIVERY_LIMIT", d.delivery_limit, minimum=1),
        heartbeat_seconds=env.integer("RABBITMQ_HEARTBEAT_SECONDS", d.heartbeat_seconds, 1),
        dead_letter_grace_seconds=env.integer(
            "RABBITMQ_DEAD_LETTER_GRACE_SECONDS", d.dead_letter_grace_seconds
        ),
        lanes=env.boolean("RABBITMQ_LANES", d.lanes),
        bulk_shards=env.integer("RABBITMQ_BULK_SHARDS", d.bulk_shards, minimum=1),
        interactive_max_parts=env.integer("INTERACTIVE_MAX_PARTS", d.interactive_max_parts),
        interactive_images_per_minute=env.integer(
            "INTERACTIVE_IMAGES_PER_MINUTE", d.interactive_images_per_minute
        ),
    )


def _auth_from(env: _Env) -> AuthSettings:
    d = AuthSettings()
    algorithms = env.names("JWT_ALGORITHMS", ",".join(d.algorithms))
    unsafe = [a for a in algorithms if a.upper() == "NONE" or a.upper().startswith("HS")]
    if unsafe or not algorithms:
        raise ConfigError(
            f"JWT_ALGORITHMS={','.join(algorithms)!r} must list only asymmetric algorithms "
            "(RS256, PS256, ES256, ...)"
        )
    return AuthSettings(
        keycloak_url=env.url("KEYCLOAK_URL", d.keycloak_url, ("http", "https")),
        realm=env.text("KEYCLOAK_REALM", d.realm),
        client_id=env.text("KEYCLOAK_CLIENT_ID", d.client_id),
        console_client_id=env.text("CONSOLE_CLIENT_ID", d.console_client_id),
        algorithms=algorithms,
        leeway_seconds=env.integer("JWT_LEEWAY_SECONDS", d.leeway_seconds),
        jwks_refresh_seconds=env.integer("JWKS_REFRESH_SECONDS", d.jwks_refresh_seconds, 1),
        max_token_bytes=env.integer("MAX_TOKEN_BYTES", d.max_token_bytes, minimum=256),
    )


def _api_from(env: _Env) -> ApiSettings:
    d = ApiSettings()
    return ApiSettings(
        max_upload_bytes=env.integer("MAX_UPLOAD_BYTES", d.max_upload_bytes, minimum=1),
        max_bulk_parts=env.integer("MAX_BULK_PARTS", d.max_bulk_parts, minimum=1),
        max_bulk_bytes=env.integer("MAX_BULK_BYTES", d.max_bulk_bytes, minimum=1),
        idempotency_ttl_seconds=env.integer(
            "IDEMPOTENCY_TTL_SECONDS", d.idempotency_ttl_seconds, minimum=1
        ),
        max_wait_seconds=env.integer("MAX_WAIT_SECONDS", d.max_wait_seconds),
        body_timeout_seconds=env.decimal("BODY_TIMEOUT_SECONDS", d.body_timeout_seconds, 0.1),
        cache_ttl_seconds=env.integer("CACHE_TTL_SECONDS", d.cache_ttl_seconds, minimum=1),
        cors_origins=env.names("CORS_ORIGINS", ""),
        uploads_per_minute=env.integer("UPLOADS_PER_MINUTE", d.uploads_per_minute),
        batches_per_minute=env.integer("BATCHES_PER_MINUTE", d.batches_per_minute),
        body_min_bytes_per_second=env.integer(
            "BODY_MIN_BYTES_PER_SECOND", d.body_min_bytes_per_second, minimum=1
        ),
        max_uploads_per_user=env.integer("MAX_UPLOADS_PER_USER", d.max_uploads_per_user, 1),
        max_open_batches_per_user=env.integer(
            "MAX_OPEN_BATCHES_PER_USER", d.max_open_batches_per_user
        ),
    )


def _server_from(env: _Env) -> ServerSettings:
    d = ServerSettings()
    return ServerSettings(
        bind=env.text("API_BIND", d.bind),
        workers=env.integer("API_WORKERS", d.workers, minimum=1),
        threads=env.integer("API_THREADS", d.threads, minimum=1),
        metrics_dir=env.text("PROMETHEUS_MULTIPROC_DIR", d.metrics_dir),
        upload_threads=env.integer("API_UPLOAD_THREADS", d.upload_threads),
    )


def _engine_from(env: _Env) -> EngineSettings:
    d = EngineSettings()
    max_processes = env.integer("WORKER_MAX_PROCESSES", d.max_processes, minimum=1)
    processes = env.integer("WORKER_PROCESSES", min(d.processes, max_processes), minimum=1)
    if processes > max_processes:
        raise ConfigError(
            f"WORKER_PROCESSES={processes} is above WORKER_MAX_PROCESSES={max_processes}"
        )
    return EngineSettings(
        target_width=env.integer("TARGET_WIDTH", d.target_width, minimum=1),
        output_format=env.choice("OUTPUT_FORMAT", d.output_format, OUTPUT_FORMATS),
        max_pixels=env.integer("MAX_PIXELS", d.max_pixels, minimum=1),
        max_decode_mb=env.integer("MAX_DECODE_MB", d.max_decode_mb, minimum=1),
        max_render_seconds=env.decimal("MAX_RENDER_SECONDS", d.max_render_seconds, minimum=0.1),
        bulk_render_nice=env.integer("BULK_RENDER_NICE", d.bulk_render_nice),
        health_file=env.text("WORKER_HEALTH_FILE", d.health_file),
        processes=processes,
        prefetch=env.integer("WORKER_PREFETCH", d.prefetch, minimum=1),
        batch_size=env.integer("WORKER_BATCH_SIZE", d.batch_size, minimum=1),
        batch_wait_ms=env.integer("WORKER_BATCH_WAIT_MS", d.batch_wait_ms),
        memory_mb=env.integer("WORKER_MEMORY_MB", d.memory_mb, minimum=16),
        metrics_port=env.integer("METRICS_PORT", d.metrics_port),
        abandoned_upload_sweep_seconds=env.decimal(
            "ABANDONED_UPLOAD_SWEEP_SECONDS", d.abandoned_upload_sweep_seconds, minimum=0.1
        ),
        abandoned_upload_age_seconds=env.decimal(
            "ABANDONED_UPLOAD_AGE_SECONDS", d.abandoned_upload_age_seconds, minimum=1.0
        ),
        test_hold_batch_seconds=env.decimal(
            "WORKER_TEST_HOLD_BATCH_SECONDS", d.test_hold_batch_seconds
        ),
        max_processes=max_processes,
        renditions=_renditions_from(env),
    )


def _renditions_from(env: _Env) -> tuple[Rendition, ...]:
    spec = env.raw("RENDITIONS", "")
    if not spec.strip():
        return ()
    try:
        return parse_renditions(spec)
    except RenditionSpecError as exc:
        raise ConfigError(f"RENDITIONS {exc}") from None


def _webhooks_from(env: _Env) -> WebhookSettings:
    d = WebhookSettings()
    key = env.raw("WEBHOOK_ENCRYPTION_KEY", d.encryption_key)
    if len(key) < 16:
        raise ConfigError("WEBHOOK_ENCRYPTION_KEY must be at least 16 characters (use 32+ random)")
    allow_private = env.boolean("WEBHOOK_ALLOW_PRIVATE", d.allow_private)
    return WebhookSettings(
        encryption_key=key,
        allow_private=allow_private,
        timeout_seconds=env.decimal("WEBHOOK_TIMEOUT_SECONDS", d.timeout_seconds, minimum=0.1),
        retry_hours=env.decimal("WEBHOOK_RETRY_HOURS", d.retry_hours, minimum=0.01),
        sweep_seconds=env.decimal("WEBHOOK_SWEEP_SECONDS", d.sweep_seconds, minimum=0.1),
        allowed_ports=_webhook_ports(env, allow_private),
        retention_hours=env.decimal("WEBHOOK_RETENTION_HOURS", d.retention_hours, minimum=0.01),
    )


def _webhook_ports(env: _Env, allow_private: bool) -> frozenset[int] | None:
    """WEBHOOK_ALLOWED_PORTS: comma-separated ports, or `any`; unset, 80 and 443, or every port
    where private targets are allowed (local receivers listen on ports of their own)."""
    raw = env.raw("WEBHOOK_ALLOWED_PORTS", "").strip().lower()
    if raw == "any" or (raw == "" and allow_private):
        return None
    if raw == "":
        return WebhookSettings().allowed_ports
    ports = {item.strip() for item in raw.split(",") if item.strip()}
    if not ports or not all(p.isdigit() and 1 <= int(p) <= 65535 for p in ports):
        raise ConfigError(
            f"WEBHOOK_ALLOWED_PORTS={raw!r} must be comma-separated ports (1-65535) or `any`"
        )
    return frozenset(int(p) for p in ports)


def _retention_from(env: _Env) -> RetentionSettings:
    d = RetentionSettings()
    return RetentionSettings(
        batch_days=env.decimal("BATCH_RETENTION_DAYS", d.batch_days),
        image_days=env.decimal("IMAGE_RETENTION_DAYS", d.image_days),
        sweep_seconds=env.decimal("RETENTION_SWEEP_SECONDS", d.sweep_seconds, minimum=0.1),
        sweep_limit=env.integer("RETENTION_SWEEP_LIMIT", d.sweep_limit, minimum=1),
    )
