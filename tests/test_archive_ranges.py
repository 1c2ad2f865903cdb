"""The archive route's reading of `Range` and `If-Range`, and the entry-name rule, on their own."""

from __future__ import annotations

import pytest

from common.errors import RangeNotSatisfiable
from ingest.archive import ArchivePlan, entry_name, safe_stem
from ingest.routes.archive import requested_span

PLAN = ArchivePlan(size=1000, etag='"abc"')


@pytest.mark.parametrize(
    ("header", "if_range", "span"),
    [
        (None, None, None),
        ("bytes=0-", None, (0, 1000)),
        ("bytes=600-", '"abc"', (600, 1000)),
        ("bytes=100-199", None, (100, 200)),
        ("bytes=990-5000", None, (990, 1000)),  # clipped to the end
        ("bytes=-50", None, (950, 1000)),
        ("bytes=-5000", None, (0, 1000)),
        (" bytes = 5 - 9 ", None, (5, 10)),
        ("bytes=600-", '"another version"', None),  # the whole new archive
        ("bytes=600-", 'W/"abc"', None),  # a weak validator never matches
        ("bytes=0-1,5-6", None, None),  # several ranges: the whole archive
        ("items=0-1", None, None),
        ("bytes=9-3", None, None),
        ("bytes=-", None, None),
        ("bytes=abc", None, None),
    ],
)
def test_a_range_is_served_clipped_or_ignored_as_rfc_9110_allows(
    header: str | None, if_range: str | None, span: tuple[int, int] | None
) -> None:
    assert requested_span(header, if_range, PLAN) == span


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_starting_past_the_end_is_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as raised:
        requested_span(header, None, PLAN)
    assert raised.value.size == 1000


@pytest.mark.parametrize(
    ("stem", "ordinal", "rendition", "extension", "name"),
    [
        ("photo", 1, None, "png", "photo.png"),
        ("photo", 1, "thumb", "webp", "photo.thumb.webp"),
        ("photo", 2, None, "png", "photo~2.png"),
        ("my.holiday", 1, None, "png", "my_holiday.png"),
        ("../../etc/passwd", 1, None, "png", "______etc_passwd.png"),
        ("a\\b:c*d?e", 1, None, "jpg", "a_b_c_d_e.jpg"),
        ("photo~2", 1, None, "png", "photo_2.png"),
        ("", 1, None, "png", "_.png"),
        ("été 写真", 1, None, "png", "été 写真.png"),
        ("evil\u202egpj", 1, None, "png", "evil_gpj.png"),
    ],
)
def test_entry_names_have_a_safe_stem_a_number_a_rendition_and_an_extension(
    stem: str, ordinal: int, rendition: str | None, extension: str, name: str
) -> None:
    assert entry_name(stem, ordinal, rendition, extension) == name


def test_a_safe_stem_has_no_dot_tilde_or_separator() -> None:
    assert not set(safe_stem("a.b~c/d\\e..f")) & set(".~/\\")
