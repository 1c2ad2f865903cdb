"""Batch archives through the API (`GET /api/v1/batches/{id}/archive`): every entry's bytes and
CRC against S3, `failed.csv`, names, who may read it, ranges and resumption, and the upload
client's `download`. Batches are seeded through `db/` and S3 directly (bench.archive), except
one rendered by a real worker node, which proves the engine keeps each rendition's CRC."""

from __future__ import annotations

import csv
import io
import subprocess
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench.archive import SeedImage, seed_batch
from common.config import Settings
from common.storage import ObjectStore
from db.pool import Database
from ingest import client
from ingest.archive import REPLACED_CHARACTERS, ArchiveChanged, BatchArchive
from tests.support import (
    API_RENDITIONS,
    BASE_POSTGRES_URL,
    ApiClient,
    api_for,
    completed_image,
    jpeg,
    multipart,
    served_api,
    unzip_accepts,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings.storage)


@pytest.fixture
def three_renditions(settings: Settings, env: dict[str, str]) -> Settings:
    return Settings.from_env({**env, "RENDITIONS": API_RENDITIONS})


@pytest.fixture
def owner_api(three_renditions: Settings, issuer: Any, user_id: str) -> Iterator[ApiClient]:
    """The API configured with API_RENDITIONS (no worker: batches here are seeded)."""
    with api_for(three_renditions, issuer.mint_token(user_id, ("user",))) as api:
        yield api


def seeded(
    database: Database, store: ObjectStore, owner: str, settings: Settings, *seeds: SeedImage
) -> str:
    return str(seed_batch(database, store, owner, seeds, settings.engine.renditions))


def made(filename: str, seed: int, *names: str, crc_kept: bool = True) -> SeedImage:
    """An image with renditions `names` (default only), each of distinct bytes."""
    outputs = {
        name: f"{filename}:{name}:{seed}".encode() * (50 + seed) for name in names or ("default",)
    }
    return SeedImage(filename, outputs, crc_kept=crc_kept)


def download(api: ApiClient, batch_id: str, query: str = "", **headers: str):
    return api.client.simulate_get(
        f"/api/v1/batches/{batch_id}/archive", query_string=query, headers=api.headers(headers)
    )


def opened(body: bytes) -> zipfile.ZipFile:
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    return archive


def failed_rows(archive: zipfile.ZipFile) -> list[dict[str, str]]:
    text = archive.read("failed.csv").decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def stored_object(store: ObjectStore, key: str) -> bytes:
    return b"".join(store.stream_result(key))


def test_archive_of_rendered_batch_holds_each_rendition_as_stored_in_s3_with_its_crc(
    renditions_service: ApiClient, store: ObjectStore, tmp_path: Path
) -> None:
    api = renditions_service
    created = api.client.simulate_post("/api/v1/batches", json={}, headers=api.headers()).json
    batch_id = created["id"]
    body, content_type = multipart(
        [
            ("image", "holiday.jpg", jpeg(320, 240, seed=1), "image/jpeg"),
            ("image", "broken.jpg", jpeg(320, 240, seed=2)[:900], "image/jpeg"),
        ]
    )
    answer = api.post_raw(f"/api/v1/uploads?batch={batch_id}", body, content_type)
    assert answer.status_code in (200, 201, 207), answer.text
    good, broken = (item["image"]["id"] for item in answer.json["items"])
    completed_image(api, good)
    wait_for(lambda: api.get(f"/api/v1/images/{broken}").json["status"] == "failed", timeout=120)

    response = download(api, batch_id, "renditions=default,thumb,preview")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert int(response.headers["content-length"]) == len(response.content)
    archive = opened(response.content)
    renditions = {r["name"]: r for r in api.get(f"/api/v1/images/{good}").json["renditions"]}
    expected = {
        "holiday.png": renditions["default"]["key"],
        "holiday.thumb.webp": renditions["thumb"]["key"],
        "holiday.preview.jpg": renditions["preview"]["key"],
    }
    assert sorted(archive.namelist()) == sorted([*expected, "failed.csv"])
    for name, key in expected.items():
        data = stored_object(store, key)
        info = archive.getinfo(name)
        assert info.compress_type == zipfile.ZIP_STORED
        assert zlib.crc32(data) == info.CRC
        assert archive.read(name) == data
    (failure,) = failed_rows(archive)
    assert failure["id"] == broken and failure["filename"] == "broken.jpg"
    assert failure["reason"]
    unzip_accepts(response.content, tmp_path)


