"""A batch's archive: a ZIP of its completed images' renditions and `failed.csv`, planned from
the rows alone (every rendition's size and CRC-32 is stored) and streamed from S3 an object at
a time, so any byte range of it can be sent and memory does not grow with the batch.

Entry names come from the original filenames: the stem (`archive_stem` in
`db/migrations/0011_batch_archives.sql`) with `REPLACED_CHARACTERS` turned into `_`, then
`~N` for the N-th image of its name group (N >= 2), then `.<rendition>` for any rendition but
the deployment's first, then the format's extension: `photo.png`, `photo.thumb.webp`,
`photo~2.png`. A safe stem has no `.` or `~`, so the parts of a name read back unambiguously,
and images whose safe stems could match (ASCII case aside) share a name group and get distinct
N: names are unique, case-insensitively too, without remembering the names already given.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from common import formats
from common.storage import ObjectStore
from common.zipstream import (
    FORMAT_LIMITS,
    Entry,
    Limits,
    Literal,
    Payload,
    Piece,
    archive_segments,
    archive_size,
    dos_time,
)
from common.zipstream import window as zip_window
from db import batch_archive
from db.batch_archive import ArchivedImage
from db.images import StoredRendition
from db.pool import Database

log = logging.getLogger(__name__)

# Characters no entry name keeps: path separators, `.` and `~` (they separate a name's parts),
# `_` (what replaces them), ASCII and C1 control characters, bidirectional overrides, and what
# Windows refuses. The SQL function `archive_group` deletes the same set: change both together.
REPLACED_CHARACTERS = re.compile(
    '[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069/\\\\:*?"<>|~._]'
)
FAILED_LIST = "failed.csv"
FAILED_COLUMNS = ("id", "filename", "reason")
ROWS_PER_PAGE = 500
# Reads of the rows per response: the plan (length and ETag), the entries, the central directory.
ROW_PASSES = 3
# Bytes gathered before a write: small objects would otherwise each cost a socket write.
FLUSH_BYTES = 256 * 1024
# Objects up to this size are fetched ahead, on this many threads, at most this many pieces
# (3 per entry: header, data, descriptor) ahead: at most 8 MiB held per download.
PREFETCH_MAX_BYTES = 1024 * 1024
PREFETCH_THREADS = 4
PREFETCH_PIECES = 24


class ArchiveChanged(Exception):
    """The batch's rows or objects changed while its archive was sent: the bytes already sent
    no longer match the length and ETag answered, so the response must be cut short."""


def safe_stem(stem: str) -> str:
    return REPLACED_CHARACTERS.sub("_", stem) or "_"


def entry_name(stem: str, ordinal: int, rendition: str | None, extension: str) -> str:
    """`ordinal`: the image's place in its name group, from 1; `rendition`: None for the
    deployment's first rendition, whose entries carry no rendition name."""
    numbered = safe_stem(stem) + (f"~{ordinal}" if ordinal > 1 else "")
    middle = f".{rendition}" if rendition is not None else ""
    return f"{numbered}{middle}.{extension}"


@dataclass(frozen=True)
class ResultObject:
    """An entry whose bytes are a stored rendition."""

    key: str


@dataclass(frozen=True)
class FailedList:
    """The `failed.csv` entry, made from the failed rows."""


@dataclass(frozen=True)
class ArchivePlan:
    size: int
    etag: str


