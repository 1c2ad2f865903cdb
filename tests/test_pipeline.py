"""End to end: upload through the API, processed by a real worker node, result in storage."""

from __future__ import annotations

import urllib.request

import cv2
import numpy as np
import pytest

from tests.support import ApiClient, StackProbe, jpeg, png, wait_for

CASES = {
    "jpeg_1600x1200": (jpeg(1600, 1200), "photo.jpg", (800, 600)),
    "png_with_alpha": (png(1000, 500, alpha=True), "alpha.png", (800, 400)),
    "jpeg_named_png": (jpeg(1200, 900), "test.png", (800, 600)),
    "narrow_jpeg_kept_at_its_width": (jpeg(640, 480), "small.jpg", (640, 480)),
}


def wait_terminal(api: ApiClient, image_id: str) -> dict:
    def terminal():
        body = api.get(f"/api/v1/images/{image_id}").json
        return body if body["status"] in ("completed", "failed") else None

    return wait_for(terminal, timeout=90)


@pytest.mark.parametrize("case", sorted(CASES))
def test_upload_ends_completed_with_an_800px_grayscale_result(
    case: str, api: ApiClient, worker, probe: StackProbe
) -> None:
    data, filename, (width, height) = CASES[case]
    created = api.upload(data, filename)
    assert created.status_code == 201, created.text
    assert created.json["status"] == "pending"
    assert created.json["filename"] == filename

    done = wait_terminal(api, created.json["id"])
    assert done["status"] == "completed", done
    assert done["result"]["width"] == width and done["result"]["height"] == height

    with urllib.request.urlopen(done["download_url"], timeout=10) as response:
        assert response.headers["Content-Type"] == "image/png"
        result = response.read()
    decoded = cv2.imdecode(np.frombuffer(result, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (height, width), "result must be single-channel at the target size"


def test_alpha_is_composited_onto_white(api: ApiClient, worker, probe: StackProbe) -> None:
    created = api.upload(png(1000, 500, alpha=True), "alpha.png")
    done = wait_terminal(api, created.json["id"])
    decoded = cv2.imdecode(
        np.frombuffer(probe.result_bytes(done["result"]["key"]), np.uint8), cv2.IMREAD_UNCHANGED
    )
    # The left half of the source is fully transparent: it must come out white, not black.
    assert decoded[:, :350].min() >= 250


def test_undecodable_image_ends_failed_with_a_reason(api: ApiClient, worker) -> None:
    truncated = jpeg(1600, 1200)[:600]
    created = api.upload(truncated, "broken.jpg")
    assert created.status_code == 201, created.text
    done = wait_terminal(api, created.json["id"])
    assert done["status"] == "failed"
    assert done["error"] == "JPEG data could not be decoded"
    assert done["download_url"] is None
    assert done.get("result") is None


def test_second_read_is_served_from_cache_and_fresh_after_processing(
    api: ApiClient, worker
) -> None:
    created = api.upload(jpeg(900, 600), "cache.jpg")
    image_id = created.json["id"]
    done = wait_terminal(api, image_id)
    assert done["status"] == "completed"
    first = api.get(f"/api/v1/images/{image_id}")
    second = api.get(f"/api/v1/images/{image_id}")
    assert second.headers["X-Cache"] == "hit"
    assert second.json["status"] == "completed" == first.json["status"]
