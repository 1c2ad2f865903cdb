"""`pixelmill-upload` / `python -m ingest.client upload`: the bulk-upload client, also a library.

Owns what a client does against the API: finding JPEG and PNG files, uploading them in requests
over keep-alive connections with retries and content-derived idempotency keys, a journal so that a
restarted run uploads nothing twice, waiting for completion, downloading the results and
summarising. The command makes one server-side batch per run (`--batch ID` or the state folder
resumes one), closes it once every file is sent and follows the batch document; without a batch
(the library's default) it polls `?ids=`. `retry BATCH` and `cancel BATCH` steer a batch;
`download BATCH` saves its archive, resuming an interrupted download with `Range`.
Standard library only. The benchmarks drive the same code path through `upload_files`, whose
report carries per-file timings.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit

from common.formats import EXTENSION_BY_CONTENT_TYPE

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png"})
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# 200: an earlier copy of the same content, when the server de-duplicates.
ACCEPTED_STATUSES = frozenset({200, 201})
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
BATCH_ENDED = frozenset({"finished", "cancelled"})
BATCH_FILE = "batch"
MAX_IDS_PER_POLL = 100
JOURNAL_NAME = "journal.jsonl"
DEFAULT_STATE_DIR = Path(".pixelmill-upload")
_HASH_CHUNK = 1 << 20


class UploadAborted(RuntimeError):
    """The server refused the client itself (bad token, missing role): nothing more can succeed."""


class TransientFailure(RuntimeError):
    """A request failed in a way worth retrying (connection error, 429, 502, 503, 504)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------
# Options, per-file results and the report


@dataclass(frozen=True)
class UploadOptions:
    """How to upload: where to, with which token, how wide, and what to do afterwards."""

    url: str
    token: str
    concurrency: int = 4
    batch_size: int = 16
    single: bool = False
    wait: bool = True
    wait_timeout_s: float = 600.0
    request_timeout_s: float = 120.0
    out_dir: Path | None = None
    journal_path: Path | None = None
    max_attempts: int = 8
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    poll_interval_s: float = 0.5
    progress_stream: TextIO | None = None
    # Mixed into idempotency keys: only for callers (benchmarks) that resend the same files on
    # purpose and want new images rather than the first answers replayed.
    key_salt: str = ""
    # Upload into a server-side batch: this one, or (with `use_batch`) one made for the run.
    batch_id: str | None = None
    use_batch: bool = False
    batch_name: str | None = None
    # Make only these renditions (`?renditions=`); empty: the batch's, else every configured one.
    renditions: tuple[str, ...] = ()


@dataclass
class FileResult:
    """One local file and what happened to it; times are epoch seconds (`time.time()`)."""

    path: Path
    filename: str
    sha256: str
    size_bytes: int
    outcome: str = "waiting"  # waiting|rejected|accepted|completed|failed|unfinished
    reason: str | None = None
    http_status: int | None = None
    image_id: str | None = None
    from_journal: bool = False
    attempts: int = 0
    request_started: float | None = None
    request_ended: float | None = None
    accepted_at: float | None = None
    completed_at: float | None = None
    result_content_type: str | None = None
    download_path: Path | None = None

    @property
    def was_accepted(self) -> bool:
        return self.image_id is not None


@dataclass(frozen=True)
class RequestRecord:
    """One upload request as the client saw it, retries included."""

    started: float
    ended: float
    http_status: int | None
    images: int
    attempts: int


@dataclass
class UploadReport:
    """Everything `upload_files` did, for the summary and for benchmark statistics."""

    route: str
    files: list[FileResult] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    started_at: float = 0.0
    uploads_ended_at: float = 0.0
    finished_at: float = 0.0
    aborted: str | None = None
    # The batch document as last read, when the run uploads into a batch.
    batch: dict[str, Any] | None = None

    def with_outcome(self, outcome: str) -> list[FileResult]:
        return [f for f in self.files if f.outcome == outcome]

    def counts(self) -> dict[str, int]:
        names = ("accepted", "completed", "failed", "rejected", "unfinished", "waiting")
        counts = {name: len(self.with_outcome(name)) for name in names}
        counts["files"] = len(self.files)
        counts["from_journal"] = sum(f.from_journal for f in self.files)
        counts["uploaded_now"] = sum(f.was_accepted and not f.from_journal for f in self.files)
        counts["downloaded"] = sum(f.download_path is not None for f in self.files)
        return counts

    @property
    def ok(self) -> bool:
        """True when nothing was rejected, failed, left unfinished or left unsent."""
        bad = ("rejected", "failed", "unfinished", "waiting")
        return self.aborted is None and not any(self.with_outcome(name) for name in bad)


# ---------------------------------------------------------------------------------------------
# Finding files


def sniff_format(head: bytes) -> str | None:
    """ "jpeg" or "png" from a file's first bytes, None for anything else."""
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    return None


def _walk(directory: Path, excluded: set[Path]) -> Iterator[Path]:
    """Files under `directory` in a stable order, skipping hidden entries and `excluded` dirs."""
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or entry.resolve() in excluded:
            continue
        if entry.is_dir():
            yield from _walk(entry, excluded)
        elif entry.is_file():
            yield entry


