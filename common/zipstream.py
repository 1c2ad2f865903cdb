"""The byte layout of a ZIP archive written from entries whose sizes and CRC-32s are known before
their bytes are read: entry plan -> segments (header bytes, or "the entry's data") -> the part
of them a byte range covers. Pure: no I/O, so an archive's length, and any range of it, follow
from the plan alone.

Entries are STORED (method 0). Each local header sets general-purpose bit 3 and carries no CRC
or sizes; a data descriptor after the data and the central directory carry them, as a writer
that learns the CRC while sending would. Sizes and offsets at or past `Limits.field` use the
ZIP64 extra field, and an archive with more than `Limits.entries` entries, or whose central
directory lies past `Limits.field`, ends with the ZIP64 end records. (APPNOTE 6.3.10, sections
4.3.9, 4.3.14-16, 4.4.4, 4.5.3.)
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

LOCAL_SIGNATURE = 0x04034B50
DESCRIPTOR_SIGNATURE = 0x08074B50
CENTRAL_SIGNATURE = 0x02014B50
ZIP64_END_SIGNATURE = 0x06064B50
ZIP64_LOCATOR_SIGNATURE = 0x07064B50
END_SIGNATURE = 0x06054B50

FLAG_DATA_DESCRIPTOR = 0x0008
FLAG_UTF8 = 0x0800
STORED = 0
VERSION_PLAIN = 20
VERSION_ZIP64 = 45
# Made by "Unix" (3), so the external attributes below read as rw-r--r-- files.
MADE_BY = (3 << 8) | VERSION_ZIP64
FILE_ATTRIBUTES = (0o100644 << 16) & 0xFFFFFFFF
ZIP64_EXTRA_ID = 0x0001
MASK32 = 0xFFFFFFFF
MASK16 = 0xFFFF


@dataclass(frozen=True)
class Limits:
    """Where ZIP64 starts. The format's own limits by default; a test lowers them to see the
    ZIP64 records on small archives (readers accept ZIP64 fields for any value)."""

    field: int = MASK32
    entries: int = MASK16


FORMAT_LIMITS = Limits()


@dataclass(frozen=True)
class Entry:
    """One stored file: its name in the archive, its bytes' length and CRC-32, its time, and
    `source`, the caller's handle for where its bytes come from."""

    name: str
    size: int
    crc32: int
    modified: datetime
    source: Any = None


@dataclass(frozen=True)
class Literal:
    """Bytes the layout itself writes (headers, descriptors, the central directory)."""

    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Payload:
    """An entry's data: `entry.size` bytes the caller supplies."""

    entry: Entry

    @property
    def length(self) -> int:
        return self.entry.size


Segment = Literal | Payload


@dataclass(frozen=True)
class Piece:
    """The part `[start, stop)` of a segment that a byte range covers (offsets within it)."""

    segment: Segment
    start: int
    stop: int


@dataclass(frozen=True)
class _Placed:
    entry: Entry
    offset: int
    local: bytes
    descriptor: bytes
    central: bytes

    @property
    def span(self) -> int:
        return len(self.local) + self.entry.size + len(self.descriptor)


def archive_size(entries: Iterable[Entry], limits: Limits = FORMAT_LIMITS) -> int:
    """The archive's length in bytes, in one pass over the entries."""
    offset = count = central_size = 0
    for placed in _placed(entries, limits):
        offset += placed.span
        central_size += len(placed.central)
        count += 1
    return offset + central_size + len(_end_records(count, offset, central_size, limits))


def archive_segments(
    entries: Callable[[], Iterable[Entry]], limits: Limits = FORMAT_LIMITS
) -> Iterator[Segment]:
    """The archive as segments, in order. `entries` is called twice (the entries, then the
    central directory) and must give the same entries each time."""
    offset = 0
    for placed in _placed(entries(), limits):
        yield Literal(placed.local)
        yield Payload(placed.entry)
        yield Literal(placed.descriptor)
        offset += placed.span
    count = central_size = 0
    for placed in _placed(entries(), limits):
        yield Literal(placed.central)
        central_size += len(placed.central)
        count += 1
    yield Literal(_end_records(count, offset, central_size, limits))


def window(segments: Iterable[Segment], start: int, stop: int) -> Iterator[Piece]:
    """The pieces of `segments` that bytes `[start, stop)` of their concatenation cover."""
    position = 0
    for segment in segments:
        end = position + segment.length
        if end > start and position < stop and segment.length:
            yield Piece(segment, max(start - position, 0), min(stop, end) - position)
        position = end
        if position >= stop:
            return