class BatchArchive:
    """One batch's archive for one choice of renditions. `plan()` reads the rows once for the
    length and ETag (computing and keeping any CRC a row lacks); `body()` sends a byte range,
    reading the rows again and only the objects the range covers, and cuts the response short
    if what it reads no longer matches the plan."""

    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        batch_id: uuid.UUID,
        renditions: Sequence[str],
        first_rendition: str,
        created_at: datetime,
        limits: Limits = FORMAT_LIMITS,
    ) -> None:
        self._db = db
        self._store = store
        self._batch_id = batch_id
        self._renditions = tuple(renditions)
        self._first = first_rendition
        self._created_at = created_at
        self._limits = limits

    def plan(self) -> ArchivePlan:
        digest = self._digest()
        entries = _fed(self._entries(), digest)
        return ArchivePlan(archive_size(entries, self._limits), f'"{digest.hexdigest()[:32]}"')

    def body(self, plan: ArchivePlan, start: int, stop: int) -> Iterator[bytes]:
        """Bytes `[start, stop)` of the archive, in chunks of about FLUSH_BYTES."""
        segments = archive_segments(lambda: self._checked_entries(plan), self._limits)
        held = b""
        for chunk in _gathered(self._prefetched(zip_window(segments, start, stop))):
            if held:
                yield held
            held = chunk
        # The last chunk waits until the rest of the rows were read and matched the plan.
        for _ in segments:
            pass
        if held:
            yield held

    def _digest(self) -> hashlib._Hash:
        digest = hashlib.sha256()
        digest.update(repr((self._renditions, self._limits)).encode())
        return digest

    def _checked_entries(self, plan: ArchivePlan) -> Iterator[Entry]:
        digest = self._digest()
        yield from _fed(self._entries(), digest)
        if f'"{digest.hexdigest()[:32]}"' != plan.etag:
            raise ArchiveChanged(f"batch {self._batch_id} changed while its archive was sent")

    def _entries(self) -> Iterator[Entry]:
        group: str | None = None
        ordinal = 0
        for image in self._completed():
            ordinal = ordinal + 1 if image.name_group == group else 1
            group = image.name_group
            for rendition in self._chosen(image):
                yield self._rendition_entry(image, ordinal, rendition)
        size, crc = self._failed_list_sums()
        yield Entry(FAILED_LIST, size, crc, self._created_at, FailedList())

    def _chosen(self, image: ArchivedImage) -> Iterator[StoredRendition]:
        by_name = {r.name: r for r in image.stored_renditions}
        # An image made without a rendition asked for has no entry for it.
        return (by_name[name] for name in self._renditions if name in by_name)

    def _rendition_entry(
        self, image: ArchivedImage, ordinal: int, rendition: StoredRendition
    ) -> Entry:
        extension = formats.EXTENSION_BY_CONTENT_TYPE.get(rendition.content_type, "bin")
        label = None if rendition.name == self._first else rendition.name
        name = entry_name(image.stem, ordinal, label, extension)
        size, crc = rendition.bytes, rendition.crc32
        if size is None or crc is None:
            size, crc = self._computed_sums(image.id, rendition.key)
        return Entry(name, size, crc, image.updated_at, ResultObject(rendition.key))

    def _computed_sums(self, image_id: uuid.UUID, key: str) -> tuple[int, int]:
        """Size and CRC of a rendition stored before CRCs were kept: read it once, keep them."""
        size = crc = 0
        for chunk in self._store.stream_result(key):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
        with self._db.transaction() as conn:
            batch_archive.record_checksum(conn, image_id, key, crc, size)
        return size, crc

    def _completed(self) -> Iterator[ArchivedImage]:
        after: tuple[str, uuid.UUID] | None = None
        while True:
            with self._db.transaction() as conn:
                page = batch_archive.completed_page(
                    conn, self._batch_id, after=after, limit=ROWS_PER_PAGE
                )
            yield from page
            if len(page) < ROWS_PER_PAGE:
                return
            after = (page[-1].name_group, page[-1].id)

    def _failed_list_sums(self) -> tuple[int, int]:
        size = crc = 0
        for chunk in self._failed_list():
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
        return size, crc

    def _failed_list(self) -> Iterator[bytes]:
        """`failed.csv`: a header, then one line per failed image, oldest first (UTF-8)."""
        yield _csv_line(FAILED_COLUMNS)
        after: tuple[datetime, uuid.UUID] | None = None
        while True:
            with self._db.transaction() as conn:
                page = batch_archive.failed_page(
                    conn, self._batch_id, after=after, limit=ROWS_PER_PAGE
                )
            for row in page:
                yield _csv_line((str(row.id), row.filename, row.error or ""))
            if len(page) < ROWS_PER_PAGE:
                return
            after = (page[-1].created_at, page[-1].id)

    def _prefetched(self, pieces: Iterator[Piece]) -> Iterator[Iterable[bytes]]:
        """Each piece's bytes, in order. Small objects sent whole are fetched up to
        PREFETCH_PIECES pieces ahead on a few threads, so S3's latency per request overlaps
        the sending of the objects before; memory stays within PREFETCH_PIECES objects of at
        most PREFETCH_MAX_BYTES. Other pieces are streamed when their turn comes."""
        with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="archive-fetch") as pool:
            ahead: deque[Future[list[bytes]] | Iterable[bytes]] = deque()
            for piece in pieces:
                ahead.append(self._scheduled(pool, piece))
                if len(ahead) > PREFETCH_PIECES:
                    yield _settled(ahead.popleft())
            while ahead:
                yield _settled(ahead.popleft())

    def _scheduled(
        self, pool: ThreadPoolExecutor, piece: Piece
    ) -> Future[list[bytes]] | Iterable[bytes]:
        segment = piece.segment
        small_object = (
            isinstance(segment, Payload)
            and isinstance(segment.entry.source, ResultObject)
            and 0 < segment.entry.size <= PREFETCH_MAX_BYTES
            and (piece.start, piece.stop) == (0, segment.entry.size)
        )
        if small_object:
            return pool.submit(lambda: list(self._piece_bytes(piece)))
        return self._piece_bytes(piece)

    def _piece_bytes(self, piece: Piece) -> Iterable[bytes]:
        segment = piece.segment
        if isinstance(segment, Literal):
            return (segment.data[piece.start : piece.stop],)
        assert isinstance(segment, Payload)
        entry = segment.entry
        whole = piece.start == 0 and piece.stop == entry.size
        if isinstance(entry.source, FailedList):
            chunks = self._failed_list()
            return _verified(chunks, entry) if whole else _sliced(chunks, piece.start, piece.stop)
        assert isinstance(entry.source, ResultObject)
        if not entry.size:
            return ()
        if whole:
            return _verified(self._store.stream_result(entry.source.key), entry)
        length = piece.stop - piece.start
        return self._store.stream_result(entry.source.key, offset=piece.start, length=length)


