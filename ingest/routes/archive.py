"""`GET /api/v1/batches/{id}/archive`: the batch's completed results as one ZIP (see
`ingest/archive.py`), with a `Content-Length`, an `ETag` and single `Range` requests, so an
interrupted download resumes where it stopped."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import falcon

from common.errors import RangeNotSatisfiable
from common.renditions import Rendition
from common.storage import ObjectStore
from db.pool import Database
from ingest.archive import ArchiveChanged, ArchivePlan, BatchArchive
from ingest.routes.batches import load_visible
from ingest.routes.upload import chosen_renditions

log = logging.getLogger(__name__)

_BYTE_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def requested_span(
    range_header: str | None, if_range: str | None, plan: ArchivePlan
) -> tuple[int, int] | None:
    """The `[start, stop)` a `Range` header asks for, or None for the whole archive: no Range,
    an `If-Range` naming another version, or a Range this route does not serve (several
    ranges, another unit, a malformed one: RFC 9110 lets a server send the whole). A range
    starting past the end is RangeNotSatisfiable."""
    if range_header is None or (if_range is not None and if_range.strip() != plan.etag):
        return None
    match = _BYTE_RANGE.fullmatch(range_header)
    if match is None or match.group(1) + match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable(plan.size)
        return max(plan.size - suffix, 0), plan.size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= plan.size:
        raise RangeNotSatisfiable(plan.size)
    return start, plan.size if not last else min(int(last) + 1, plan.size)


class BatchArchiveResource:
    """Streams a batch's archive: `?renditions=a,b` picks the renditions (the first configured
    one by default); the owner or an admin only, others get the 404 of an unknown batch."""

    def __init__(self, db: Database, store: ObjectStore, renditions: Sequence[Rendition]) -> None:
        self._db = db
        self._store = store
        self._renditions = renditions

    def on_get(self, req: falcon.Request, resp: falcon.Response, batch_id: str) -> None:
        asked = req.get_param_as_list("renditions")
        names = (
            (self._renditions[0].name,)
            if asked is None
            else chosen_renditions(
                self._renditions, [n.strip() for v in asked for n in v.split(",") if n.strip()]
            )
        )
        record = load_visible(self._db, batch_id, req.context.principal)
        archive = BatchArchive(
            self._db, self._store, record.id, names, self._renditions[0].name, record.created_at
        )
        plan = archive.plan()
        span = requested_span(req.get_header("Range"), req.get_header("If-Range"), plan)
        start, stop = (0, plan.size) if span is None else span
        if span is not None:
            resp.status = falcon.HTTP_206
            resp.set_header("Content-Range", f"bytes {start}-{stop - 1}/{plan.size}")
        resp.content_type = "application/zip"
        resp.set_header("Content-Disposition", f'attachment; filename="batch-{record.id}.zip"')
        resp.set_header("Accept-Ranges", "bytes")
        resp.etag = plan.etag
        resp.content_length = stop - start
        resp.stream = _cut_when_changed(archive.body(plan, start, stop), batch_id)


def _cut_when_changed(body: Iterator[bytes], batch_id: str) -> Iterator[bytes]:
    """The body, re-raising ArchiveChanged after logging it: the server then closes the
    connection short of `Content-Length`, so the client knows its copy is not whole."""
    try:
        yield from body
    except ArchiveChanged as exc:
        log.info("archive of batch %s cut short: %s", batch_id, exc)
        raise