def test_default_archive_has_the_first_rendition_named_from_the_original_filename(
    owner_api: ApiClient,
    database: Database,
    store: ObjectStore,
    three_renditions: Settings,
    user_id: str,
) -> None:
    batch_id = seeded(
        database, store, user_id, three_renditions, made("photo.jpg", 1, "default", "thumb")
    )
    archive = opened(download(owner_api, batch_id).content)
    assert archive.namelist() == ["photo.png", "failed.csv"]
    thumb_only = opened(download(owner_api, batch_id, "renditions=thumb").content)
    assert thumb_only.namelist() == ["photo.thumb.webp", "failed.csv"]


def test_entry_names_are_safe_unique_and_keep_non_ascii_and_two_formats_of_a_stem_apart(
    owner_api: ApiClient,
    database: Database,
    store: ObjectStore,
    three_renditions: Settings,
    user_id: str,
    tmp_path: Path,
) -> None:
    filenames = [
        "photo.jpg",
        "photo.png",  # the same stem in another format
        "Photo.jpeg",  # differs only in case
        "dup.jpg",
        "dup.jpg",
        "dup.jpg",
        "../../etc/passwd.jpg",
        "dir\\sub\\x.jpg",
        "a/b.jpg",
        "a_b.jpg",  # the name "a/b.jpg" becomes
        "bell\x07\x1b[31m.jpg",
        "evil\u202egpj.png",
        "été 写真.jpg",
        "photo~2.jpg",  # what a numbered duplicate looks like
        "photo.thumb.jpg",  # what a rendition's entry looks like
        ".jpg",
        "...",
    ]
    seeds = [made(name, index, "default", "thumb") for index, name in enumerate(filenames)]
    batch_id = seeded(database, store, user_id, three_renditions, *seeds)
    response = download(owner_api, batch_id, "renditions=default,thumb")
    assert response.status_code == 200, response.text
    archive = opened(response.content)
    names = archive.namelist()
    assert len(names) == 2 * len(filenames) + 1
    assert len({name.lower() for name in names}) == len(names)
    for name in names:
        assert "/" not in name and "\\" not in name and ".." not in name
        assert not any(ch < " " or "\x7f" <= ch <= "\x9f" or ch == "\u202e" for ch in name)
    # Which of the names differing only in case keeps the plain one follows the rows' keyset
    # order (ids), the same for every request of the archive, not the upload order.
    assert {"photo.png", "photo.thumb.webp"} <= {name.lower() for name in names}
    assert {"été 写真.png", "a_b.png"} <= set(names)
    assert "été 写真.png".encode() in response.content  # stored as UTF-8, flagged as such
    assert archive.getinfo("été 写真.png").flag_bits & 0x800
    # Every image's entries came through, each with its own bytes.
    contents = {archive.read(name) for name in names if name != "failed.csv"}
    assert len(contents) == 2 * len(filenames)
    unzip_accepts(response.content, tmp_path)
    listing = subprocess.run(
        ["unzip", "-Z1", str(tmp_path / "archive.zip")], capture_output=True, text=True
    )
    assert "été 写真.png" in listing.stdout.splitlines()


BIDI_CONTROLS = [
    "\u200e",
    "\u200f",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
]


@pytest.mark.parametrize(
    "character", [chr(c) for c in range(1, 0xA0)] + BIDI_CONTROLS + ["\u200d", "é", "写", "Ä"]
)
def test_database_name_groups_delete_exactly_the_characters_names_replace(
    database: Database, character: str
) -> None:
    with database.transaction() as conn:
        row = conn.execute("SELECT archive_group(%s)", (f"ab{character}cd.jpg",)).fetchone()
    assert row is not None
    replaced = REPLACED_CHARACTERS.fullmatch(character) is not None
    kept = character.lower() if character.isascii() else character
    assert row[0] == ("abcd" if replaced else f"ab{kept}cd")


def test_name_group_index_works_without_the_schema_on_the_search_path(
    database: Database, store: ObjectStore, settings: Settings, schema: str, user_id: str
) -> None:
    # Autovacuum's ANALYZE and pg_restore evaluate index expressions with no schema of ours on
    # the search path: the expression must need only built-in functions.
    seeded(database, store, user_id, settings, made("indexed.jpg", 1))
    with psycopg.connect(BASE_POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"ANALYZE {schema}.images")
        conn.execute(f"REINDEX INDEX {schema}.images_batch_archive_idx")


def test_failed_images_are_listed_in_failed_csv_with_their_reasons(
    api: ApiClient, database: Database, store: ObjectStore, settings: Settings, user_id: str
) -> None:
    batch_id = seeded(
        database,
        store,
        user_id,
        settings,
        made("ok.jpg", 1),
        SeedImage('quote"comma,.jpg', {}, failure="decode error: truncated"),
        SeedImage("second.png", {}, failure="too many pixels"),
    )
    archive = opened(download(api, batch_id).content)
    assert archive.namelist() == ["ok.png", "failed.csv"]
    rows = failed_rows(archive)
    # (Rows made in one statement share their creation time: no order between them to check.)
    assert sorted((r["filename"], r["reason"]) for r in rows) == [
        ('quote"comma,.jpg', "decode error: truncated"),
        ("second.png", "too many pixels"),
    ]
    assert all(uuid.UUID(r["id"]) for r in rows)


