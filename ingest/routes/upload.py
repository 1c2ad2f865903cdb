"""`POST /api/v1/upload`: one image in, one `pending` image record out."""

from __future__ import annotations

import falcon

from common.config import ApiSettings, EngineSettings
from ingest.documents import image_document
from ingest.intake import ImageIntake
from ingest.rate_limit import UploadRateLimiter
from ingest.upload_reader import read_single_upload

UPLOAD_ROLE = "user"


class UploadResource:
    """Validates the multipart upload at the edge, then hands it to the intake."""

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
        self._max_bytes = api.max_upload_bytes
        self._max_pixels = engine.max_pixels

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = req.context.principal
        # Charged before the body is read, so a flood of uploads costs the API little.
        self._limiter.charge(principal.subject)
        upload = read_single_upload(req, self._max_bytes, self._max_pixels)
        record = self._intake.accept(principal.subject, upload, req.context.request_id)
        resp.status = falcon.HTTP_201
        resp.location = f"/api/v1/images/{record.id}"
        resp.media = image_document(record)
