"""The batch-archive benchmark, `python -m bench archive`, and the seeding it shares with the
tests: a batch whose rows (through `db/` helpers) and result objects (put in parallel) are made
directly, without uploading or rendering, so a batch of 100,000 images takes minutes to set up.

The benchmark reads every object of such a batch with the minio client, then downloads the
batch's archive from a real API process (gunicorn) while sampling that process's RSS, then cuts a
download at 60 % and resumes it with `Range`, checking the file against the first one."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from minio import Minio

from bench.engine_bench import isolated_services
from bench.procstat import descendants, rss_mib
from common.config import Settings
from common.formats import CONTENT_TYPE_BY_FORMAT
from common.renditions import Rendition
from common.storage import ObjectStore, rendition_key
from db import batches, images
from db.batches import NewBatch
from db.images import NewImage, Outcome, StoredRendition
from db.pool import Database
from ingest.archive import PREFETCH_THREADS
from ops.issuer import running as issuer_running
from ops.stack import http_ok

ROWS_PER_STATEMENT = 1000
CHUNK = 1024 * 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class SeedImage:
    """One image of a seeded batch: the bytes of each rendition it has (by name), or the reason
    it failed (`outputs` then unused). `crc_kept`: False to leave `crc32` out of its rows, as
    for a rendition stored before CRCs were kept."""

    filename: str
    outputs: dict[str, bytes]
    failure: str | None = None
    crc_kept: bool = True


def seed_batch(
    db: Database,
    store: ObjectStore,
    owner: str,
    seeds: Sequence[SeedImage],
    renditions: Sequence[Rendition],
    *,
    threads: int = 16,
) -> uuid.UUID:
    """A closed batch of `owner` holding `seeds`, its result objects stored; returns its id."""
    batch_id = uuid.uuid4()
    with db.transaction() as conn:
        batches.create_batch(conn, NewBatch(batch_id, owner, "seeded", None, ["batch"], None))
    ids = [uuid.uuid4() for _ in seeds]
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(seeds), ROWS_PER_STATEMENT):
            chunk = list(zip(ids[start:], seeds[start : start + ROWS_PER_STATEMENT], strict=False))
            outcomes = list(pool.map(lambda pair: _stored(store, renditions, *pair), chunk))
            with db.transaction() as conn:
                images.insert_images(conn, [_new_image(i, owner, s, batch_id) for i, s in chunk])
                images.commit_batch(conn, outcomes)
    with db.transaction() as conn:
        batches.close_batch(conn, batch_id)
    return batch_id


def _new_image(image_id: uuid.UUID, owner: str, seed: SeedImage, batch_id: uuid.UUID) -> NewImage:
    return NewImage(
        id=image_id,
        owner=owner,
        filename=seed.filename,
        content_type="image/jpeg",
        size_bytes=1000,
        sha256=hashlib.sha256(image_id.bytes).hexdigest(),
        source_width=64,
        source_height=48,
        original_key=f"originals/{image_id}",
        batch_id=batch_id,
    )


def _stored(
    store: ObjectStore, renditions: Sequence[Rendition], image_id: uuid.UUID, seed: SeedImage
) -> Outcome:
    if seed.failure is not None:
        return Outcome(image_id, "failed", error=seed.failure)
    made = []
    for index, rendition in enumerate(renditions):
        data = seed.outputs.get(rendition.name)
        if data is None:
            continue
        content_type = CONTENT_TYPE_BY_FORMAT[rendition.format]
        key = rendition_key(image_id, rendition.name, content_type, first=index == 0)
        store.put_result(key, data, content_type)
        crc = zlib.crc32(data) if seed.crc_kept else None
        made.append(StoredRendition(rendition.name, key, content_type, 64, 48, len(data), crc))
    main = made[0]
    return Outcome(
        image_id,
        "completed",
        result_key=main.key,
        result_content_type=main.content_type,
        result_width=main.width,
        result_height=main.height,
        renditions=tuple(made),
        result_size_bytes=sum(r.bytes or 0 for r in made),
    )


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass(frozen=True)
class ArchiveBenchConfig:
    images: int = 100_000
    object_bytes: int = 8 * 1024
    seed_threads: int = 16
    api_threads: int = 4
    rss_interval_s: float = 0.5
    cut_fraction: float = 0.6

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run_archive_benchmark(config: ArchiveBenchConfig, base: Settings) -> dict[str, Any]:
    """Seed a batch on isolated services, then, side by side: every object read with the minio
    client, the archive downloaded from a real API process (its RSS sampled), a download cut
    at `cut_fraction` and resumed with Range."""
    with isolated_services(base) as services, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with issuer_running(work / "issuer") as issuer:
            env = {**services.env(0), "KEYCLOAK_URL": issuer.base_url, "METRICS_PORT": "0"}
            settings = Settings.from_env(env)
            owner = f"bench-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            batch_id, keys = _seed_bench_batch(settings, owner, config)
            seeded_s = time.perf_counter() - started
            token = issuer.mint_token(owner, ("user",), expires_in=3600)
            with _served(env, work, config.api_threads) as (url, worker_pid):
                # S3 read before and after the archive; the faster one is the reference.
                before = _read_objects(settings, keys)
                archive = _download(url, token, batch_id, work / "whole.zip", worker_pid, config)
                after = _read_objects(settings, keys)
                parallel = _read_objects(settings, keys, threads=PREFETCH_THREADS)
                resumed = _cut_and_resume(url, token, batch_id, work, config.cut_fraction)
            s3 = max(before, after, key=lambda read: float(read["mib_per_s"]))
            whole = work / "whole.zip"
            entries = _check_archive(whole, config.images)
            identical = _sha256(whole) == _sha256(work / "resumed.zip")
    return {
        "images": config.images,
        "seed_seconds": round(seeded_s, 1),
        "s3_read": s3,
        "s3_reads_mib_per_s": [before["mib_per_s"], after["mib_per_s"]],
        "s3_read_parallel": parallel,
        "rate_ratio_to_parallel": round(archive["mib_per_s"] / parallel["mib_per_s"], 3),
        "archive": archive,
        "archive_entries": entries,
        "rate_ratio": round(archive["mib_per_s"] / s3["mib_per_s"], 3),
        "resume": {**resumed, "identical": identical},
    }


def _seed_bench_batch(
    settings: Settings, owner: str, config: ArchiveBenchConfig
) -> tuple[str, list[str]]:
    """A batch of `config.images` completed images with one object each (random bytes: like
    images, they do not compress) and their keys in archive order."""
    db = Database(settings.postgres_url, max_size=2)
    store = ObjectStore(settings.storage)
    try:
        seeds = [
            SeedImage(f"IMG_{i:06d}.jpg", {"default": os.urandom(config.object_bytes)})
            for i in range(config.images)
        ]
        batch_id = seed_batch(
            db, store, owner, seeds, settings.engine.renditions, threads=config.seed_threads
        )
        with db.transaction() as conn:
            rows = conn.execute(
                """SELECT renditions -> 0 ->> 'key' FROM images WHERE batch_id = %s
                    ORDER BY archive_group(filename) COLLATE "C", id""",
                (batch_id,),
            ).fetchall()
    finally:
        db.close()
    return str(batch_id), [str(row[0]) for row in rows]


@contextlib.contextmanager
def _served(env: dict[str, str], work: Path, threads: int) -> Iterator[tuple[str, int]]:
    """`python -m ingest.serve` with one worker process: (its URL, the worker's pid)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (work / "api.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ingest.serve",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            str(threads),
        ],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not http_ok(f"{url}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {work / 'api.log'}")
            time.sleep(0.2)
        (worker,) = [pid for pid in descendants(process.pid) if pid != process.pid]
        yield url, worker
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _read_objects(settings: Settings, keys: Sequence[str], threads: int = 1) -> dict[str, Any]:
    """Every object read once with the minio client: one after another (`threads` 1, the
    reference), or on `threads` threads, as many as the archive fetches ahead with."""
    client = Minio(
        settings.storage.endpoint,
        access_key=settings.storage.access_key,
        secret_key=settings.storage.secret_key,
        secure=settings.storage.secure,
    )

    def read(key: str) -> int:
        response = client.get_object(settings.storage.processed_bucket, key)
        try:
            return len(response.read())
        finally:
            response.close()
            response.release_conn()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, keys))
    elapsed = time.perf_counter() - started
    return {
        "threads": threads,
        "bytes": total,
        "seconds": round(elapsed, 2),
        "mib_per_s": _mib_per_s(total, elapsed),
    }


