"""`POST /api/v1/upload` (one image) and `POST /api/v1/uploads` (many, answered per part)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import uuid
from collections.abc import Sequence

import falcon

from common.config import ApiSettings, EngineSettings
from common.errors import BadRequest, NotFound
from common.renditions import Rendition, RenditionSpecError, select
from db.batches import BatchRecord
from ingest.documents import Answer
from ingest.intake import IdempotencyClaim, ImageIntake, RenditionRequest
from ingest.rate_limit import UploadRateLimiter
from ingest.upload_reader import BulkLimits, BulkPart, iter_bulk_upload, read_single_upload

log = logging.getLogger(__name__)

UPLOAD_ROLE = "user"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def idempotency_claim(req: falcon.Request, *fingerprint: str) -> IdempotencyClaim | None:
    """The request's Idempotency-Key, bound to a digest of what the request asks for."""
    key = req.get_header("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise BadRequest("Idempotency-Key must be 1-200 visible ASCII characters")
    digest = hashlib.sha256("\n".join((req.path, *fingerprint)).encode()).hexdigest()
    return IdempotencyClaim(key, digest)


def log_accepted(req: falcon.Request, image_ids: list[str]) -> None:
    log.info(
        "accepted %d images",
        len(image_ids),
        extra={"request_id": req.context.request_id, "image_ids": image_ids},
    )


def send(resp: falcon.Response, answer: Answer) -> None:
    resp.status = falcon.code_to_http_status(answer.status_code)
    resp.media = answer.body


class _UploadRoute:
    """What both upload routes are given: the intake, the rate limiter and the size limits."""

    required_role = UPLOAD_ROLE

    def __init__(
        self,
        intake: ImageIntake,
        limiter: UploadRateLimiter,
        api: ApiSettings,
        engine: EngineSettings,
    ) -> None:
        self._intake = intake
        self._limiter = limiter
        self._limits = BulkLimits(
            max_parts=api.max_bulk_parts,
            max_body_bytes=api.max_bulk_bytes,
            max_part_bytes=api.max_upload_bytes,
            max_pixels=engine.max_pixels,
            max_decode_bytes=engine.max_decode_bytes,
        )
        self._renditions = engine.renditions

    def renditions_and_batch(
        self, req: falcon.Request
    ) -> tuple[RenditionRequest, uuid.UUID | None]:
        """The renditions the upload's images get and the batch they join, decided here for both
        routes: the renditions `?renditions=` names, else those of the batch, else every
        configured one. The batch's choice then travels exactly as a request's own would: on the
        rows, in the idempotency fingerprint, and to an earlier copy de-duplication finds."""
        asked = self._asked_renditions(req)
        batch = self._joined_batch(req)
        if asked is None and batch is not None and batch.renditions is not None:
            asked = _still_configured(self._renditions, batch.renditions)
        configured = tuple(r.name for r in self._renditions)
        return RenditionRequest(asked, configured), None if batch is None else batch.id

    def _made(self, renditions: RenditionRequest) -> tuple[Rendition, ...]:
        """The configured renditions the request's images get (every one for None)."""
        return select(self._renditions, renditions.names)

    def _asked_renditions(self, req: falcon.Request) -> tuple[str, ...] | None:
        """`?renditions=a,b` (or `renditions=a&renditions=b`): a subset of the configured
        renditions; an unknown name is a 400 that lists the known ones."""
        raw = req.get_param_as_list("renditions")
        if raw is None:
            return None
        names = [n.strip() for value in raw for n in value.split(",") if n.strip()]
        return chosen_renditions(self._renditions, names)

    def _joined_batch(self, req: falcon.Request) -> BatchRecord | None:
        """`?batch=ID`: the owner's batch the images join; 404 before the body is read if it is
        unknown or another's (whether it is still open is checked with the rows, see intake)."""
        raw = req.get_param("batch")
        if raw is None:
            return None
        try:
            batch_id = uuid.UUID(raw)
        except ValueError:
            raise BadRequest("batch must be a batch id (a UUID)") from None
        batch = self._intake.owned_batch(batch_id, req.context.principal.subject)
        if batch is None:
            raise NotFound("no such batch")
        return batch


def chosen_renditions(configured: Sequence[Rendition], names: Sequence[str]) -> tuple[str, ...]:
    """The configured renditions `names` asks for, in configuration order; a 400 for an empty
    list, a name given twice or an unknown name (listing the known ones). Uploads and batches
    answer alike."""
    if not names:
        raise BadRequest("renditions must name at least one rendition")
    if len(set(names)) != len(names):
        raise BadRequest("renditions must name each rendition once")
    try:
        chosen = select(configured, names)
    except RenditionSpecError as exc:
        raise BadRequest(f"renditions: {exc}") from None
    return tuple(r.name for r in chosen)


def _still_configured(
    configured: Sequence[Rendition], names: Sequence[str]
) -> tuple[str, ...] | None:
    """A batch's renditions as the configuration now has them: a name it no longer has (it
    changed after the batch was made) is left out, and if none is left, every rendition (None),
    as the engine does for an image row (engine.cpu_pool)."""
    known = {r.name for r in configured}
    still = select(configured, [n for n in names if n in known])
    return tuple(r.name for r in still) or None


class UploadResource(_UploadRoute):
    """One image per request: 201 with its document, or 200 with an earlier copy (dedupe)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = req.context.principal
        # Charged before the body is read, so a flood of uploads costs the API little.
        self._limiter.charge(principal.subject)
        renditions, batch_id = self.renditions_and_batch(req)
        upload = read_single_upload(
            req,
            self._limits.max_part_bytes,
            self._limits.max_pixels,
            self._limits.max_decode_bytes,
            self._made(renditions),
        )
        dedupe = req.get_param_as_bool("dedupe", default=False)
        claim = idempotency_claim(
            req,
            str(dedupe),
            *_asked(renditions),
            upload.filename,
            upload.sha256,
            *_batch_fingerprint(batch_id),
        )
        with self._intake.begin(principal.subject, renditions, batch_id) as batch:
            batch.stage(upload)
            answer = batch.commit(req.context.request_id, dedupe=dedupe, claim=claim)
        resp.location = f"/api/v1/images/{answer.body['id']}"
        log_accepted(req, [answer.body["id"]])
        send(resp, answer)


class BulkUploadResource(_UploadRoute):
    """Many `image` parts per request; 207 with one entry per part, accepted or refused."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = req.context.principal
        # Refused before the body is read when not even one more image fits; charged for every
        # accepted part once they are known (a refused request takes nothing).
        self._limiter.ensure_room(principal.subject)
        renditions, batch_id = self.renditions_and_batch(req)
        with self._intake.begin(principal.subject, renditions, batch_id) as batch:
            # Each valid image is stored as soon as it is read (its bytes are then let go).
            parts: list[BulkPart] = []
            limits = dataclasses.replace(self._limits, renditions=self._made(renditions))
            for part, upload in iter_bulk_upload(req, limits):
                if upload is not None:
                    batch.stage(upload)
                parts.append(part)
            if batch.staged_count:
                self._limiter.charge(principal.subject, batch.staged_count)
            dedupe = req.get_param_as_bool("dedupe", default=False)
            claim = idempotency_claim(
                req,
                str(dedupe),
                *_asked(renditions),
                *map(_fingerprint, parts),
                *_batch_fingerprint(batch_id),
            )
            answer = batch.commit(req.context.request_id, parts, dedupe=dedupe, claim=claim)
        log_accepted(req, [str(i["id"]) for i in answer.body["items"] if "id" in i])
        send(resp, answer)


def _asked(renditions: RenditionRequest) -> tuple[str, ...]:
    """The renditions' part of an idempotency fingerprint (asked for, or inherited from the
    batch); none for every configured one, so keys sent before renditions existed still match
    their answers."""
    return () if renditions.stored_form is None else (f"renditions={renditions.stored_form}",)


def _batch_fingerprint(batch_id: uuid.UUID | None) -> tuple[str, ...]:
    """The batch is part of what a request asks for; requests without one keep their old
    fingerprint (answers stored before batches existed still replay)."""
    return () if batch_id is None else (f"batch={batch_id}",)


def _fingerprint(part: BulkPart) -> str:
    outcome = part.error.code if part.error is not None else part.sha256
    return f"{part.index}|{part.filename}|{outcome}"