def discover_images(
    paths: Iterable[Path], exclude: Iterable[Path] = ()
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to upload, and (file, reason) for files that look like images by name only.

    In folders, a file is taken when its extension says JPEG/PNG and its first bytes agree.
    Files named explicitly are always taken: the server is the judge of those.
    """
    excluded = {Path(p).resolve() for p in exclude}
    chosen: list[Path] = []
    refused: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_file():
            chosen.append(path)
            continue
        if not path.is_dir():
            refused.append((path, "no such file or folder"))
            continue
        for candidate in _walk(path, excluded):
            if candidate.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            with candidate.open("rb") as handle:
                head = handle.read(8)
            if sniff_format(head) is None:
                refused.append((candidate, "not a JPEG or PNG by content; not sent"))
            else:
                chosen.append(candidate)
    return chosen, refused


def file_sha256(path: Path) -> tuple[str, int]:
    """Hex SHA-256 and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def idempotency_key(route: str, files: Sequence[FileResult], salt: str = "") -> str:
    """Derived from content and names only, so a restarted run sends the same key again."""
    digest = hashlib.sha256(f"{salt}{route}".encode())
    for item in files:
        digest.update(f"\n{item.sha256} {item.filename}".encode())
    return f"{route}-{digest.hexdigest()}"


# ---------------------------------------------------------------------------------------------
# The journal


class UploadJournal:
    """Append-only JSON lines mapping a file's SHA-256 to the image id the server gave it.

    Written after each accepted request (flushed and synced), read at start-up, so that a run
    that was interrupted can simply be started again. A torn last line is ignored.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, str]:
        accepted: dict[str, str] = {}
        if not self.path.exists():
            return accepted
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                accepted[str(entry["sha256"])] = str(entry["id"])
            except (ValueError, KeyError, TypeError):
                continue
        return accepted

    def record(self, files: Iterable[FileResult]) -> None:
        lines = [
            json.dumps({"sha256": f.sha256, "id": f.image_id, "filename": f.filename}) + "\n"
            for f in files
            if f.image_id is not None
        ]
        if not lines:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.writelines(lines)
                handle.flush()
                os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# HTTP: one keep-alive connection per thread, retries with backoff


@dataclass(frozen=True)
class ApiResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def error_text(self) -> str:
        """`code: message` from the error body, or the start of the body."""
        try:
            error = self.json()["error"]
            return f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            return self.body[:200].decode("utf-8", "replace") or f"HTTP {self.status}"


class ApiConnection:
    """A keep-alive HTTP(S) connection to the API that reconnects after any failure."""

    def __init__(self, base_url: str, token: str, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url {base_url!r} is not an http(s) URL")
        self._parts = parts
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            factory = (
                http.client.HTTPSConnection
                if self._parts.scheme == "https"
                else http.client.HTTPConnection
            )
            self._connection = factory(
                self._parts.hostname or "", self._parts.port, timeout=self._timeout_s
            )
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(
        self,
        method: str,
        path: str,
        chunks: Sequence[bytes] = (),
        headers: dict[str, str] | None = None,
    ) -> ApiResponse:
        """Send one request; connection-level failures become TransientFailure."""
        connection = self._connect()
        try:
            connection.putrequest(method, self._prefix + path)
            all_headers = {"Authorization": f"Bearer {self._token}", **(headers or {})}
            if chunks or method == "POST":
                all_headers["Content-Length"] = str(sum(len(c) for c in chunks))
            for name, value in all_headers.items():
                connection.putheader(name, value)
            connection.endheaders()
            for chunk in chunks:
                connection.send(chunk)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransientFailure(f"connection error: {exc!r}") from exc
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return ApiResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, body)

    def open_download(self, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """A GET whose body the caller reads (and the connection is closed after): for bodies
        too large to hold. Connection-level failures become TransientFailure."""
        connection = self._connect()
        try:
            connection.request(
                "GET",
                self._prefix + path,
                headers={"Authorization": f"Bearer {self._token}", **headers},
            )
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransientFailure(f"connection error: {exc!r}") from exc


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, never shorter than the server's Retry-After."""

    max_attempts: int = 8
    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = random.uniform(0, min(self.cap_s, self.base_s * 2 ** (attempt - 1)))
        return max(backoff, retry_after or 0.0)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delta-seconds form; dates are ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def send_with_retries(
    send: Callable[[], ApiResponse], policy: RetryPolicy
) -> tuple[ApiResponse | None, int, str | None]:
    """(response, attempts, None), or (None, attempts, why) once the attempts are used up."""
    reason = None
    for attempt in range(1, policy.max_attempts + 1):
        retry_after = None
        try:
            response = send()
        except TransientFailure as exc:
            reason = str(exc)
        else:
            if response.status not in TRANSIENT_STATUSES:
                return response, attempt, None
            reason = f"HTTP {response.status} {response.error_text()}"
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        if attempt < policy.max_attempts:
            time.sleep(policy.delay(attempt, retry_after))
    return None, policy.max_attempts, f"gave up after {policy.max_attempts} attempts: {reason}"


@dataclass(frozen=True)
class FormPart:
    """One part of a multipart/form-data body: a file when `filename` is set, else a field."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str = "application/octet-stream"


def encode_multipart(
    parts: Iterable[FormPart], boundary: str | None = None
) -> tuple[list[bytes], str]:
    """Body chunks (each part's data is a chunk of its own, not copied) and the Content-Type of
    a multipart/form-data body; the boundary is random unless given."""
    boundary = boundary or f"pixelmill-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        disposition = f'form-data; name="{_header_quoted(part.name)}"'
        if part.filename is not None:
            disposition += f'; filename="{_header_quoted(part.filename)}"'
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {part.content_type}\r\n\r\n".encode()
        )
        chunks.append(part.data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return chunks, f"multipart/form-data; boundary={boundary}"


def _header_quoted(value: str) -> str:
    """A name that cannot end its quoted string or its header line early."""
    return value.replace('"', "%22").replace("\r", "").replace("\n", "")


def multipart_body(files: Sequence[tuple[str, bytes]]) -> tuple[list[bytes], str]:
    """Body chunks and content type of a multipart form with one `image` part per file."""
    return encode_multipart(FormPart("image", data, filename) for filename, data in files)


# ---------------------------------------------------------------------------------------------
# Progress


class ProgressLine:
    """One status line on a stream: redrawn in place on a terminal, every 5 s otherwise."""

    def __init__(self, stream: TextIO | None, total: int) -> None:
        self._stream = stream
        self._total = total
        self._started = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()
        self._interactive = bool(stream is not None and stream.isatty())

    def show(self, report: UploadReport, phase: str, final: bool = False) -> None:
        if self._stream is None:
            return
        with self._lock:
            now = time.monotonic()
            due = now - self._last >= (0.2 if self._interactive else 5.0)
            if not (final or due):
                return
            self._last = now
            self._stream.write(self._line(report, phase, now) + ("\n" if final else ""))
            self._stream.flush()

    def _line(self, report: UploadReport, phase: str, now: float) -> str:
        if report.batch is not None and phase != "uploading":
            return self._batch_line(report.batch, phase)
        counts = report.counts()
        sent = counts["uploaded_now"] + counts["rejected"]
        elapsed = max(now - self._started, 1e-6)
        rate = counts["uploaded_now"] / elapsed
        prefix = "\r\x1b[K" if self._interactive else ""
        end = "" if self._interactive else "\n"
        return (
            f"{prefix}{phase}: sent {sent}/{self._total}, accepted {counts['uploaded_now']}, "
            f"rejected {counts['rejected']}, completed {counts['completed']}, "
            f"failed {counts['failed']} | {rate:.1f} images/s | {elapsed:.0f}s{end}"
        )

    def _batch_line(self, batch: dict[str, Any], phase: str) -> str:
        counts = batch.get("counts", {})
        eta = batch.get("eta_seconds")
        prefix = "\r\x1b[K" if self._interactive else ""
        end = "" if self._interactive else "\n"
        return (
            f"{prefix}{phase}: batch {batch.get('status')}, completed "
            f"{counts.get('completed', 0)}/{batch.get('total', 0)}, failed "
            f"{counts.get('failed', 0)}, cancelled {counts.get('cancelled', 0)} | "
            f"{batch.get('images_per_second', 0):.1f} images/s | eta "
            f"{'?' if eta is None else f'{eta:.0f}s'}{end}"
        )


# ---------------------------------------------------------------------------------------------
# Waiting for completion


class CompletionWatcher:
    """A thread that polls `GET /images?ids=` (100 ids a request) for every accepted image.

    It runs while uploads continue, so each image's completion time is seen promptly, and stops
    once the uploads are over and every image is terminal, or `timeout_s` after the uploads.
    """

    def __init__(
        self,
        connection: ApiConnection,
        options: UploadOptions,
        on_change: Callable[[], None],
    ) -> None:
        self._connection = connection
        self._options = options
        self._on_change = on_change
        self._pending: dict[str, FileResult] = {}
        self._lock = threading.Lock()
        self._uploads_done = threading.Event()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="upload-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, files: Iterable[FileResult]) -> None:
        with self._lock:
            for item in files:
                if item.image_id is not None and item.outcome == "accepted":
                    self._pending[item.image_id] = item

    def finish(self) -> None:
        """Uploads are over: wait for the rest (bounded), then mark stragglers unfinished."""
        self._deadline = time.monotonic() + self._options.wait_timeout_s
        self._uploads_done.set()
        self._thread.join()
        with self._lock:
            for item in self._pending.values():
                item.outcome = "unfinished"
                item.reason = f"not terminal after {self._options.wait_timeout_s:g}s"

    def _run(self) -> None:
        while True:
            with self._lock:
                ids = list(self._pending)
            if not ids and self._uploads_done.is_set():
                return
            if self._deadline is not None and time.monotonic() > self._deadline:
                return
            for start in range(0, len(ids), MAX_IDS_PER_POLL):
                self._poll(ids[start : start + MAX_IDS_PER_POLL])
            time.sleep(self._options.poll_interval_s)

    def _poll(self, ids: list[str]) -> None:
        try:
            response = self._connection.request("GET", "/api/v1/images?ids=" + ",".join(ids))
        except TransientFailure:
            return
        if response.status != 200:
            return
        seen = time.time()
        changed = False
        for document in response.json().get("items", []):
            if document.get("status") in TERMINAL_STATUSES:
                changed |= self._settle(document, seen)
        if changed:
            self._on_change()

    def _settle(self, document: dict[str, Any], seen: float) -> bool:
        with self._lock:
            item = self._pending.pop(str(document.get("id")), None)
        if item is None:
            return False
        # A cancelled image (its batch was cancelled) did not get a result either.
        item.outcome = "completed" if document["status"] == "completed" else "failed"
        item.completed_at = seen
        item.result_content_type = (document.get("result") or {}).get("content_type")
        if item.outcome == "failed":
            item.reason = document.get("error") or f"{document['status']} without a reason"
        return True


class BatchWatcher:
    """Follows the batch document (one cheap request, whatever the batch's size) until the batch
    has finished or was cancelled, then learns which images failed from the batch's failed and
    cancelled lists: the images not named there completed."""

    def __init__(
        self,
        connection: ApiConnection,
        options: UploadOptions,
        report: UploadReport,
        on_change: Callable[[], None],
    ) -> None:
        self._connection = connection
        self._options = options
        self._report = report
        self._on_change = on_change

    def follow(self, batch_id: str) -> None:
        """Poll until the batch has ended or `wait_timeout_s` passed; then settle every file."""
        deadline = time.monotonic() + self._options.wait_timeout_s
        while time.monotonic() < deadline:
            document = self._read(f"/api/v1/batches/{batch_id}")
            if document is not None:
                self._report.batch = document
                self._on_change()
                if document.get("status") in BATCH_ENDED:
                    break
            time.sleep(self._options.poll_interval_s)
        self._settle(batch_id)

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            response = self._connection.request("GET", path)
        except TransientFailure:
            return None
        return response.json() if response.status == 200 else None

    def _settle(self, batch_id: str) -> None:
        ended = (self._report.batch or {}).get("status") in BATCH_ENDED
        unsuccessful = {
            **self._listed(batch_id, "failed"),
            **self._listed(batch_id, "cancelled"),
        }
        now = time.time()
        for item in self._report.files:
            if item.outcome != "accepted" or item.image_id is None or item.from_journal:
                continue
            document = unsuccessful.get(item.image_id)
            if document is not None:
                item.outcome, item.completed_at = "failed", now
                item.reason = document.get("error") or f"{document.get('status')} with its batch"
            elif ended:
                item.outcome, item.completed_at = "completed", now
            else:
                item.outcome = "unfinished"
                item.reason = f"the batch had not finished after {self._options.wait_timeout_s:g}s"

    def settle_journaled(self) -> None:
        """Files accepted by an earlier run may belong to another batch (or none): their images
        are read by id, 100 a request, once."""
        earlier = [f for f in self._report.files if f.from_journal and f.image_id is not None]
        for start in range(0, len(earlier), MAX_IDS_PER_POLL):
            chunk = {str(f.image_id): f for f in earlier[start : start + MAX_IDS_PER_POLL]}
            page = self._read("/api/v1/images?ids=" + ",".join(chunk)) or {}
            for document in page.get("items", []):
                item = chunk.get(str(document.get("id")))
                if item is not None and document.get("status") in TERMINAL_STATUSES:
                    item.outcome = "completed" if document["status"] == "completed" else "failed"
                    item.reason = document.get("error")
                    item.result_content_type = (document.get("result") or {}).get("content_type")
        for item in earlier:
            if item.outcome == "accepted":
                item.outcome, item.reason = "unfinished", "not terminal yet"

    def _listed(self, batch_id: str, status: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        cursor = ""
        while True:
            page = self._read(
                f"/api/v1/batches/{batch_id}/images?status={status}&limit=100{cursor}"
            )
            if page is None:
                return found
            found.update({str(d["id"]): d for d in page.get("items", [])})
            if not page.get("next_cursor"):
                return found
            cursor = f"&cursor={page['next_cursor']}"


# ---------------------------------------------------------------------------------------------
# Uploading


class UploadClient:
    """Uploads files through the bulk route (or one by one), journals and waits for them."""

    def __init__(self, options: UploadOptions) -> None:
        if options.concurrency < 1 or options.batch_size < 1:
            raise ValueError("concurrency and batch size must be at least 1")
        self.options = options
        self.policy = RetryPolicy(
            options.max_attempts, options.backoff_base_s, options.backoff_cap_s
        )
        self.journal = UploadJournal(options.journal_path) if options.journal_path else None
        self._local = threading.local()
        self._connections: list[ApiConnection] = []
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._single = options.single
        self.report = UploadReport(route="single" if options.single else "bulk")
        self.batch_id = options.batch_id

    def _connection(self) -> ApiConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self.new_connection()
            self._local.connection = connection
        return connection

    def new_connection(self) -> ApiConnection:
        connection = ApiConnection(
            self.options.url, self.options.token, self.options.request_timeout_s
        )
        with self._lock:
            self._connections.append(connection)
        return connection

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()

    # -- planning ---------------------------------------------------------------------------

    def prepare(self, paths: Sequence[Path], refused: Sequence[tuple[Path, str]] = ()) -> None:
        """Hash every file and apply the journal; refused files are reported as rejected."""
        known = self.journal.load() if self.journal else {}
        for path, reason in refused:
            self.report.files.append(
                FileResult(path, path.name, "", 0, outcome="rejected", reason=reason)
            )
        for path in paths:
            digest, size = file_sha256(path)
            item = FileResult(path, path.name, digest, size)
            if digest in known:
                item.image_id, item.outcome, item.from_journal = known[digest], "accepted", True
            self.report.files.append(item)

    def batches(self) -> list[list[FileResult]]:
        """Batches formed over all files in a stable order, then stripped of journaled files,
        so that a batch interrupted after the server accepted it is sent again identically."""
        candidates = [f for f in self.report.files if f.sha256]
        size = 1 if self._single else self.options.batch_size
        planned = [candidates[i : i + size] for i in range(0, len(candidates), size)]
        return [
            [f for f in batch if not f.from_journal]
            for batch in planned
            if any(not f.from_journal for f in batch)
        ]

    # -- running ----------------------------------------------------------------------------

    def run(self) -> UploadReport:
        """Upload every prepared file, wait for completion and download results as asked."""
        if self.batch_id is not None:
            return self._run_in_batch(self.batch_id)
        report = self.report
        progress = ProgressLine(self.options.progress_stream, len(report.files))
        watcher = CompletionWatcher(
            self.new_connection(), self.options, lambda: progress.show(report, "waiting")
        )
        if self.options.wait:
            watcher.watch(report.files)
            watcher.start()
        report.started_at = time.time()
        try:
            self._upload_all(watcher if self.options.wait else None, progress)
            report.uploads_ended_at = time.time()
            if self.options.wait:
                watcher.finish()
            if self.options.out_dir is not None and self.options.wait:
                self._download_all(self.options.out_dir)
        finally:
            report.finished_at = time.time()
            progress.show(report, "done", final=True)
            self.close()
        return report

    def _run_in_batch(self, batch_id: str) -> UploadReport:
        """Upload into the batch, close it once every file has been answered, and follow the
        batch document instead of the images."""
        report = self.report
        progress = ProgressLine(self.options.progress_stream, len(report.files))
        report.started_at = time.time()
        try:
            self._upload_all(None, progress)
            report.uploads_ended_at = time.time()
            if report.aborted is None and all(_answered(f) for f in report.files):
                self.close_batch(batch_id)
            if self.options.wait:
                watcher = BatchWatcher(
                    self.new_connection(),
                    self.options,
                    report,
                    lambda: progress.show(report, "waiting"),
                )
                watcher.follow(batch_id)
                watcher.settle_journaled()
                if self.options.out_dir is not None:
                    self._download_all(self.options.out_dir)
        finally:
            report.finished_at = time.time()
            progress.show(report, "done", final=True)
            self.close()
        return report

    def close_batch(self, batch_id: str) -> None:
        connection = self._connection()
        response, _, reason = send_with_retries(
            lambda: connection.request("POST", f"/api/v1/batches/{batch_id}/close"), self.policy
        )
        if response is None or response.status != 200:
            why = reason or (response.error_text() if response else "no answer")
            self.report.aborted = f"could not close batch {batch_id}: {why}"

    def _upload_all(self, watcher: CompletionWatcher | None, progress: ProgressLine) -> None:
        def upload(batch: list[FileResult]) -> None:
            if self._abort.is_set():
                return
            try:
                self.upload_batch(batch)
            except UploadAborted as exc:
                self.report.aborted = str(exc)
                self._abort.set()
                return
            if watcher is not None:
                watcher.watch(batch)
            progress.show(self.report, "uploading")

        with ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="upload") as pool:
            list(pool.map(upload, self.batches()))

    def upload_batch(self, batch: list[FileResult]) -> None:
        """Send one batch (bulk route, or one file per request) and record what came back."""
        if self._single:
            for item in batch:
                self._send(self._single_request, [item])
        else:
            self._send(self._bulk_request, batch)
        if self.journal is not None:
            self.journal.record(f for f in batch if not f.from_journal)

    def _send(
        self,
        request: Callable[[list[FileResult], list[bytes], str, str], ApiResponse],
        batch: list[FileResult],
    ) -> None:
        chunks, content_type = multipart_body([(f.filename, f.path.read_bytes()) for f in batch])
        route = "single" if request == self._single_request else "bulk"
        # A run asking for other renditions is another request, not a replay of the first (the
        # same ones in another order are the same request: the server makes them in its order).
        renditions = ",".join(sorted(self.options.renditions))
        salt = self.options.key_salt + (self.batch_id or "") + renditions
        key = idempotency_key(route, batch, salt)
        started = time.time()
        response, attempts, reason = send_with_retries(
            lambda: request(batch, chunks, content_type, key), self.policy
        )
        ended = time.time()
        status = None if response is None else response.status
        with self._lock:
            self.report.requests.append(RequestRecord(started, ended, status, len(batch), attempts))
        for item in batch:
            item.request_started, item.request_ended, item.attempts = started, ended, attempts
        if response is None:
            _reject(batch, reason or "no answer", None)
        elif route == "bulk" and response.status in (404, 405):
            self._fall_back_to_single(batch)
        elif route == "bulk" and response.status == 413 and len(batch) > 1:
            self._split(batch)
        else:
            self._apply(route, batch, response, ended)

    def _bulk_request(
        self, batch: list[FileResult], chunks: list[bytes], content_type: str, key: str
    ) -> ApiResponse:
        headers = {"Content-Type": content_type, "Idempotency-Key": key}
        return self._connection().request("POST", self._route("/api/v1/uploads"), chunks, headers)

    def _single_request(
        self, batch: list[FileResult], chunks: list[bytes], content_type: str, key: str
    ) -> ApiResponse:
        headers = {"Content-Type": content_type, "Idempotency-Key": key}
        return self._connection().request("POST", self._route("/api/v1/upload"), chunks, headers)

    def _route(self, path: str) -> str:
        query = {}
        if self.batch_id is not None:
            query["batch"] = self.batch_id
        if self.options.renditions:
            query["renditions"] = ",".join(self.options.renditions)
        return f"{path}?{urlencode(query)}" if query else path

    def _fall_back_to_single(self, batch: list[FileResult]) -> None:
        if not self._single:
            self._single = True
            self.report.route = "single (bulk route not found)"
            if self.options.progress_stream is not None:
                print(
                    "\nthe bulk route is missing; uploading one file per request",
                    file=self.options.progress_stream,
                )
        for item in batch:
            self._send(self._single_request, [item])

    def _split(self, batch: list[FileResult]) -> None:
        middle = len(batch) // 2
        self._send(self._bulk_request, batch[:middle])
        self._send(self._bulk_request, batch[middle:])

    def _apply(self, route: str, batch: list[FileResult], response: ApiResponse, at: float) -> None:
        if response.status in FATAL_STATUSES:
            _reject(batch, f"HTTP {response.status} {response.error_text()}", response.status)
            raise UploadAborted(f"the server refused the client: {response.error_text()}")
        if route == "single":
            if response.status in ACCEPTED_STATUSES:
                _accept(batch[0], response.json(), at, response.status)
            else:
                _reject(batch, response.error_text(), response.status)
            return
        if response.status == 207:
            _apply_bulk_items(batch, response.json(), at)
        else:
            _reject(batch, f"whole request refused: {response.error_text()}", response.status)

    # -- downloads --------------------------------------------------------------------------

    def _download_all(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        targets = result_names([f for f in self.report.files if f.outcome == "completed"])
        with ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="download") as pool:
            list(pool.map(lambda pair: self._download(pair[0], out_dir / pair[1]), targets))

    def _download(self, item: FileResult, target: Path) -> None:
        if target.exists():
            item.download_path = target
            return
        connection = self._connection()
        response, _, reason = send_with_retries(
            lambda: connection.request("GET", f"/api/v1/images/{item.image_id}"), self.policy
        )
        if response is None or response.status != 200:
            item.reason = reason or (response.error_text() if response else "no answer")
            return
        document = response.json()
        url = document.get("download_url")
        if not url:
            item.reason = "completed but no download_url"
            return
        # Every rendition but the main result is `<stem>.<rendition>.<extension>`; the main one,
        # `target`, is written last, so that its presence means all of them are there.
        main_key = (document.get("result") or {}).get("key")
        for rendition in document.get("renditions", []):
            if rendition["key"] == main_key:
                continue
            extension = EXTENSION_BY_CONTENT_TYPE.get(rendition["content_type"], "bin")
            name = f"{target.stem}.{rendition['name']}.{extension}"
            self._fetch(rendition["url"], target.with_name(name))
        self._fetch(url, target)
        item.download_path = target

    def _fetch(self, url: str, target: Path) -> None:
        partial = target.with_name(target.name + ".part")
        with urllib.request.urlopen(url, timeout=self.options.request_timeout_s) as source:
            partial.write_bytes(source.read())
        partial.replace(target)


def _accept(
    item: FileResult, document: dict[str, Any], at: float, status_code: int | None = None
) -> None:
    item.image_id = str(document["id"])
    item.http_status = 201 if status_code is None else status_code
    item.accepted_at = at
    status = document.get("status")
    item.outcome = "accepted"
    if status in TERMINAL_STATUSES:  # an earlier copy (dedupe), already done
        item.outcome = "completed" if status == "completed" else "failed"
    if item.outcome != "accepted":
        item.completed_at = at
        item.reason = document.get("error")


def _answered(item: FileResult) -> bool:
    """The server answered for this file (accepted or refused it), now or in an earlier run."""
    return item.from_journal or item.http_status is not None or not item.sha256


def _reject(batch: Iterable[FileResult], reason: str, status: int | None) -> None:
    for item in batch:
        item.outcome, item.reason, item.http_status = "rejected", reason, status


def _apply_bulk_items(batch: list[FileResult], body: dict[str, Any], at: float) -> None:
    answered = set()
    for entry in body.get("items", []):
        index = entry.get("index")
        if not isinstance(index, int) or not 0 <= index < len(batch):
            continue
        answered.add(index)
        if entry.get("status") in ACCEPTED_STATUSES and entry.get("image"):
            _accept(batch[index], entry["image"], at, entry["status"])
        else:
            error = entry.get("error") or {}
            reason = f"{error.get('code', 'error')}: {error.get('message', 'refused')}"
            _reject([batch[index]], reason, entry.get("status"))
    missing = [item for i, item in enumerate(batch) if i not in answered]
    _reject(missing, "the server's answer did not mention this file", None)


def result_names(files: Sequence[FileResult]) -> list[tuple[FileResult, str]]:
    """`<stem>.<result type>` per completed file; a name seen before gets the image id added."""
    used: set[str] = set()
    names = []
    for item in sorted(files, key=lambda f: str(f.path)):
        stem = Path(item.filename).stem or "image"
        extension = "." + EXTENSION_BY_CONTENT_TYPE.get(item.result_content_type or "", "png")
        name = f"{stem}{extension}"
        if name in used:
            name = f"{stem}-{(item.image_id or '')[:8]}{extension}"
        used.add(name)
        names.append((item, name))
    return names


def upload_files(
    paths: Sequence[Path], options: UploadOptions, exclude: Iterable[Path] = ()
) -> UploadReport:
    """Find images under `paths`, upload them, wait and download as `options` say."""
    chosen, refused = discover_images(paths, exclude)
    if options.use_batch and options.batch_id is None:
        options = replace(options, batch_id=open_batch_for_run(options))
    client = UploadClient(options)
    client.prepare(chosen, refused)
    return client.run()


def open_batch_for_run(options: UploadOptions) -> str:
    """The batch this run uploads into: the one an interrupted run left open (remembered next
    to the journal), or a new one."""
    remembered = _remembered_batch(options)
    connection = ApiConnection(options.url, options.token, options.request_timeout_s)
    policy = RetryPolicy(options.max_attempts, options.backoff_base_s, options.backoff_cap_s)
    try:
        if remembered is not None:
            response, _, _ = send_with_retries(
                lambda: connection.request("GET", f"/api/v1/batches/{remembered}"), policy
            )
            if (
                response is not None
                and response.status == 200
                and response.json().get("status") == "open"
            ):
                return remembered
        body = json.dumps({"name": options.batch_name or "pixelmill-upload"}).encode()
        response, _, reason = send_with_retries(
            lambda: connection.request(
                "POST", "/api/v1/batches", [body], {"Content-Type": "application/json"}
            ),
            policy,
        )
    finally:
        connection.close()
    if response is None or response.status != 201:
        why = reason or (response.error_text() if response else "no answer")
        raise UploadAborted(f"could not create a batch: {why}")
    batch_id = str(response.json()["id"])
    if options.journal_path is not None:
        path = options.journal_path.with_name(BATCH_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(batch_id + "\n", encoding="utf-8")
    return batch_id


def _remembered_batch(options: UploadOptions) -> str | None:
    if options.journal_path is None:
        return None
    path = options.journal_path.with_name(BATCH_FILE)
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Batch archives

DOWNLOAD_CHUNK = 1024 * 1024


class DownloadFailed(Exception):
    """The archive could not be downloaded (refused, or the attempts ran out)."""


@dataclass(frozen=True)
class PartialDownload:
    """What an interrupted download left: `<out>.part` (the bytes so far) and `<out>.etag`
    (the version they are of), so the next attempt, or the next run, asks for the rest only
    if the archive is still that version (`If-Range`)."""

    out: Path

    @property
    def part(self) -> Path:
        return self.out.with_name(self.out.name + ".part")

    @property
    def etag_file(self) -> Path:
        return self.out.with_name(self.out.name + ".etag")

    def have(self) -> tuple[int, str | None]:
        try:
            etag = self.etag_file.read_text(encoding="utf-8").strip() or None
            return (self.part.stat().st_size, etag) if etag else (0, None)
        except OSError:
            return 0, None

    def restart(self, etag: str) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.part.write_bytes(b"")
        self.etag_file.write_text(etag + "\n", encoding="utf-8")

    def finish(self) -> None:
        self.part.replace(self.out)
        self.etag_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class DownloadResult:
    """`size`: the archive's length; `fetched`: the bytes this run received (less when it
    resumed what an earlier run left)."""

    size: int
    fetched: int


def archive_path(batch_id: str, renditions: Sequence[str]) -> str:
    query = f"?{urlencode({'renditions': ','.join(renditions)})}" if renditions else ""
    return f"/api/v1/batches/{batch_id}/archive{query}"


def download_archive(
    connection: ApiConnection,
    batch_id: str,
    out: Path,
    renditions: Sequence[str] = (),
    policy: RetryPolicy = RetryPolicy(),
) -> DownloadResult:
    """Save the batch's archive as `out`, resuming after every interruption (and from what an
    earlier run left). An attempt that brought bytes resets the count of failures, so a long
    download over a flaky link goes on; DownloadFailed when refused, or after
    `policy.max_attempts` attempts in a row without progress."""
    partial = PartialDownload(out)
    fetched = failures = 0
    while True:
        try:
            attempt = _download_rest(connection, archive_path(batch_id, renditions), partial)
        except TransientFailure as exc:
            attempt = _Attempt(False, 0, str(exc))
        finally:
            connection.close()
        fetched += attempt.received
        if attempt.done:
            size = partial.part.stat().st_size
            partial.finish()
            return DownloadResult(size, fetched)
        failures = 0 if attempt.received else failures + 1
        if failures >= policy.max_attempts:
            raise DownloadFailed(
                f"gave up after {failures} attempts without progress: {attempt.reason}"
            )
        time.sleep(policy.delay(max(failures, 1), None))


@dataclass(frozen=True)
class _Attempt:
    done: bool
    received: int
    reason: str = ""


def _download_rest(connection: ApiConnection, path: str, partial: PartialDownload) -> _Attempt:
    """One request for what `partial` lacks: whether it now holds the whole archive, and the
    bytes received (kept in `partial` even when the transfer was cut off)."""
    have, etag = partial.have()
    headers = {"Range": f"bytes={have}-", "If-Range": etag} if have and etag else {}
    response = connection.open_download(path, headers)
    if response.status in TRANSIENT_STATUSES:
        raise TransientFailure(f"HTTP {response.status}")
    if response.status == 416:
        # What we hold is already the whole of that version; anything else starts over.
        whole = response.getheader("Content-Range", "").rpartition("/")[2]
        if whole == str(have):
            return _Attempt(True, 0)
        partial.restart("")
        return _Attempt(False, 0, "the archive changed; starting over")
    if response.status not in (200, 206):
        body = ApiResponse(response.status, {}, response.read())
        raise DownloadFailed(f"HTTP {response.status} {body.error_text()}")
    if response.status == 206 and not response.getheader("Content-Range", "").startswith(
        f"bytes {have}-"
    ):
        partial.restart("")
        raise TransientFailure("the server answered another range; starting over")
    if response.status == 200:
        partial.restart(response.getheader("ETag", ""))
        have = 0
    total = have + int(response.getheader("Content-Length", "0"))
    received = 0
    reason = "the answer ended early"
    with partial.part.open("r+b") as sink:
        sink.seek(have)
        sink.truncate()
        try:
            while chunk := response.read(DOWNLOAD_CHUNK):
                sink.write(chunk)
                received += len(chunk)
        except (OSError, http.client.HTTPException) as exc:
            reason = f"download interrupted: {exc!r}"
    return _Attempt(partial.part.stat().st_size == total, received, reason)


# ---------------------------------------------------------------------------------------------
# Summary and command line


def format_summary(report: UploadReport) -> str:
    """What a person needs after a run: counts, then every failure and rejection with its reason."""
    counts = report.counts()
    elapsed = max(report.finished_at - report.started_at, 1e-6)
    lines = [
        f"route: {report.route}; {counts['files']} files in {elapsed:.1f}s",
        f"  uploaded now:      {counts['uploaded_now']}",
        f"  accepted earlier:  {counts['from_journal']} (from the journal)",
        f"  completed:         {counts['completed']}",
        f"  failed:            {counts['failed']}",
        f"  rejected:          {counts['rejected']}",
        f"  not finished:      {counts['unfinished'] + counts['accepted']}",
        f"  downloaded:        {counts['downloaded']}",
    ]
    if report.batch is not None:
        lines.insert(
            1, f"  batch:             {report.batch.get('id')} ({report.batch.get('status')})"
        )
    if report.aborted:
        lines.append(f"aborted: {report.aborted}")
    for outcome in ("failed", "rejected", "unfinished"):
        for item in report.with_outcome(outcome):
            lines.append(f"{outcome}: {item.path}: {item.reason}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelmill-upload", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="upload files and folders of JPEG/PNG images")
    upload.add_argument("paths", type=Path, nargs="+", metavar="DIR_OR_FILE")
    upload.add_argument("--url", default="http://127.0.0.1:3000")
    upload.add_argument("--token", help="bearer token (default: $PIXELMILL_TOKEN)")
    upload.add_argument("--concurrency", type=int, default=4, help="parallel connections")
    upload.add_argument("--batch-size", type=int, default=16, help="images per bulk request")
    upload.add_argument("--single", action="store_true", help="one image per request")
    upload.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True)
    upload.add_argument("--out", type=Path, help="download the results into this folder")
    upload.add_argument(
        "--state-dir", type=Path, help="journal folder (default: --out or ./.pixelmill-upload)"
    )
    upload.add_argument(
        "--timeout", type=float, default=600.0, help="longest wait for completion, s"
    )
    upload.add_argument("--request-timeout", type=float, default=120.0, help="per request, s")
    upload.add_argument("--batch", help="upload into this open batch (default: a new one)")
    upload.add_argument("--name", help="the new batch's name")
    upload.add_argument(
        "--renditions",
        help="make only these renditions, e.g. thumb,preview (default: every configured one); "
        "--out downloads each rendition an image has",
    )
    for name, text in (
        ("retry", "queue a batch's failed images again"),
        ("cancel", "cancel a batch's images not yet started"),
    ):
        steer = commands.add_parser(name, help=text)
        steer.add_argument("batch", metavar="BATCH")
        steer.add_argument("--url", default="http://127.0.0.1:3000")
        steer.add_argument("--token", help="bearer token (default: $PIXELMILL_TOKEN)")
    download = commands.add_parser(
        "download", help="save a batch's completed results as one ZIP (resumes if interrupted)"
    )
    download.add_argument("batch", metavar="BATCH")
    download.add_argument("--renditions", help="e.g. default,thumb (default: the first one)")
    download.add_argument("--out", type=Path, help="the ZIP file (default: batch-BATCH.zip)")
    download.add_argument("--url", default="http://127.0.0.1:3000")
    download.add_argument("--token", help="bearer token (default: $PIXELMILL_TOKEN)")
    return parser


def options_from(args: argparse.Namespace, token: str) -> UploadOptions:
    state_dir = args.state_dir or args.out or DEFAULT_STATE_DIR
    return UploadOptions(
        url=args.url,
        token=token,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        single=args.single,
        wait=args.wait,
        wait_timeout_s=args.timeout,
        request_timeout_s=args.request_timeout,
        out_dir=args.out,
        journal_path=state_dir / JOURNAL_NAME,
        progress_stream=sys.stderr,
        batch_id=args.batch,
        use_batch=True,
        batch_name=args.name,
        renditions=tuple(n.strip() for n in (args.renditions or "").split(",") if n.strip()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when everything completed; 1 when anything was rejected, failed or unfinished."""
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get("PIXELMILL_TOKEN")
    if not token:
        print("pixelmill-upload: give --token or set PIXELMILL_TOKEN", file=sys.stderr)
        return 2
    if args.command in ("retry", "cancel"):
        return steer_batch(args.url, token, args.command, args.batch)
    if args.command == "download":
        return download_command(args, token)
    if args.concurrency < 1 or args.batch_size < 1:
        print(
            "pixelmill-upload: --concurrency and --batch-size must be at least 1", file=sys.stderr
        )
        return 2
    options = options_from(args, token)
    exclude = [p for p in (args.out, args.state_dir) if p is not None]
    try:
        report = upload_files(args.paths, options, exclude)
    except UploadAborted as exc:
        print(f"pixelmill-upload: {exc}", file=sys.stderr)
        return 1
    print(format_summary(report))
    return 0 if report.ok else 1


def steer_batch(url: str, token: str, action: str, batch_id: str) -> int:
    """`retry` or `cancel` a batch; prints the answer (how many images it moved)."""
    connection = ApiConnection(url, token, 30.0)
    try:
        response, _, reason = send_with_retries(
            lambda: connection.request("POST", f"/api/v1/batches/{batch_id}/{action}"),
            RetryPolicy(),
        )
    finally:
        connection.close()
    if response is None or response.status != 202:
        why = reason or (response.error_text() if response else "no answer")
        print(f"pixelmill-upload {action}: {why}", file=sys.stderr)
        return 1
    print(json.dumps(response.json()))
    return 0


def download_command(args: argparse.Namespace, token: str) -> int:
    out = args.out or Path(f"batch-{args.batch}.zip")
    names = [n.strip() for n in (args.renditions or "").split(",") if n.strip()]
    connection = ApiConnection(args.url, token, 120.0)
    try:
        result = download_archive(connection, args.batch, out, names)
    except DownloadFailed as exc:
        print(f"pixelmill-upload download: {exc}", file=sys.stderr)
        return 1
    resumed = result.size - result.fetched
    print(f"{out}: {result.size} bytes" + (f" (resumed at byte {resumed})" if resumed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
