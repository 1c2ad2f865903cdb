"""The upload client (`ingest.client`) against a real gunicorn API and a real worker node:
folders with good and bad files, restarts that upload nothing twice, waiting and downloading."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from common.config import Settings
from ingest.client import JOURNAL_NAME, UploadOptions, UploadReport, upload_files
from ops.issuer import LocalIssuer
from tests.support import (
    ROOT,
    StackProbe,
    jpeg,
    png,
    renditions_env,
    served_api,
    start_worker,
    stop_worker,
)

GOOD_FILES = ("a.jpg", "b.png", "sub/c.jpeg")


@pytest.fixture(scope="module")
def api_url(
    env: dict[str, str], settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real gunicorn (`python -m ingest.serve`) on a free port with this session's services."""
    with served_api(env, tmp_path_factory.mktemp("api") / "api.log") as (url, _):
        yield url


@pytest.fixture
def token(issuer: LocalIssuer, user_id: str) -> str:
    return issuer.mint_token(user_id, ("user",), expires_in=600)


def _bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims far more pixels than MAX_PIXELS allows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three good images, one undecodable JPEG, one bomb, one text file named .jpg, one .txt."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg(1000, 600, seed=11))
    (root / "b.png").write_bytes(png(300, 200, seed=12))
    (root / "sub" / "c.jpeg").write_bytes(jpeg(1200, 900, seed=13))
    (root / "broken.jpg").write_bytes(jpeg(1600, 1200, seed=14)[:600])
    (root / "bomb.png").write_bytes(_bomb_png())
    (root / "fake.jpg").write_bytes(b"this is not a photo\n")
    (root / "notes.txt").write_text("ignored: not an image by name")
    return root


def _options(api_url: str, token: str, state: Path, **overrides: object) -> UploadOptions:
    base: dict[str, object] = {
        "url": api_url,
        "token": token,
        "concurrency": 2,
        "batch_size": 2,
        "wait_timeout_s": 90.0,
        "poll_interval_s": 0.2,
        "out_dir": state / "out",
        "journal_path": state / JOURNAL_NAME,
        "backoff_base_s": 0.1,
    }
    base.update(overrides)
    return UploadOptions(**base)  # type: ignore[arg-type]


def _by_name(report: UploadReport) -> dict[str, object]:
    return {item.path.name: item for item in report.files}


def _assert_folder_outcome(report: UploadReport) -> None:
    counts = report.counts()
    assert counts["files"] == 6  # notes.txt is not considered at all
    assert (counts["completed"], counts["failed"], counts["rejected"]) == (3, 1, 2)
    items = _by_name(report)
    assert items["broken.jpg"].outcome == "failed" and items["broken.jpg"].reason  # type: ignore[attr-defined]
    assert items["bomb.png"].http_status == 422  # type: ignore[attr-defined]
    assert items["fake.jpg"].http_status is None  # refused locally, never sent
    assert "not a JPEG or PNG" in items["fake.jpg"].reason  # type: ignore[attr-defined,operator]
    assert not report.ok


def _assert_downloads(out_dir: Path) -> None:
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.png", "c.png"]
    wide = cv2.imdecode(np.fromfile(out_dir / "a.png", np.uint8), cv2.IMREAD_UNCHANGED)
    small = cv2.imdecode(np.fromfile(out_dir / "b.png", np.uint8), cv2.IMREAD_UNCHANGED)
    assert wide.shape == (480, 800) and wide.dtype == np.uint8  # grayscale, 800 px wide
    assert small.shape == (200, 300)  # never upscaled


def test_folder_through_single_route_completes_good_files_and_explains_bad_ones(
    api_url: str, token: str, worker, folder: Path, tmp_path: Path, probe: StackProbe, user_id: str
) -> None:
    state = tmp_path / "state"
    report = upload_files([folder], _options(api_url, token, state, single=True))

    assert report.route == "single"
    _assert_folder_outcome(report)
    assert len(report.requests) == 5  # one per file sent: 3 good, broken, bomb
    _assert_downloads(state / "out")
    assert len(probe.rows_for(user_id)) == 4  # 3 completed + 1 failed; nothing for rejects


def test_folder_through_bulk_route_reports_each_part(
    api_url: str, token: str, worker, folder: Path, tmp_path: Path, probe: StackProbe, user_id: str
) -> None:
    state = tmp_path / "state"
    report = upload_files([folder], _options(api_url, token, state, batch_size=3))

    # Fails with route "single (bulk route not found)" while POST /api/v1/uploads is missing.
    assert report.route == "bulk"
    _assert_folder_outcome(report)
    assert len(report.requests) == 2  # 5 files sent in batches of 3
    _assert_downloads(state / "out")
    assert len(probe.rows_for(user_id)) == 4


