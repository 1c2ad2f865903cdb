"""The ZIP layout on its own: the bytes it plans are an archive Python's `zipfile` and Info-ZIP's
`unzip -t` accept, with the sizes, CRCs and names planned, ZIP64 where the format needs it, and
any byte range of it equal to the same slice of the whole."""

from __future__ import annotations

import io
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path

from common.zipstream import (
    FORMAT_LIMITS,
    Entry,
    Limits,
    Literal,
    Payload,
    archive_segments,
    archive_size,
    dos_time,
    window,
)
from tests.support import unzip_accepts

MOMENT = datetime(2026, 12, 7, 23, 30, 14, tzinfo=UTC)


def entry_of(name: str, data: bytes) -> Entry:
    return Entry(name, len(data), zlib.crc32(data), MOMENT, source=data)


def assembled(
    entries: list[Entry], limits: Limits = FORMAT_LIMITS, start: int = 0, stop: int = -1
) -> bytes:
    total = archive_size(entries, limits)
    stop = total if stop < 0 else stop
    out = bytearray()
    for piece in window(archive_segments(lambda: entries, limits), start, stop):
        segment = piece.segment
        if isinstance(segment, Literal):
            out += segment.data[piece.start : piece.stop]
        else:
            assert isinstance(segment, Payload)
            out += segment.entry.source[piece.start : piece.stop]
    return bytes(out)


def sample_entries() -> list[Entry]:
    return [
        entry_of("a.png", b"\x89PNG" + bytes(range(256)) * 40),
        entry_of("empty.png", b""),
        entry_of("été/Ünïcödé 写真.png", b"non-ascii name"),
        entry_of("failed.csv", b"id,filename,reason\r\n"),
    ]


def assert_archive_matches(data: bytes, entries: list[Entry]) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        infos = archive.infolist()
        assert [i.filename for i in infos] == [e.name for e in entries]
        for info, entry in zip(infos, entries, strict=True):
            assert info.compress_type == zipfile.ZIP_STORED
            assert entry.crc32 == info.CRC
            assert archive.read(info) == entry.source


def test_planned_size_is_the_length_of_the_bytes_written() -> None:
    entries = sample_entries()
    assert len(assembled(entries)) == archive_size(entries)


def test_archive_is_read_back_by_zipfile_with_stored_entries_and_planned_crcs(
    tmp_path: Path,
) -> None:
    entries = sample_entries()
    data = assembled(entries)
    assert_archive_matches(data, entries)
    unzip_accepts(data, tmp_path)


def test_non_ascii_names_carry_the_utf8_flag_and_ascii_names_do_not() -> None:
    with zipfile.ZipFile(io.BytesIO(assembled(sample_entries()))) as archive:
        flags = {i.filename: i.flag_bits for i in archive.infolist()}
    assert flags["été/Ünïcödé 写真.png"] & 0x800
    assert not flags["a.png"] & 0x800
    assert all(bits & 0x08 for bits in flags.values())


def test_no_entry_gives_an_empty_archive_zipfile_opens() -> None:
    data = assembled([])
    assert len(data) == 22 == archive_size([])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.infolist() == []


def test_every_range_is_the_same_slice_of_the_whole() -> None:
    entries = sample_entries()
    whole = assembled(entries)
    cuts = sorted({0, 1, 29, 30, 31, len(whole) // 3, len(whole) * 6 // 10, len(whole) - 1})
    for start in cuts:
        for stop in (start + 1, start + 77, len(whole)):
            stop = min(stop, len(whole))
            assert assembled(entries, start=start, stop=stop) == whole[start:stop]


def test_entries_and_offsets_past_the_limit_use_zip64_fields(tmp_path: Path) -> None:
    limits = Limits(field=1000)
    entries = [entry_of(f"big{i}.png", bytes([i]) * 1500) for i in range(3)]
    data = assembled(entries, limits)
    assert len(data) == archive_size(entries, limits)
    # The descriptors of ZIP64 entries have 8-byte sizes; the end records are ZIP64 ones.
    assert data.count(b"PK\x06\x06") == 1 and data.count(b"PK\x06\x07") == 1
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        assert [i.file_size for i in infos] == [1500] * 3
        assert infos[2].header_offset > 1000
        assert_archive_matches(data, entries)
    unzip_accepts(data, tmp_path)


def test_more_than_65535_entries_end_with_zip64_records(tmp_path: Path) -> None:
    entries = [entry_of(f"{i:05d}.png", i.to_bytes(3, "big")) for i in range(70_000)]
    data = assembled(entries)
    assert len(data) == archive_size(entries)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        assert len(infos) == 70_000
        assert archive.read("69999.png") == (69999).to_bytes(3, "big")
        assert entries[-1].crc32 == infos[-1].CRC
    unzip_accepts(data, tmp_path)


def test_dos_time_keeps_two_second_precision_and_clamps_years() -> None:
    time, date = dos_time(MOMENT)
    assert (date >> 9) + 1980 == 2026 and (date >> 5) & 15 == 12 and date & 31 == 7
    assert time >> 11 == 23 and (time >> 5) & 63 == 30 and (time & 31) * 2 == 14
    assert dos_time(datetime(1970, 1, 1))[1] >> 9 == 0