def test_batch_with_no_completed_image_gives_an_archive_of_failed_csv_alone(
    api: ApiClient,
    database: Database,
    store: ObjectStore,
    settings: Settings,
    user_id: str,
    tmp_path: Path,
) -> None:
    failed = seeded(database, store, user_id, settings, SeedImage("x.jpg", {}, failure="bad"))
    archive = opened(download(api, failed).content)
    assert archive.namelist() == ["failed.csv"]
    assert len(failed_rows(archive)) == 1
    empty = api.client.simulate_post("/api/v1/batches", json={}, headers=api.headers()).json
    response = download(api, empty["id"])
    assert opened(response.content).read("failed.csv") == b"id,filename,reason\r\n"
    unzip_accepts(response.content, tmp_path)


def test_another_users_batch_archive_is_404_and_an_admin_may_read_it(
    api: ApiClient,
    app: Any,
    issuer: Any,
    database: Database,
    store: ObjectStore,
    settings: Settings,
) -> None:
    batch_id = seeded(database, store, "someone-else", settings, made("theirs.jpg", 1))
    response = download(api, batch_id)
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"
    assert download(api, str(uuid.uuid4())).status_code == 404
    admin = ApiClient(app, issuer.mint_token("an-admin", ("user", "admin")))
    assert opened(download(admin, batch_id).content).namelist() == ["theirs.png", "failed.csv"]


def test_unknown_rendition_is_400_in_the_error_shape(
    api: ApiClient, database: Database, store: ObjectStore, settings: Settings, user_id: str
) -> None:
    batch_id = seeded(database, store, user_id, settings, made("a.jpg", 1))
    response = download(api, batch_id, "renditions=default,nope")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "bad_request"
    assert "nope" in response.json["error"]["message"]


def test_download_cut_at_60_percent_resumes_with_range_to_the_identical_file(
    api: ApiClient, database: Database, store: ObjectStore, settings: Settings, user_id: str
) -> None:
    seeds = [made(f"img{i:03d}.jpg", i) for i in range(40)]
    seeds.append(SeedImage("bad.jpg", {}, failure="broken"))
    batch_id = seeded(database, store, user_id, settings, *seeds)
    whole = download(api, batch_id)
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    etag = whole.headers["etag"]
    cut = len(whole.content) * 6 // 10
    rest = download(api, batch_id, **{"Range": f"bytes={cut}-", "If-Range": etag})
    assert rest.status_code == 206
    assert (
        rest.headers["content-range"]
        == f"bytes {cut}-{len(whole.content) - 1}/{len(whole.content)}"
    )
    assert whole.content[:cut] + rest.content == whole.content
    middle = download(api, batch_id, Range="bytes=100-199")
    assert middle.status_code == 206 and middle.content == whole.content[100:200]
    tail = download(api, batch_id, Range="bytes=-50")
    assert tail.content == whole.content[-50:]
    opened(whole.content[:cut] + rest.content)


def test_range_past_the_end_is_416_with_the_length(
    api: ApiClient, database: Database, store: ObjectStore, settings: Settings, user_id: str
) -> None:
    batch_id = seeded(database, store, user_id, settings, made("a.jpg", 1))
    size = len(download(api, batch_id).content)
    response = download(api, batch_id, Range=f"bytes={size}-")
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    assert response.json["error"]["code"] == "range_not_satisfiable"


def test_if_range_of_an_older_version_sends_the_whole_new_archive(
    api: ApiClient, database: Database, store: ObjectStore, settings: Settings, user_id: str
) -> None:
    batch_id = seeded(database, store, user_id, settings, made("a.jpg", 1), made("b.jpg", 2))
    before = download(api, batch_id)
    with database.transaction() as conn:
        conn.execute(
            "UPDATE images SET status = 'failed', error = 'gone' WHERE batch_id = %s "
            "AND filename = 'b.jpg'",
            (uuid.UUID(batch_id),),
        )
    after = download(api, batch_id, **{"Range": "bytes=10-", "If-Range": before.headers["etag"]})
    assert after.status_code == 200
    assert after.headers["etag"] != before.headers["etag"]
    assert opened(after.content).namelist() == ["a.png", "failed.csv"]