def _fed(entries: Iterable[Entry], digest: hashlib._Hash) -> Iterator[Entry]:
    """The entries, each fed to `digest` as it passes (what the ETag is made of)."""
    for entry in entries:
        digest.update(
            repr((entry.name, entry.size, entry.crc32, dos_time(entry.modified))).encode()
        )
        yield entry


def _settled(item: Future[list[bytes]] | Iterable[bytes]) -> Iterable[bytes]:
    return item.result() if isinstance(item, Future) else item


def _verified(chunks: Iterable[bytes], entry: Entry) -> Iterator[bytes]:
    """An entry sent whole, checked against the size and CRC its headers promised."""
    size = crc = 0
    for chunk in chunks:
        size += len(chunk)
        crc = zlib.crc32(chunk, crc)
        yield chunk
    if (size, crc) != (entry.size, entry.crc32):
        raise ArchiveChanged(f"entry {entry.name!r} is not what its row described")


def _gathered(parts: Iterable[Iterable[bytes]]) -> Iterator[bytes]:
    buffer = bytearray()
    for part in parts:
        for data in part:
            buffer += data
            if len(buffer) >= FLUSH_BYTES:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def _sliced(chunks: Iterable[bytes], start: int, stop: int) -> Iterator[bytes]:
    position = 0
    for chunk in chunks:
        end = position + len(chunk)
        if end > start and position < stop:
            yield chunk[max(start - position, 0) : min(stop, end) - position]
        position = end
        if position >= stop:
            return


def _csv_line(fields: Sequence[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(fields)
    return out.getvalue().encode("utf-8")
