"""Test helpers: building multipart bodies and images, calling the API, inspecting the stack.

Helpers that benchmarks need too live in the package and are re-exported here, so that a test
module finds every helper in this one place: waiting (common.waiting), worker nodes
(ops.worker_process), free ports (ops.tcp_proxy), the multipart encoder (ingest.client); queue
depth and deletion are in common.broker, throwaway schemas in db.schemas."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import falcon.testing
import numpy as np
import psycopg
import pytest
from minio import Minio

from common.broker import JobPublisher, ensure_topology
from common.config import Settings
from common.jobs import JobMessage
from common.storage import ObjectStore, original_key
from common.waiting import wait_for as wait_for
from db import images
from db.images import NewImage
from db.pool import Database
from engine.webhooks import WebhookDeliverer
from ingest.client import FormPart, encode_multipart
from ops.keycloak_server import ADMIN_USER, DEMO_FILE, REALM_FILE, password_grant
from ops.services import LOCAL_TEST_POSTGRES_URL
from ops.tcp_proxy import free_port as free_port
from ops.worker_process import start_worker as start_worker
from ops.worker_process import stop_worker as stop_worker

ROOT = Path(__file__).resolve().parent.parent
BASE_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", LOCAL_TEST_POSTGRES_URL)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
S3_ACCESS_KEY = "pixelmill-test"
S3_SECRET_KEY = "pixelmill-test-secret"
# What an operator must set before `docker compose` accepts compose.yaml (its comment lists them).
COMPOSE_SECRETS = {
    name: f"test-{name.lower().replace('_', '-')}-0f3c9a"
    for name in (
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "RABBITMQ_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "MINIO_APP_SECRET_KEY",
        "MINIO_PRESIGN_SECRET_KEY",
        "KEYCLOAK_ADMIN_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "WEBHOOK_ENCRYPTION_KEY",
    )
}


def multipart(
    parts: list[tuple[str, str | None, bytes, str]], boundary: str = "pmboundary42"
) -> tuple[bytes, str]:
    """Encode (field, filename, data, content type) parts; filename None makes a plain field.
    Malformed bodies for hostile-input tests are written out by hand where they are used."""
    chunks, content_type = encode_multipart(
        (FormPart(name, data, filename, part_type) for name, filename, data, part_type in parts),
        boundary,
    )
    return b"".join(chunks), content_type


def photo(width: int, height: int, seed: int = 1) -> np.ndarray:
    """A BGR image with gradients, shapes and texture, so codecs behave as on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [x / max(width, 1) * 255, y / max(height, 1) * 255, (x + y) / max(width + height, 1) * 255],
        axis=-1,
    )
    image += rng.normal(0, 6, image.shape)
    out = np.clip(image, 0, 255).astype(np.uint8)
    cv2.circle(out, (width // 2, height // 2), max(1, min(width, height) // 4), (20, 200, 60), -1)
    return out


def jpeg(width: int, height: int, seed: int = 1) -> bytes:
    ok, encoded = cv2.imencode(".jpg", photo(width, height, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def png(width: int, height: int, *, alpha: bool = False, seed: int = 1) -> bytes:
    image = photo(width, height, seed)
    if alpha:
        transparency = np.full((height, width, 1), 255, np.uint8)
        transparency[:, : width // 2] = 0
        image = np.concatenate([image, transparency], axis=-1)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def tall_strip_png(width: int = 200, height: int = 20000) -> bytes:
    """A small gray PNG (under 50 KB) of a very tall strip: a 200 px wide rendition of it is 20000
    px tall, past WebP's size limit."""
    rows = np.linspace(0, 255, height, dtype=np.float32).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", np.repeat(rows[:, None], width, axis=1))
    assert ok
    return encoded.tobytes()


def without_adobe_marker(data: bytes) -> bytes:
    """The JPEG without its APP14 Adobe segment: its CMYK values then read as ink, uninverted."""
    at = data.index(b"\xff\xee")
    return data[:at] + data[at + 2 + int.from_bytes(data[at + 2 : at + 4], "big") :]


class ApiClient:
    """The Falcon app driven through falcon.testing, with a bearer token."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.client = falcon.testing.TestClient(app)
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**headers, **(extra or {})}

    def upload(self, data: bytes, filename: str = "photo.jpg", field: str = "image"):
        body, content_type = multipart([(field, filename, data, "application/octet-stream")])
        return self.post_raw("/api/v1/upload", body, content_type)

    def post_raw(self, path: str, body: bytes, content_type: str, **headers: str):
        return self.client.simulate_post(
            path, body=body, headers=self.headers({"Content-Type": content_type, **headers})
        )

    def get(self, path: str, **params: Any):
        return self.client.simulate_get(path, headers=self.headers(), params=params or None)

    def delete(self, path: str):
        return self.client.simulate_delete(path, headers=self.headers())


class StackProbe:
    """Looks directly at the database, buckets and queue, as a test's witness."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        s = settings.storage
        self.s3 = Minio(s.endpoint, s.access_key, s.secret_key, secure=s.secure, region=s.region)

    def rows_for(self, owner: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.postgres_url) as conn:
            return conn.execute(
                "SELECT id, status, error, result_key FROM images WHERE owner = %s", (owner,)
            ).fetchall()

    def attempts(self, image_id: str | uuid.UUID) -> int:
        """How many times a worker claimed the image (a requeued batch claims it again)."""
        with psycopg.connect(self.settings.postgres_url) as conn:
            row = conn.execute("SELECT attempts FROM images WHERE id = %s", (image_id,)).fetchone()
        assert row is not None, f"no image {image_id}"
        return int(row[0])

    def status(self, image_id: str | uuid.UUID) -> str | None:
        with psycopg.connect(self.settings.postgres_url) as conn:
            row = conn.execute("SELECT status FROM images WHERE id = %s", (image_id,)).fetchone()
        return None if row is None else row[0]

    def updated_at(self, image_id: str | uuid.UUID) -> Any:
        with psycopg.connect(self.settings.postgres_url) as conn:
            row = conn.execute(
                "SELECT updated_at FROM images WHERE id = %s", (image_id,)
            ).fetchone()
        return None if row is None else row[0]

    def object_keys(self, bucket: str) -> set[str]:
        return {o.object_name for o in self.s3.list_objects(bucket, recursive=True)}

    def originals(self) -> set[str]:
        return self.object_keys(self.settings.storage.raw_bucket)

    def results(self) -> set[str]:
        return self.object_keys(self.settings.storage.processed_bucket)

    def result_bytes(self, key: str) -> bytes:
        response = self.s3.get_object(self.settings.storage.processed_bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def upload_intents(self) -> set[uuid.UUID]:
        """Image ids announced as being stored and not yet released (see `upload_intents`)."""
        with psycopg.connect(self.settings.postgres_url) as conn:
            return {row[0] for row in conn.execute("SELECT image_id FROM upload_intents")}


@contextlib.contextmanager
def api_for(settings: Settings, token: str | None) -> Iterator[ApiClient]:
    """The app built as gunicorn builds it, on `settings` (a schema or options of a test's own)."""
    from ingest.app import Dependencies, create_app

    deps = Dependencies.connect(settings)
    try:
        yield ApiClient(create_app(settings, deps), token)
    finally:
        deps.close()


# Three renditions, the first gray PNG and two colour ones of other formats and sizes.
API_RENDITIONS = "default:800:gray:png, thumb:200:color:webp:80, preview:1000:color:jpeg:80"


def renditions_env(env: dict[str, str], queue: Settings) -> dict[str, str]:
    """`env` for an API or node configured with API_RENDITIONS, on the queue and Redis prefix of
    `queue` (a `private_queue`)."""
    return {
        **env,
        "RABBITMQ_QUEUE": queue.queue.queue,
        "REDIS_PREFIX": queue.redis_prefix,
        "RENDITIONS": API_RENDITIONS,
    }


@contextlib.contextmanager
def renditions_stack(
    env: dict[str, str], queue: Settings, tmp_path: Path, issuer: Any, user: str
) -> Iterator[ApiClient]:
    """The API (as `user`) and a worker node configured with API_RENDITIONS, on the queue and
    Redis prefix of `queue` (a `private_queue`)."""
    from ingest.app import Dependencies, create_app

    own_env = renditions_env(env, queue)
    own = Settings.from_env(own_env)
    worker = start_worker(own_env, tmp_path / "worker.log")
    deps = Dependencies.connect(own)
    try:
        yield ApiClient(create_app(own, deps), issuer.mint_token(user, ("user",)))
    finally:
        deps.close()
        stop_worker(worker)


def renditions_once_made(api: ApiClient, image_id: str, count: int) -> list[str]:
    """The names of the image's renditions once it is completed with `count` of them (a
    de-duplicated upload adding what it lacked)."""

    def made() -> list[str] | None:
        body = api.get(f"/api/v1/images/{image_id}").json
        names = [r["name"] for r in body["renditions"]]
        return names if body["status"] == "completed" and len(names) == count else None

    found: list[str] = wait_for(made, timeout=120)
    return found


def completed_image(api: ApiClient, image_id: str) -> dict[str, Any]:
    """The image's document once it is terminal with its renditions listed; fails unless it
    completed."""

    def done() -> dict[str, Any] | None:
        body = api.get(f"/api/v1/images/{image_id}").json
        return body if body["status"] in ("completed", "failed") and body["renditions"] else None

    body = wait_for(done, timeout=120)
    assert body["status"] == "completed", body
    return body


@dataclasses.dataclass
class OwnStack:
    """An API and worker nodes on a job queue and Redis prefix of their own: what this stack
    queues waits until the test starts a node (see the `own_stack` fixture)."""

    env: dict[str, str]
    settings: Settings
    api: ApiClient
    logs: Path
    nodes: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    def start_node(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """A node with flags `args`, its environment overlaid by `env`."""
        node = start_worker({**self.env, **env}, self.logs, *args)
        self.nodes.append(node)
        return node

    def stop_nodes(self) -> None:
        for node in self.nodes:
            stop_worker(node)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def served_api(
    env: dict[str, str], log_path: Path, *args: str, **overrides: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real gunicorn (`python -m ingest.serve ARGS`) on a free port; stopped with SIGTERM,
    which must end it cleanly."""
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ingest.serve", "--bind", f"127.0.0.1:{port}", *args],
            cwd=ROOT,
            env={**os.environ, **env, **overrides},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: process.poll() is not None or _answers(f"{base}/health"), 60)
        if process.poll() is not None or not _answers(f"{base}/health"):
            raise AssertionError(f"the API did not start:\n{log_path.read_text()[-3000:]}")
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# Inputs that make a CPU process misbehave, for tests of the CPU pool and the batch pipeline
# (see `render_or_misbehave`). Each marker starts the image's bytes.
CRASH_MARKER = b"PIXELMILL-TEST-CRASH"
HANG_MARKER = b"PIXELMILL-TEST-HANG"
FAIL_MARKER = b"PIXELMILL-TEST-RAISE"
PAUSE_MARKER = b"PIXELMILL-TEST-PAUSE:"


def paused(image: bytes, gate: Path) -> bytes:
    """`image` made to wait in its CPU process: it appends a line to `gate/started`, waits until
    `gate/release` exists, then renders as usual."""
    return PAUSE_MARKER + bytes(gate) + b"\n" + image


def render_or_misbehave(task: Any) -> Any:
    """A render function for the CPU pool (it runs in the CPU process): inputs starting with
    CRASH_MARKER kill their process, HANG_MARKER never finish, FAIL_MARKER raise, PAUSE_MARKER
    wait (see `paused`); anything else is rendered as in production."""
    from engine.cpu_pool import input_view, render_slot

    view = input_view(task)
    head = bytes(view[: min(task.input_length, 4096)])
    if head.startswith(CRASH_MARKER):
        os.kill(os.getpid(), signal.SIGKILL)
    if head.startswith(HANG_MARKER):
        time.sleep(3600)
    if head.startswith(FAIL_MARKER):
        raise RuntimeError("a bug in the render function")
    if head.startswith(PAUSE_MARKER):
        gate = Path(head[len(PAUSE_MARKER) : head.index(b"\n")].decode())
        with (gate / "started").open("a") as started:
            started.write(f"{os.getpid()}\n")
        while not (gate / "release").exists():
            time.sleep(0.01)
        skip = head.index(b"\n") + 1
        image = bytes(view[skip : task.input_length])
        view[: len(image)] = image
        task = dataclasses.replace(task, input_length=len(image))  # its renditions kept
    return render_slot(task)


@contextlib.contextmanager
def running_node(settings: Settings, tmp_path: Path, **engine: object) -> Iterator[Any]:
    """A worker node in this process whose CPU processes misbehave on marked inputs (see
    `render_or_misbehave`), with engine settings `engine` overlaid; stopped on exit."""
    from engine.node import WorkerNode

    tuned = dataclasses.replace(
        settings,
        engine=dataclasses.replace(
            settings.engine, processes=2, health_file=str(tmp_path / "health.json"), **engine
        ),
    )
    node = WorkerNode(tuned, render=render_or_misbehave)
    thread = threading.Thread(target=node.run, name="node-under-test", daemon=True)
    thread.start()
    try:
        yield node
    finally:
        node.stop()
        thread.join(timeout=120)
        assert not thread.is_alive(), "the node did not stop"


class PendingJobs:
    """Pending images as the API leaves them (row and original, whatever the bytes), and the
    job messages that start their processing, on `settings`' queue."""

    def __init__(self, settings: Settings, owner: str) -> None:
        self.owner = owner
        self._db = Database(settings.postgres_url, max_size=2)
        self._store = ObjectStore(settings.storage)
        self._publisher = JobPublisher(settings.queue)
        ensure_topology(settings.queue)

    def pending(self, original: bytes) -> uuid.UUID:
        image_id = uuid.uuid4()
        key = original_key(image_id)
        self._store.put_original(key, original, "image/jpeg")
        digest = hashlib.sha256(original).hexdigest()
        row = NewImage(
            image_id, self.owner, "photo.jpg", "image/jpeg", len(original), digest, 900, 600, key
        )
        with self._db.transaction() as conn:
            images.insert_images(conn, [row])
            images.mark_enqueued(conn, [image_id])
        return image_id

    def publish(self, image_ids: list[uuid.UUID]) -> None:
        self._publisher.publish([JobMessage(i, f"req-{i.hex[:8]}") for i in image_ids])

    def close(self) -> None:
        self._publisher.close()
        self._db.close()


class PoolUnderTest:
    """A CPU pool of `processes` with small arenas of its own, and a way to render bytes
    through it as the batch pipeline does (input slot in, output slot out)."""

    def __init__(
        self,
        options: Any,
        render: Any,
        *,
        processes: int = 2,
        slots: int = 4,
        input_slot_bytes: int = 2 * 1024 * 1024,
        output_slot_bytes: int = 1024 * 1024,
        bulk_nice: int = 0,
    ) -> None:
        from engine.cpu_pool import KernelPool
        from engine.slots import SlotArena

        self.inputs = SlotArena(slots, input_slot_bytes)
        self.outputs = SlotArena(slots, output_slot_bytes)
        self.pool = KernelPool(
            processes,
            (self.inputs.name, self.inputs.slot_bytes),
            (self.outputs.name, self.outputs.slot_bytes),
            options,
            render=render,
            bulk_nice=bulk_nice,
        )

    def render(
        self, data: bytes, timeout: float | None = None, *, urgent: bool = False
    ) -> tuple[Any, bytes]:
        """The result and the output bytes of rendering `data`."""
        from engine.cpu_pool import RenderTask

        in_slot, out_slot = self.inputs.acquire(), self.outputs.acquire()
        try:
            view = self.inputs.view(in_slot)
            view[: len(data)] = data
            view.release()
            result = self.pool.render(
                RenderTask(in_slot, len(data), out_slot), timeout, urgent=urgent
            )
            output = self.outputs.view(out_slot)
            try:
                return result, bytes(output[: result.output_length])
            finally:
                output.release()
        finally:
            self.inputs.release(in_slot)
            self.outputs.release(out_slot)

    def close(self) -> None:
        self.pool.close()
        self.inputs.close()
        self.outputs.close()


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process, then its children (a worker node's CPU processes, gunicorn's workers),
    as a machine losing power would: none of their clean-up code runs."""
    children = subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    process.kill()
    process.wait()
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), signal.SIGKILL)


# The bootstrap admin password of the tests' Keycloak (a throwaway server on loopback).
KEYCLOAK_TEST_ADMIN_PASSWORD = "keycloak-test-admin"


class KeycloakAdmin:
    """Keycloak's admin REST API as the bootstrap admin of the master realm, for tests that
    change realms, clients, users and keys."""

    def __init__(self, base_url: str, password: str = KEYCLOAK_TEST_ADMIN_PASSWORD) -> None:
        self.base_url = base_url.rstrip("/")
        self.password = password

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """`method` on /admin/realms`path`; the parsed JSON answer, or None when it has none."""
        token = password_grant(self.base_url, "master", "admin-cli", ADMIN_USER, self.password)
        request = urllib.request.Request(
            f"{self.base_url}/admin/realms{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {token['access_token']}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = response.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from exc
        return json.loads(answer) if answer else None

    def client_uuid(self, realm: str, client_id: str) -> str:
        [client] = self.call("GET", f"/{realm}/clients?clientId={client_id}")
        return str(client["id"])

    def update_client(self, realm: str, client_id: str, changes: dict[str, Any]) -> None:
        uuid_ = self.client_uuid(realm, client_id)
        client = self.call("GET", f"/{realm}/clients/{uuid_}")
        merged = {**client, **changes, "attributes": {**client.get("attributes", {})}}
        merged["attributes"].update(changes.get("attributes", {}))
        self.call("PUT", f"/{realm}/clients/{uuid_}", merged)

    def add_user(self, realm: str, username: str, password: str, roles: list[str]) -> None:
        user = {
            "username": username,
            "enabled": True,
            "emailVerified": True,
            "firstName": username,
            "lastName": "Test",
            "email": f"{username}@pixelmill.invalid",
            "credentials": [{"type": "password", "value": password, "temporary": False}],
        }
        self.call("POST", f"/{realm}/users", user)
        if roles:
            [found] = self.call("GET", f"/{realm}/users?username={username}&exact=true")
            mappings = [self.call("GET", f"/{realm}/roles/{role}") for role in roles]
            self.call("POST", f"/{realm}/users/{found['id']}/role-mappings/realm", mappings)

    def copy_of_realm_file(self, name: str, *, demo: bool) -> str:
        """A new realm `name` from the realm file compose imports, as an import would make it;
        with `demo`, also its demo users and password logins on the API's client, as
        demo_users.sh adds them."""
        realm = {**json.loads(REALM_FILE.read_text()), "realm": name}
        if demo:
            realm["users"] = json.loads(DEMO_FILE.read_text())["users"]
            realm["clients"] = [{**c, "directAccessGrantsEnabled": True} for c in realm["clients"]]
        self.call("POST", "", realm)
        return name


# --- Webhook receivers and the deliverer, for tests of webhook deliveries --------------------


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP endpoint answering each POST with the next of `answers` (the last one repeats)."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.requests: list[Received] = []
        self.answers = answers or [(204, {})]
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(Received(self.path, dict(self.headers), body))
                turn = min(len(receiver.requests), len(receiver.answers)) - 1
                status, headers = receiver.answers[turn]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.requests]


class TricklingReceiver:
    """A hostile endpoint: reads each request, then answers one byte every `interval` s of a
    response head that never ends, until the test lets go (`release`) or the sender hangs up.
    Counts the connections it holds and those the sender closed."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.accepted = 0
        self.hung_up = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def held(self) -> int:
        """Connections open now: accepted, not hung up on by the sender."""
        with self._lock:
            return self.accepted - self.hung_up

    def release(self) -> None:
        """Stop trickling: every connection is closed from this side."""
        self._released.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._released.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nX-Pad: "
        with conn:
            conn.recv(65536)
            conn.setblocking(False)
            for sent in itertools.count():
                if self._released.wait(self.interval):
                    return
                if self._sender_hung_up(conn):
                    with self._lock:
                        self.hung_up += 1
                    return
                with contextlib.suppress(BlockingIOError):
                    conn.send(head[sent : sent + 1] or b"a")

    @staticmethod
    def _sender_hung_up(conn: socket.socket) -> bool:
        try:
            return conn.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


def create_batch(api: ApiClient, **fields: Any) -> dict[str, Any]:
    response = api.client.simulate_post("/api/v1/batches", json=fields, headers=api.headers())
    assert response.status_code == 201, response.text
    return response.json


def close_batch(api: ApiClient, batch_id: str) -> None:
    response = api.client.simulate_post(f"/api/v1/batches/{batch_id}/close", headers=api.headers())
    assert response.status_code == 200, response.text


@contextlib.contextmanager
def deliverer_on(settings: Settings, **options: Any) -> Iterator[WebhookDeliverer]:
    """A deliverer as worker nodes run it, driven round by round by the test."""
    db = Database(settings.postgres_url)
    try:
        yield WebhookDeliverer(db, settings.webhooks, **options)
    finally:
        db.close()


def unzip_accepts(archive: bytes, tmp_path: Path) -> None:
    """Info-ZIP's `unzip -t` finds no error in `archive` (skips where unzip is missing)."""
    if shutil.which("unzip") is None:
        pytest.skip("unzip is not installed (make test installs it)")
    path = tmp_path / "archive.zip"
    path.write_bytes(archive)
    result = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors detected" in result.stdout