def dos_time(moment: datetime) -> tuple[int, int]:
    """(time, date) in MS-DOS form, clamped to the years it can hold (1980-2107)."""
    year = min(max(moment.year, 1980), 2107)
    date = ((year - 1980) << 9) | (moment.month << 5) | moment.day
    time = (moment.hour << 11) | (moment.minute << 5) | (moment.second // 2)
    return time, date


def _placed(entries: Iterable[Entry], limits: Limits) -> Iterator[_Placed]:
    offset = 0
    for entry in entries:
        placed = _Placed(
            entry,
            offset,
            _local_header(entry, limits),
            _descriptor(entry, limits),
            _central_record(entry, offset, limits),
        )
        yield placed
        offset += placed.span


def _flags(entry: Entry) -> int:
    # Without the UTF-8 flag, readers take a name as CP437.
    return FLAG_DATA_DESCRIPTOR | (0 if entry.name.isascii() else FLAG_UTF8)


def _local_header(entry: Entry, limits: Limits) -> bytes:
    name = entry.name.encode("utf-8")
    time, date = dos_time(entry.modified)
    extra = b""
    sizes = 0
    version = VERSION_PLAIN
    if entry.size >= limits.field:
        # Sizes unknown at the header (bit 3), but the descriptor after it is 8-byte: say so.
        extra = struct.pack("<HHQQ", ZIP64_EXTRA_ID, 16, 0, 0)
        sizes = MASK32
        version = VERSION_ZIP64
    head = struct.pack(
        "<IHHHHHIIIHH",
        LOCAL_SIGNATURE,
        version,
        _flags(entry),
        STORED,
        time,
        date,
        0,
        sizes,
        sizes,
        len(name),
        len(extra),
    )
    return head + name + extra


def _descriptor(entry: Entry, limits: Limits) -> bytes:
    if entry.size >= limits.field:
        return struct.pack("<IIQQ", DESCRIPTOR_SIGNATURE, entry.crc32, entry.size, entry.size)
    return struct.pack("<IIII", DESCRIPTOR_SIGNATURE, entry.crc32, entry.size, entry.size)


def _central_record(entry: Entry, offset: int, limits: Limits) -> bytes:
    name = entry.name.encode("utf-8")
    time, date = dos_time(entry.modified)
    wide: list[int] = []
    size_field = entry.size
    if entry.size >= limits.field:
        wide += [entry.size, entry.size]  # uncompressed, then compressed
        size_field = MASK32
    offset_field = offset
    if offset >= limits.field:
        wide.append(offset)
        offset_field = MASK32
    extra = b""
    if wide:
        extra = struct.pack(f"<HH{len(wide)}Q", ZIP64_EXTRA_ID, 8 * len(wide), *wide)
    head = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        CENTRAL_SIGNATURE,
        MADE_BY,
        VERSION_ZIP64 if wide else VERSION_PLAIN,
        _flags(entry),
        STORED,
        time,
        date,
        entry.crc32,
        size_field,
        size_field,
        len(name),
        len(extra),
        0,  # comment length
        0,  # disk number
        0,  # internal attributes
        FILE_ATTRIBUTES,
        offset_field,
    )
    return head + name + extra


def _end_records(count: int, central_offset: int, central_size: int, limits: Limits) -> bytes:
    needs_zip64 = (
        count >= limits.entries
        or central_offset >= limits.field
        or central_size >= limits.field
        or central_offset + central_size >= limits.field
    )
    records = b""
    if needs_zip64:
        zip64_end_offset = central_offset + central_size
        records += struct.pack(
            "<IQHHIIQQQQ",
            ZIP64_END_SIGNATURE,
            44,  # the size of the rest of this record
            MADE_BY,
            VERSION_ZIP64,
            0,
            0,
            count,
            count,
            central_size,
            central_offset,
        )
        records += struct.pack("<IIQI", ZIP64_LOCATOR_SIGNATURE, 0, zip64_end_offset, 1)
    short_count = MASK16 if needs_zip64 else count
    records += struct.pack(
        "<IHHHHIIH",
        END_SIGNATURE,
        0,
        0,
        short_count,
        short_count,
        MASK32 if needs_zip64 else central_size,
        MASK32 if needs_zip64 else central_offset,
        0,
    )
    return records