def test_rendition_without_a_stored_crc_is_read_once_and_its_crc_kept(
    api: ApiClient, database: Database, store: ObjectStore, settings: Settings, user_id: str
) -> None:
    batch_id = seeded(database, store, user_id, settings, made("old.jpg", 3, crc_kept=False))
    archive = opened(download(api, batch_id).content)
    data = archive.read("old.png")
    with database.transaction() as conn:
        row = conn.execute(
            "SELECT renditions FROM images WHERE batch_id = %s", (uuid.UUID(batch_id),)
        ).fetchone()
    assert row is not None
    assert row[0][0]["crc32"] == zlib.crc32(data)


def test_archive_whose_rows_change_while_it_is_sent_is_cut_short(
    database: Database, store: ObjectStore, settings: Settings, user_id: str
) -> None:
    batch_id = uuid.UUID(
        seeded(database, store, user_id, settings, *(made(f"{i}.jpg", i) for i in range(5)))
    )
    with database.transaction() as conn:
        created = conn.execute("SELECT created_at FROM batches WHERE id = %s", (batch_id,))
        (created_at,) = created.fetchone() or (None,)
    archive = BatchArchive(database, store, batch_id, ["default"], "default", created_at)
    plan = archive.plan()  # the length and ETag a response announces
    with database.transaction() as conn:
        conn.execute(
            "UPDATE images SET status = 'failed', error = 'x' WHERE batch_id = %s AND "
            "filename = '3.jpg'",
            (batch_id,),
        )
    with pytest.raises(ArchiveChanged):
        for _ in archive.body(plan, 0, plan.size):
            pass


def test_upload_client_download_resumes_an_interrupted_archive(
    env: dict[str, str],
    database: Database,
    store: ObjectStore,
    settings: Settings,
    issuer: Any,
    user_id: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch_id = seeded(database, store, user_id, settings, *(made(f"{i}.jpg", i) for i in range(30)))
    token = issuer.mint_token(user_id, ("user",), expires_in=600)
    out = tmp_path / "batch.zip"
    with served_api(env, tmp_path / "api.log") as (url, _):
        first = tmp_path / "first.zip"
        assert (
            client.main(["download", batch_id, "--out", str(first), "--url", url, "--token", token])
            == 0
        )
        whole = first.read_bytes()
        # An earlier run stopped at 60 %: what it left is resumed, not downloaded again.
        partial = client.PartialDownload(out)
        partial.part.write_bytes(whole[: len(whole) * 6 // 10])
        etag = _etag_of(url, token, batch_id)
        partial.etag_file.write_text(etag + "\n")
        capsys.readouterr()
        assert (
            client.main(["download", batch_id, "--out", str(out), "--url", url, "--token", token])
            == 0
        )
        # A connection cut at 60 % during this run: the next attempt asks for the rest.
        cut_at = len(whole) * 6 // 10
        connection = CutOnce(url, token, 30.0, cut_at)
        again = tmp_path / "again.zip"
        result = client.download_archive(
            connection, batch_id, again, policy=client.RetryPolicy(3, 0.01, 0.01)
        )
    assert out.read_bytes() == whole
    assert f"resumed at byte {len(whole) * 6 // 10}" in capsys.readouterr().out
    assert not partial.part.exists() and not partial.etag_file.exists()
    opened(out.read_bytes())
    assert again.read_bytes() == whole
    assert (result.size, result.fetched) == (len(whole), len(whole))
    assert connection.asked == [{}, {"Range": f"bytes={cut_at}-", "If-Range": etag}]


class CutOnce(client.ApiConnection):
    """A connection whose first download breaks after `cut_at` bytes, as a network would."""

    def __init__(self, base_url: str, token: str, timeout_s: float, cut_at: int) -> None:
        super().__init__(base_url, token, timeout_s)
        self.cut_at = cut_at
        self.asked: list[dict[str, str]] = []

    def open_download(self, path: str, headers: dict[str, str]) -> Any:
        self.asked.append(dict(headers))
        response = super().open_download(path, headers)
        return CutResponse(response, self.cut_at) if len(self.asked) == 1 else response


class CutResponse:
    def __init__(self, response: Any, cut_at: int) -> None:
        self._response = response
        self._left = cut_at
        self.status = response.status
        self.getheader = response.getheader

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise ConnectionResetError("the connection was cut")
        chunk = self._response.read(min(size, self._left) if size > 0 else self._left)
        self._left -= len(chunk)
        return chunk


def _etag_of(url: str, token: str, batch_id: str) -> str:
    connection = client.ApiConnection(url, token, 30.0)
    try:
        response = connection.open_download(f"/api/v1/batches/{batch_id}/archive", {})
        response.read()
        return str(response.getheader("ETag"))
    finally:
        connection.close()
