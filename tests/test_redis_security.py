"""Redis is not trusted: a forged cache entry never widens who sees an image, a desired process
count is capped by the node's own maximum, and Redis with a password and with TLS works."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.cache import ImageCache, cache_signing_key, image_cache_key
from common.config import ConfigError, QueueSettings, Settings
from engine.control import NodeControl, NodeCounters, desired_processes_key
from ops.issuer import LocalIssuer
from tests.support import ApiClient, api_for, free_port, jpeg, wait_for

PASSWORD = "a-password-only-this-test-knows"
SIGNING_KEY = cache_signing_key("the-s3-secret-of-this-test")


# --- a private redis-server -----------------------------------------------------------------


class RedisServer:
    """A throwaway `redis-server` on a free port, with the given extra arguments."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self._log_path = log_path
        self._args = args
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, port_flag: str = "--port") -> None:
        command = [
            "redis-server",
            *(("--port", "0") if port_flag != "--port" else ()),
            *(port_flag, str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *self._args,
        ]
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis.log", "--requirepass", PASSWORD)
    server.start()
    wait_for(lambda: _answers(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"), timeout=10)
    yield server
    server.stop()


def _document(image_id: str, owner: str) -> dict[str, Any]:
    return {"id": image_id, "owner": owner, "status": "completed", "result": None}


# --- a forged cache entry -------------------------------------------------------------------


def test_forged_cache_entry_naming_another_owner_is_a_miss_and_the_row_decides(
    private_queue: Settings, issuer: LocalIssuer, user_id: str
) -> None:
    """On a queue no worker consumes: the row stays `pending`, with no download."""
    with api_for(private_queue, issuer.mint_token(user_id, ("user",))) as api:
        image_id = api.upload(jpeg(64, 48)).json["id"]
        attacker_sub = f"user-{uuid.uuid4()}"
        attacker = ApiClient(api.client.app, issuer.mint_token(attacker_sub, ("user",)))
        forged = {
            **_document(image_id, attacker_sub),
            "result": {"key": f"results/{image_id}.png", "content_type": "image/png"},
        }
        client = redis.Redis.from_url(private_queue.redis_url)
        cache_key = image_cache_key(private_queue.redis_prefix, image_id)
        client.set(cache_key, json.dumps(forged), ex=60)

        seen_by_attacker = attacker.get(f"/api/v1/images/{image_id}")
        seen_by_owner = api.get(f"/api/v1/images/{image_id}")

    assert seen_by_attacker.status_code == 404
    assert "download_url" not in seen_by_attacker.text
    assert seen_by_attacker.headers["X-Cache"] == "miss"
    assert seen_by_owner.status_code == 200
    assert seen_by_owner.json["owner"] != attacker_sub
    assert seen_by_owner.json["download_url"] is None


def test_cache_serves_only_entries_it_wrote_for_that_very_image(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    cache = ImageCache(client, f"{settings.redis_prefix}integrity:", SIGNING_KEY)
    mine, other = uuid.uuid4(), uuid.uuid4()
    cache.put(mine, _document(str(mine), "alice"), ttl_seconds=60)
    genuine = client.get(image_cache_key(f"{settings.redis_prefix}integrity:", mine))
    assert genuine is not None
    assert cache.get(mine) == _document(str(mine), "alice")

    # A genuine entry copied under another image's key.
    client.set(image_cache_key(f"{settings.redis_prefix}integrity:", other), genuine, ex=60)
    assert cache.get(other) is None
    # The same entry with its owner rewritten.
    tampered = json.loads(genuine)
    tampered["document"] = tampered["document"].replace('"alice"', '"mallory"')
    client.set(image_cache_key(f"{settings.redis_prefix}integrity:", mine), json.dumps(tampered))
    assert cache.get(mine) is None
    # An entry signed with another key (another deployment, or a guessed one).
    stranger = ImageCache(client, f"{settings.redis_prefix}integrity:", cache_signing_key("x"))
    stranger.put(mine, _document(str(mine), "mallory"), ttl_seconds=60)
    assert cache.get(mine) is None


# --- the desired process count --------------------------------------------------------------


def test_desired_process_count_from_redis_is_capped_by_the_node_maximum(
    settings: Settings,
) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    prefix = f"{settings.redis_prefix}clamp-{uuid.uuid4().hex[:6]}:"
    resized: list[int] = []
    control = NodeControl(
        client,
        prefix,
        QueueSettings(url=settings.queue.url, queue=f"absent-{uuid.uuid4().hex}"),
        lambda: NodeCounters(processes=resized[-1] if resized else 2),
        resized.append,
        max_processes=4,
    )
    try:
        client.set(desired_processes_key(prefix), "5000")
        control.tick(1)
        control.tick(2)  # a second look at the same request changes nothing more
        client.set(desired_processes_key(prefix), "3")
        control.tick(3)
    finally:
        client.delete(desired_processes_key(prefix), *client.keys(f"{prefix}*"))

    assert resized == [4, 3]


def test_worker_processes_above_the_maximum_stop_start_up() -> None:
    environ = {"PIXELMILL_ENV": "local", "WORKER_PROCESSES": "9", "WORKER_MAX_PROCESSES": "8"}
    with pytest.raises(ConfigError, match="WORKER_PROCESSES=9 is above WORKER_MAX_PROCESSES=8"):
        Settings.from_env(environ)
    assert Settings.from_env({"PIXELMILL_ENV": "local", "WORKER_MAX_PROCESSES": "1"}).engine == (
        Settings.from_env(
            {"PIXELMILL_ENV": "local", "WORKER_MAX_PROCESSES": "1", "WORKER_PROCESSES": "1"}
        ).engine
    )


# --- Redis with a password ------------------------------------------------------------------


def test_cache_works_with_a_password_and_stores_nothing_without_it(
    password_redis: RedisServer,
) -> None:
    with_password = f"redis://:{PASSWORD}@127.0.0.1:{password_redis.port}/0"
    without = f"redis://127.0.0.1:{password_redis.port}/0"
    image_id = uuid.uuid4()
    anonymous = ImageCache.from_url(without, "pm:", SIGNING_KEY)
    anonymous.put(image_id, _document(str(image_id), "alice"), ttl_seconds=60)

    authenticated = ImageCache.from_url(with_password, "pm:", SIGNING_KEY)
    assert authenticated.get(image_id) is None  # the anonymous write was refused
    authenticated.put(image_id, _document(str(image_id), "alice"), ttl_seconds=60)

    assert authenticated.get(image_id) == _document(str(image_id), "alice")
    assert anonymous.get(image_id) is None
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(without).get(image_cache_key("pm:", image_id))


# --- Redis over TLS -------------------------------------------------------------------------


def _write_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 that it signed: (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pixelmill test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    ca, cert, key = _write_ca_and_server_cert(tmp_path)
    server = RedisServer(
        tmp_path / "redis-tls.log",
        *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"),
        *("--requirepass", PASSWORD),
    )
    server.start(port_flag="--tls-port")
    url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_ca_certs={ca}"
    try:
        wait_for(lambda: _answers(url), timeout=10)
    except AssertionError:
        server.stop()
        if "TLS" in server.log() and "not" in server.log():
            pytest.skip(f"this redis-server was built without TLS: {server.log()[-300:]}")
        raise
    yield server, ca
    server.stop()


def test_cache_works_over_tls_that_verifies_the_server_certificate(
    tls_redis: tuple[RedisServer, Path],
) -> None:
    server, ca = tls_redis
    verified = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_ca_certs={ca}"
    production = {
        "POSTGRES_URL": "postgresql://pixelmill:Vq9w-pg-2f1@postgres:5432/pixelmill",
        "RABBITMQ_URL": "amqps://pixelmill:Tz8s-mq-0c4@rabbitmq:5671/%2F",
        "MINIO_ACCESS_KEY": "pixelmill-app",
        "MINIO_SECRET_KEY": "Kd7x-app-5e9",
        "MINIO_PRESIGN_ACCESS_KEY": "pixelmill-results-reader",
        "MINIO_PRESIGN_SECRET_KEY": "Hn2p-reader-3b8",
        "WEBHOOK_ENCRYPTION_KEY": "6c1f0e9a2b7d4c3e8f5a1b2c3d4e5f60",
        "REDIS_URL": verified,
    }
    settings = Settings.from_env(production)
    image_id = uuid.uuid4()
    cache = ImageCache.from_url(settings.redis_url, "pm:", SIGNING_KEY)

    cache.put(image_id, _document(str(image_id), "alice"), ttl_seconds=60)

    assert cache.get(image_id) == _document(str(image_id), "alice")
    # Without the CA the server is not trusted, and plain TCP gets no answer.
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0").ping()
    assert not _answers(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0")