def test_restarted_run_skips_journaled_files_and_uploads_nothing_twice(
    api_url: str, token: str, worker, folder: Path, tmp_path: Path, probe: StackProbe, user_id: str
) -> None:
    state = tmp_path / "state"
    first = upload_files([folder], _options(api_url, token, state))
    first_ids = {i.path.name: i.image_id for i in first.files if i.image_id}
    assert len(first_ids) == 4

    command = [sys.executable, "-m", "ingest.client", "upload", str(folder), "--url", api_url]
    command += ["--token", token, "--state-dir", str(state), "--out", str(state / "out")]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert again.returncode == 1, again.stderr  # the bad files still make the run fail
    assert "uploaded now:      0" in again.stdout
    assert "accepted earlier:  4" in again.stdout
    assert "completed:         3" in again.stdout
    assert len(probe.rows_for(user_id)) == 4


def test_lost_journal_is_recovered_by_idempotency_keys(
    api_url: str, token: str, worker, folder: Path, tmp_path: Path, probe: StackProbe, user_id: str
) -> None:
    """A run killed after the server accepted a batch but before the journal was written."""
    state = tmp_path / "state"
    first = upload_files([folder], _options(api_url, token, state, wait=False))
    (state / JOURNAL_NAME).unlink()

    second = upload_files([folder], _options(api_url, token, state, wait=False))

    ids = {i.path.name: i.image_id for i in first.files if i.image_id}
    assert ids == {i.path.name: i.image_id for i in second.files if i.image_id}
    assert len(ids) == 4
    assert second.counts()["from_journal"] == 0
    assert len(probe.rows_for(user_id)) == 4


def _command(api_url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ingest.client", *args, "--url", api_url, "--token", token]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)


def _batch(api_url: str, token: str, batch_id: str) -> dict[str, Any]:
    return _get(api_url, token, f"/api/v1/batches/{batch_id}")


def _get(api_url: str, token: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(api_url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _batch_line(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.strip().startswith("batch:")]
    return line.split()[1]


def test_command_uploads_into_one_batch_closes_it_and_fails_when_an_image_failed(
    api_url: str, token: str, worker, folder: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    run = _command(api_url, token, "upload", str(folder), "--state-dir", str(state))

    assert run.returncode == 1, run.stderr
    assert "completed:         3" in run.stdout and "failed:            1" in run.stdout
    assert "broken.jpg" in run.stdout
    batch = _batch(api_url, token, _batch_line(run.stdout))
    assert batch["status"] == "finished"
    assert (batch["total"], batch["counts"]["completed"], batch["counts"]["failed"]) == (4, 3, 1)
    assert "batch finished, completed 3/4" in run.stderr, "progress comes from the batch"

    retried = _command(api_url, token, "retry", batch["id"])
    assert (retried.returncode, json.loads(retried.stdout)) == (0, {"requeued": 1})


def _new_batch(api_url: str, token: str) -> str:
    request = urllib.request.Request(
        f"{api_url}/api/v1/batches",
        data=b"{}",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["id"])


def test_batch_option_uploads_into_an_existing_batch_and_cancel_ends_an_open_one(
    api_url: str, token: str, worker, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg(300, 200, seed=21))
    (photos / "b.jpg").write_bytes(jpeg(300, 200, seed=22))
    batch_id = _new_batch(api_url, token)

    state = tmp_path / "state"
    run = _command(
        api_url, token, "upload", str(photos), "--batch", batch_id, "--state-dir", str(state)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert _batch_line(run.stdout) == batch_id
    batch = _batch(api_url, token, batch_id)
    assert (batch["status"], batch["counts"]["completed"]) == ("finished", 2)
    refused = _command(api_url, token, "cancel", batch_id)
    assert refused.returncode == 1 and "finished" in refused.stderr

    open_one = _new_batch(api_url, token)
    cancelled = _command(api_url, token, "cancel", open_one)
    assert (cancelled.returncode, json.loads(cancelled.stdout)) == (0, {"cancelled": 0})
    assert _batch(api_url, token, open_one)["status"] == "cancelled"


def test_renditions_option_makes_only_those_and_out_downloads_each_of_them(
    env: dict[str, str], private_queue: Settings, token: str, tmp_path: Path
) -> None:
    # Renditions: default 800 gray PNG, thumb 200 WebP, preview 1000 JPEG.
    own_env = renditions_env(env, private_queue)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg(1200, 900, seed=31))
    state = tmp_path / "state"
    worker = start_worker(own_env, tmp_path / "worker.log")
    try:
        with served_api(own_env, tmp_path / "api.log") as (url, _):
            options = _options(url, token, state, renditions=("preview", "thumb"))
            report = upload_files([photos], options)
            [item] = report.files
            document = _get(url, token, f"/api/v1/images/{item.image_id}")
    finally:
        stop_worker(worker)

    assert report.ok, [(f.path.name, f.outcome, f.reason) for f in report.files]
    assert [r["name"] for r in document["renditions"]] == ["thumb", "preview"]
    assert sorted(p.name for p in (state / "out").iterdir()) == ["a.preview.jpg", "a.webp"]
    thumb = cv2.imdecode(np.fromfile(state / "out" / "a.webp", np.uint8), cv2.IMREAD_UNCHANGED)
    preview = cv2.imread(str(state / "out" / "a.preview.jpg"), cv2.IMREAD_UNCHANGED)
    assert thumb.shape == (150, 200, 3) and preview.shape == (750, 1000, 3)