def _download(
    url: str, token: str, batch_id: str, out: Path, worker_pid: int, config: ArchiveBenchConfig
) -> dict[str, Any]:
    """The whole archive into `out`, with the API worker's RSS sampled as it streams."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not stop.wait(config.rss_interval_s):
            samples.append((round(time.perf_counter() - started, 1), round(rss_mib(worker_pid), 1)))

    sampler = threading.Thread(target=sample, daemon=True)
    samples.append((0.0, round(rss_mib(worker_pid), 1)))
    sampler.start()
    total, first_byte_s = _fetch(url, token, batch_id, out, {})
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    rss = [value for _, value in samples]
    return {
        "bytes": total,
        "seconds": round(elapsed, 2),
        "first_byte_seconds": round(first_byte_s, 2),
        "mib_per_s": _mib_per_s(total, elapsed),
        "rss_mib_first": rss[0],
        "rss_mib_min": min(rss),
        "rss_mib_max": max(rss),
        "rss_mib_samples": samples,
    }


def _fetch(
    url: str, token: str, batch_id: str, out: Path, headers: dict[str, str], limit: int = -1
) -> tuple[int, float]:
    """GET the archive into `out` (appending for a Range); stops after `limit` bytes if given.
    Returns (bytes received, seconds to the first byte)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=300)
    started = time.perf_counter()
    connection.request(
        "GET",
        f"/api/v1/batches/{batch_id}/archive",
        headers={"Authorization": f"Bearer {token}", **headers},
    )
    response = connection.getresponse()
    if response.status not in (200, 206):
        raise RuntimeError(f"archive answered {response.status}: {response.read()[:300]!r}")
    first_byte_s = time.perf_counter() - started
    received = 0
    with out.open("ab" if headers else "wb") as sink:
        while limit < 0 or received < limit:
            want = CHUNK if limit < 0 else min(CHUNK, limit - received)
            chunk = response.read(want)
            if not chunk:
                break
            sink.write(chunk)
            received += len(chunk)
    connection.close()
    return received, first_byte_s


