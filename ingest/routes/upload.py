"""`POST /api/v1/upload` (one image) and `POST /api/v1/uploads` (many, answered per part)."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import falcon

from common.config import ApiSettings, EngineSettings
from common.errors import BadRequest, PixelmillError
from ingest.documents import image_document
from ingest.intake import Accepted, Answer, IdempotencyClaim, ImageIntake, StagedUpload
from ingest.rate_limit import UploadRateLimiter
from ingest.upload_reader import BulkLimits, iter_bulk_upload, read_single_upload

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
        )


class UploadResource(_UploadRoute):
    """One image per request: 201 with its document, or 200 with an earlier copy (dedupe)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = req.context.principal
        # Charged before the body is read, so a flood of uploads costs the API little.
        self._limiter.charge(principal.subject)
        upload = read_single_upload(req, self._limits.max_part_bytes, self._limits.max_pixels)
        dedupe = req.get_param_as_bool("dedupe", default=False)
        claim = idempotency_claim(req, str(dedupe), upload.filename, upload.sha256)

        def render(accepted: list[Accepted]) -> Answer:
            [only] = accepted
            document = {**image_document(only.record), "deduplicated": only.deduplicated}
            return Answer(200 if only.deduplicated else 201, document)

        staged = self._intake.stage(principal.subject, upload)
        answer = self._intake.accept(
            principal.subject, [staged], req.context.request_id, render, dedupe=dedupe, claim=claim
        )
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
        entries = self._stage_parts(req, principal.subject)
        staged = [e.staged for e in entries if e.staged is not None]
        try:
            if staged:
                self._limiter.charge(principal.subject, len(staged))
            dedupe = req.get_param_as_bool("dedupe", default=False)
            claim = idempotency_claim(req, str(dedupe), *map(_fingerprint, entries))
        except Exception:
            self._intake.discard(staged)
            raise

        def render(accepted: list[Accepted]) -> Answer:
            return Answer(207, bulk_answer(entries, accepted))

        answer = self._intake.accept(
            principal.subject, staged, req.context.request_id, render, dedupe=dedupe, claim=claim
        )
        log_accepted(req, [str(i["id"]) for i in answer.body["items"] if "id" in i])
        send(resp, answer)

    def _stage_parts(self, req: falcon.Request, owner: str) -> list[PartEntry]:
        """Read the parts, storing each valid image as soon as it is read (its bytes are then
        let go); if the request as a whole fails, what was stored is removed."""
        entries: list[PartEntry] = []
        try:
            for part in iter_bulk_upload(req, self._limits):
                staged = self._intake.stage(owner, part.upload) if part.upload else None
                entries.append(PartEntry(part.index, part.filename, part.error, staged))
        except Exception:
            self._intake.discard([e.staged for e in entries if e.staged is not None])
            raise
        return entries


@dataclass(frozen=True)
class PartEntry:
    """A bulk part after reading: refused with an error, or staged for acceptance."""

    index: int
    filename: str
    error: PixelmillError | None
    staged: StagedUpload | None


def _fingerprint(entry: PartEntry) -> str:
    if entry.staged is not None:
        outcome = entry.staged.new.sha256
    else:
        outcome = entry.error.code if entry.error else ""
    return f"{entry.index}|{entry.filename}|{outcome}"


def bulk_answer(parts: list[PartEntry], accepted: list[Accepted]) -> dict[str, object]:
    """Per-part entries in request order: refused parts with their error, accepted with ids."""
    remaining = iter(accepted)
    items: list[dict[str, object]] = []
    for part in parts:
        if part.error is not None:
            items.append(
                {
                    "index": part.index,
                    "filename": part.filename,
                    "status": part.error.status,
                    "error": {"code": part.error.code, "message": part.error.message},
                }
            )
            continue
        outcome = next(remaining)
        items.append(
            {
                "index": part.index,
                "filename": part.filename,
                "status": 200 if outcome.deduplicated else 201,
                "id": str(outcome.record.id),
                "deduplicated": outcome.deduplicated,
                "image": image_document(outcome.record),
            }
        )
    return {
        "items": items,
        "accepted": len(accepted),
        "rejected": len(parts) - len(accepted),
    }
