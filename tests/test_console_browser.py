"""The web console in headless Chromium, against a real API (gunicorn), worker node and local
issuer: sign in through the login form, upload a folder, follow and steer the batch, reload and
upload the same folder again. Screenshots of each step go to `.test-artifacts/console/`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from common.config import Settings
from ingest.client import (
    FileResult,
    UploadOptions,
    discover_images,
    file_sha256,
    idempotency_key,
)
from ingest.routes.console import CONSOLE_DIRECTORY, CONTENT_TYPES
from ops.issuer import LocalIssuer, running
from tests.browser import (
    artifacts,
    count,
    find,
    page_errors,
    pick_folder,
    require_chromium,
    shot,
    sign_in,
    texts,
    wait_for_text,
)
from tests.support import jpeg, png, renditions_env, served_api, start_worker, stop_worker, wait_for

# The console refreshes its token at 70 % of this lifetime: the test sees a refresh happen.
ACCESS_TOKEN_SECONDS = 8
ORDER_PROBE = Path(__file__).with_name("console_order_probe.js")
# The command-line client's files per request, which the console's requests match.
GROUP_SIZE = UploadOptions(url="", token="").batch_size
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"


@dataclass
class ConsoleStack:
    url: str
    issuer: LocalIssuer
    settings: Settings
    env: dict[str, str]
    logs: Path
    worker: Any = None

    def start_worker(self) -> None:
        # One CPU process and photos of some size: the batch is seen in progress for a while.
        self.worker = start_worker({**self.env, "WORKER_PROCESSES": "1"}, self.logs)

    @contextlib.contextmanager
    def worker_held(self) -> Iterator[None]:
        """The node stopped (SIGSTOP) and resumed afterwards: what it has committed stays."""
        os.kill(self.worker.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.worker.pid, signal.SIGCONT)


@pytest.fixture
def console_stack(
    env: dict[str, str], private_queue: Settings, own_database: Settings, tmp_path: Path
) -> Iterator[ConsoleStack]:
    """An API served by gunicorn with a local issuer of its own, on a database schema and job
    queue of this test; the test starts the worker node when it wants its images processed."""
    require_chromium()
    with running(tmp_path / "issuer", access_token_seconds=ACCESS_TOKEN_SECONDS) as issuer:
        own_env = {
            **renditions_env(env, private_queue),
            "POSTGRES_URL": own_database.postgres_url,
            "KEYCLOAK_URL": issuer.base_url,
        }
        logs = tmp_path / "stack.log"
        with served_api(own_env, logs) as (url, _):
            stack = ConsoleStack(url, issuer, Settings.from_env(own_env), own_env, logs)
            try:
                yield stack
            finally:
                if stack.worker is not None:
                    stop_worker(stack.worker)


def photo_folder(root: Path) -> Path:
    """20 files: 17 images, one JPEG cut in half (accepted, then failed by the worker) and two
    files that are not images (refused at upload)."""
    folder = root / "shop-catalogue"
    (folder / "summer").mkdir(parents=True)
    for i in range(9):
        (folder / f"photo-{i:02}.jpg").write_bytes(jpeg(1600 + i, 1200, seed=100 + i))
    for i in range(8):
        (folder / "summer" / f"beach-{i:02}.png").write_bytes(png(200, 150 + i, seed=200 + i))
    whole = jpeg(300, 200, seed=300)
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_bytes(b"not an image at all\n")
    (folder / "summer" / "animation.gif").write_bytes(GIF)
    (folder / ".DS_Store").write_bytes(b"hidden: never sent")
    return folder


def loaded_gallery(driver: Any) -> int:
    """Gallery images the browser has loaded and decoded (from their presigned S3 URLs)."""
    script = (
        "return Array.from(document.querySelectorAll('#gallery img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length;"
    )
    return int(driver.execute_script(script))


def completed_rows(settings: Settings) -> int:
    with psycopg.connect(settings.postgres_url) as conn:
        [found] = conn.execute(
            "SELECT count(*) FROM images WHERE status = 'completed'"
        ).fetchone() or [0]
        return int(found)


def image_rows(settings: Settings) -> list[tuple[str, str, int, datetime]]:
    """(filename, status, attempts, updated_at) of every image."""
    with psycopg.connect(settings.postgres_url) as conn:
        rows = conn.execute(
            "SELECT filename, status, attempts, updated_at FROM images ORDER BY filename"
        )
        return [(str(f), str(s), int(a), u) for f, s, a, u in rows.fetchall()]


def batch_count(settings: Settings) -> int:
    with psycopg.connect(settings.postgres_url) as conn:
        [found] = conn.execute("SELECT count(*) FROM batches").fetchone() or [0]
        return int(found)


def test_console_signs_in_uploads_a_folder_follows_retries_and_skips_it_after_a_reload(
    console_stack: ConsoleStack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    steps = artifacts("folder-upload")
    folder = photo_folder(tmp_path)
    browser.get(f"{console_stack.url}/console/")
    shot(browser, steps, "01-signed-out")
    sign_in(browser, "user", "password")
    shot(browser, steps, "02-signed-in")

    # Upload with no worker running, so that the batch is caught in progress afterwards.
    pick_folder(browser, folder)
    summary = wait_for_text(browser, "upload-summary-text", "Done:", timeout=120)
    assert summary == "Done: 18 uploaded, 0 already in the batch, 2 refused."
    total = find(browser, "#total-progress")[0]
    assert total.get_attribute("value") == total.get_attribute("max")
    refused = texts(browser, "#refused li")
    assert len(refused) == 2
    assert any(r.startswith("shop-catalogue/notes.txt HTTP 415") for r in refused), refused
    assert any(r.startswith("shop-catalogue/summer/animation.gif HTTP 415") for r in refused)
    shot(browser, steps, "03-uploaded")

    # The node is held once a few images are done, so that the page shows a batch in progress.
    console_stack.start_worker()
    wait_for(lambda: completed_rows(console_stack.settings) >= 3, timeout=120, interval=0.02)
    with console_stack.worker_held():
        held = completed_rows(console_stack.settings)
        wait_for(lambda: count(browser, "completed") == held, timeout=30)
        wait_for(lambda: loaded_gallery(browser) == min(held, 17), timeout=30)
        shot(browser, steps, "04-batch-in-progress")
    wait_for(lambda: count(browser, "completed") + count(browser, "failed") == 18, timeout=180)
    wait_for(lambda: len(find(browser, "#gallery img")) == 17, timeout=60)
    wait_for(
        lambda: all(
            browser.execute_script("return arguments[0].complete", i)
            for i in find(browser, "#gallery img")
        ),
        timeout=60,
    )
    # The counts are shown before the failed list is read again: wait for the list.
    [failed] = wait_for(lambda: texts(browser, "#failed li"), timeout=30)
    assert failed.startswith("broken.jpg "), failed
    shot(browser, steps, "05-processed")

    # Retried from the keyboard: the truncated image is processed a second time (and fails
    # again: only a cut file can be made to fail on purpose here). The retry makes it pending
    # with its attempts counted afresh before it answers, so failing again means processed again.
    [before] = [row for row in image_rows(console_stack.settings) if row[0] == "broken.jpg"]
    retry = find(browser, "#retry-batch")[0]
    retry.send_keys(Keys.ENTER)
    wait_for_text(browser, "batch-message", "1 failed image(s) requeued.")

    def failed_again() -> bool:
        [row] = [row for row in image_rows(console_stack.settings) if row[0] == "broken.jpg"]
        return row[1:3] == ("failed", 1) and row[3] > before[3]

    wait_for(failed_again, timeout=120)
    shot(browser, steps, "06-retried")

    wait_for(lambda: console_stack.issuer.flows.refresh_grants >= 1, timeout=60)
    assert len(image_rows(console_stack.settings)) == 18

    # A reload forgets everything; the batch chosen from the list knows what it holds.
    browser.refresh()
    sign_in(browser, "user", "password")
    wait_for(lambda: find(browser, "#batches li button"), timeout=30)
    [listed] = find(browser, "#batches li button")
    assert "shop-catalogue" in listed.text and "open" in listed.text
    listed.click()
    wait_for_text(browser, "upload-target", "Files go into the open batch shop-catalogue")
    pick_folder(browser, folder)
    summary = wait_for_text(browser, "upload-summary-text", "Done:", timeout=120)
    assert summary == "Done: 0 uploaded, 18 already in the batch, 2 refused."
    assert len(texts(browser, "#refused li")) == 2
    shot(browser, steps, "07-second-upload-skipped")
    assert len(image_rows(console_stack.settings)) == 18, "nothing was uploaded twice"
    assert batch_count(console_stack.settings) == 1

    browser.set_window_size(390, 900)
    wide = browser.execute_script("return document.documentElement.scrollWidth > innerWidth")
    shot(browser, steps, "08-phone-width")
    assert not wide, "the console scrolls sideways at phone width"
    assert page_errors(browser) == []


def test_console_orders_picked_and_dropped_files_and_derives_keys_as_the_cli(
    console_stack: ConsoleStack, browser: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    for i, name in enumerate(
        ["a b.jpg", "a/b.jpg", "a/c/d.jpg", "a-c.jpg", "B.jpg", "\u00e4.jpg", "z.jpg", "a.jpg"]
        + [f"many/{n:02}.jpg" for n in range(12)]
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg(16, 16, seed=500 + i))
    chosen, refused = discover_images([folder])
    assert not refused
    files = [FileResult(p, p.name, file_sha256(p)[0], p.stat().st_size) for p in chosen]
    groups = [files[i : i + GROUP_SIZE] for i in range(0, len(files), GROUP_SIZE)]
    expected_keys = [idempotency_key("bulk", group, "BATCH-ID") for group in groups]

    browser.get(f"{console_stack.url}/console/")
    browser.execute_script(
        "const input = document.createElement('input');"
        "input.type = 'file'; input.id = 'probe'; input.multiple = true;"
        "input.webkitdirectory = true; document.body.append(input);"
    )
    find(browser, "#probe")[0].send_keys(str(folder))
    seen = browser.execute_async_script(ORDER_PROBE.read_text(), GROUP_SIZE)
    relative = [str(p.relative_to(tmp_path)) for p in chosen]
    assert seen["paths"] == relative
    assert seen["dropped"] == relative, "a dropped folder is walked and ordered alike"
    assert seen["keys"] == expected_keys


def archive_route_served(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=10) as response:
        return "/api/v1/batches/{batch_id}/archive" in response.read().decode()


def test_console_downloads_the_batch_archive(
    console_stack: ConsoleStack, browser: Any, tmp_path: Path
) -> None:
    if not archive_route_served(console_stack.url):
        pytest.skip("the API has no batch archive route (GET /api/v1/batches/{id}/archive) yet")
    steps = artifacts("archive")
    folder = tmp_path / "three"
    folder.mkdir()
    for i in range(3):
        (folder / f"picture-{i}.jpg").write_bytes(jpeg(240, 160, seed=400 + i))
    console_stack.start_worker()
    browser.get(f"{console_stack.url}/console/")
    sign_in(browser, "admin", "admin")
    pick_folder(browser, folder)
    wait_for_text(browser, "upload-summary-text", "Done: 3 uploaded", timeout=120)
    wait_for(lambda: count(browser, "completed") == 3, timeout=180)
    find(browser, "#download-archive")[0].click()
    wait_for_text(browser, "batch-message", "Archive saved", timeout=120)
    saved = wait_for(lambda: next((p for p in browser.downloads.glob("*.zip")), None), timeout=60)
    shot(browser, steps, "archive-downloaded")
    with contextlib.closing(zipfile.ZipFile(io.BytesIO(saved.read_bytes()))) as archive:
        assert archive.testzip() is None, "every entry's CRC matches its bytes"
        pictures = {n: archive.read(n) for n in archive.namelist() if n.startswith("picture-")}
    assert sorted(pictures) == ["picture-0.png", "picture-1.png", "picture-2.png"]
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in pictures.values())


class _FlakyUploads(BaseHTTPRequestHandler):
    """The console's files, and an upload route that answers each request 503 (Retry-After: 1),
    then 429 (Retry-After: 1), then drops the connection, and only then accepts it (207)."""

    server: Any

    def do_GET(self) -> None:
        path = CONSOLE_DIRECTORY / self.path.split("?")[0].removeprefix("/console/")
        if path.parent != CONSOLE_DIRECTORY or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES[path.suffix])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        key = self.headers["Idempotency-Key"]
        attempts = self.server.attempts.setdefault(key, [])
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            self._answer(503 if len(attempts) == 1 else 429, {"error": {"code": "busy"}}, "1")
        elif len(attempts) == 3:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            parts = body.count(b'name="image"')
            items = [
                {"index": i, "status": 201, "id": f"id-{i}", "image": {"id": f"id-{i}"}}
                for i in range(parts)
            ]
            self._answer(207, {"items": items})

    def _answer(self, status: int, document: dict[str, Any], retry_after: str = "") -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_console_uploads_retry_503_429_and_lost_answers_and_wait_for_retry_after(
    browser: Any,
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyUploads)
    server.attempts = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/console/callback.html")
        states = browser.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            (async () => {
              const { LocalFile, hashFiles } = await import("./files.js");
              const { UploadRun } = await import("./upload.js");
              const { RetryPolicy } = await import("./api.js");
              const files = Array.from({ length: 20 }, (_, i) =>
                new LocalFile(new File([`bytes of ${i}`], `f${i}.jpg`), `f${i}.jpg`));
              await hashFiles(files, () => {});
              const session = { bearer: async () => "token", refresh: async () => {} };
              const policy = new RetryPolicy({ baseSeconds: 0.05, capSeconds: 0.2 });
              const run = new UploadRun(session, "BATCH", files, new Set(), policy);
              await run.run();
              done(run.files.map((f) => f.state));
            })();
            """
        )
    finally:
        server.shutdown()
        server.server_close()
    assert states == ["accepted"] * 20
    assert len(server.attempts) == 2, "two requests: 16 files, then 4"
    for attempts in server.attempts.values():
        assert len(attempts) == 4
        assert attempts[1] - attempts[0] >= 1 and attempts[2] - attempts[1] >= 1, "Retry-After"