def _cut_and_resume(
    url: str, token: str, batch_id: str, work: Path, fraction: float
) -> dict[str, Any]:
    out = work / "resumed.zip"
    size = (work / "whole.zip").stat().st_size
    etag = _etag(url, token, batch_id)
    cut, _ = _fetch(url, token, batch_id, out, {}, limit=int(size * fraction))
    rest, _ = _fetch(url, token, batch_id, out, {"Range": f"bytes={cut}-", "If-Range": etag})
    return {"cut_at_bytes": cut, "resumed_bytes": rest, "total_bytes": cut + rest}


def _etag(url: str, token: str, batch_id: str) -> str:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=300)
    connection.request(
        "GET",
        f"/api/v1/batches/{batch_id}/archive",
        headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-0"},
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    return str(response.getheader("ETag"))


def _check_archive(path: Path, images: int) -> int:
    """The number of entries, after zipfile read every one and checked its CRC."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
        if bad is not None:
            raise RuntimeError(f"entry {bad} of the archive is corrupt")
        count = len(archive.infolist())
    if count != images + 1:
        raise RuntimeError(f"the archive has {count} entries, not {images} and failed.csv")
    return count


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _mib_per_s(total: int, seconds: float) -> float:
    return round(total / MIB / max(seconds, 1e-9), 1)


def archive_summary_markdown(document: dict[str, Any]) -> str:
    result = document
    s3, archive, resume = result["s3_read"], result["archive"], result["resume"]
    parallel = result["s3_read_parallel"]
    return "\n".join(
        [
            f"# Batch archive: {result['images']} images",
            "",
            "| read | bytes | seconds | MiB/s |",
            "|---|---:|---:|---:|",
            f"| every object with the minio client, one after another | {s3['bytes']} | "
            f"{s3['seconds']} | {s3['mib_per_s']} |",
            f"| the archive from the API | {archive['bytes']} | {archive['seconds']} | "
            f"{archive['mib_per_s']} |",
            f"| every object, minio client on {parallel['threads']} threads | "
            f"{parallel['bytes']} | {parallel['seconds']} | {parallel['mib_per_s']} |",
            "",
            f"S3 reads before and after the archive: {result['s3_reads_mib_per_s']} MiB/s "
            "(the faster is the reference).",
            f"Archive rate / sequential S3 rate: **{result['rate_ratio']:.0%}**; / the "
            f"{parallel['threads']}-thread rate: {result['rate_ratio_to_parallel']:.0%} "
            "(the archive fetches small objects ahead on as many threads). First byte after "
            f"{archive['first_byte_seconds']} s; {result['archive_entries']} entries checked.",
            f"API worker RSS while streaming: {archive['rss_mib_first']} MiB at the start, "
            f"{archive['rss_mib_min']}-{archive['rss_mib_max']} MiB over "
            f"{len(archive['rss_mib_samples'])} samples.",
            f"Cut at {resume['cut_at_bytes']} bytes, resumed with Range for "
            f"{resume['resumed_bytes']}: identical file: {resume['identical']}.",
            f"(Seeding took {result['seed_seconds']} s.)",
            "",
        ]
    )
