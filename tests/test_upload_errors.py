"""Every rejected upload: the right status, one JSON error shape, and nothing stored."""

from __future__ import annotations

import pytest

from tests.support import ApiClient, StackProbe, jpeg, multipart, png

TEN_MB = 10 * 1024 * 1024


def assert_rejected(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


@pytest.fixture
def nothing_stored(probe: StackProbe, user_id: str):
    """Asserts after the test that the rejected upload left no row and no original behind."""
    before = probe.originals()
    yield
    assert probe.rows_for(user_id) == []
    assert probe.originals() == before


def jpeg_header_claiming(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 header claims width x height (the rest is a tiny real JPEG)."""
    data = bytearray(jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


BAD_BODIES = {
    "text_named_jpg": (b"hello, I am not an image\n", "photo.jpg", 415, "unsupported_media_type"),
    "html_named_png": (b"<!doctype html><html></html>", "page.png", 415, "unsupported_media_type"),
    "gif": (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "anim.jpg", 415, "unsupported_media_type"),
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "doc.png", 415, "unsupported_media_type"),
    "empty_file": (b"", "empty.jpg", 400, "bad_request"),
    "bomb_65535_square": (
        jpeg_header_claiming(65535, 65535),
        "bomb.jpg",
        422,
        "unprocessable_image",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_file_is_rejected_and_stores_nothing(case: str, api: ApiClient, nothing_stored) -> None:
    data, filename, status, code = BAD_BODIES[case]
    assert_rejected(api.upload(data, filename), status, code)


def test_upload_over_10_mb_is_413_and_stores_nothing(api: ApiClient, nothing_stored) -> None:
    big = jpeg(64, 64) + b"\0" * TEN_MB
    assert_rejected(api.upload(big), 413, "payload_too_large")


def test_declared_length_over_limit_is_413_before_reading(api: ApiClient, nothing_stored) -> None:
    body, content_type = multipart([("image", "a.jpg", jpeg(32, 32), "image/jpeg")])
    response = api.client.simulate_post(
        "/api/v1/upload",
        body=body,
        headers=api.headers({"Content-Type": content_type, "Content-Length": str(TEN_MB * 100)}),
    )
    assert_rejected(response, 413, "payload_too_large")


def test_form_without_image_field_is_400(api: ApiClient, nothing_stored) -> None:
    assert_rejected(api.upload(jpeg(64, 64), field="picture"), 400, "bad_request")


def test_two_image_parts_are_400(api: ApiClient, nothing_stored) -> None:
    body, content_type = multipart(
        [("image", "a.jpg", jpeg(64, 64), "image/jpeg"), ("image", "b.png", png(8, 8), "image/png")]
    )
    assert_rejected(api.post_raw("/api/v1/upload", body, content_type), 400, "bad_request")


def test_image_field_that_is_not_a_file_is_400(api: ApiClient, nothing_stored) -> None:
    body, content_type = multipart([("image", None, jpeg(64, 64), "text/plain")])
    assert_rejected(api.post_raw("/api/v1/upload", body, content_type), 400, "bad_request")


def test_multipart_without_boundary_is_400(api: ApiClient, nothing_stored) -> None:
    body, _ = multipart([("image", "a.jpg", jpeg(64, 64), "image/jpeg")])
    response = api.post_raw("/api/v1/upload", body, "multipart/form-data")
    assert_rejected(response, 400, "bad_request")


def test_truncated_multipart_body_is_400(api: ApiClient, nothing_stored) -> None:
    body, content_type = multipart([("image", "a.jpg", jpeg(64, 64), "image/jpeg")])
    assert_rejected(api.post_raw("/api/v1/upload", body[:200], content_type), 400, "bad_request")


def test_non_multipart_body_is_415(api: ApiClient, nothing_stored) -> None:
    response = api.post_raw("/api/v1/upload", jpeg(64, 64), "image/jpeg")
    assert_rejected(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
        ("na\x00me.jpg", "name.jpg"),
        ("x" * 10_000 + ".jpg", "x" * 255),
    ],
)
def test_hostile_filename_is_cleaned_and_never_used_as_a_key(
    raw: str, stored: str, api: ApiClient, probe: StackProbe
) -> None:
    response = api.upload(jpeg(64, 64), raw)
    assert response.status_code == 201, response.text
    assert response.json["filename"] == stored
    assert f"originals/{response.json['id']}" in probe.originals()


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "' OR 1=1 --"])
def test_malformed_image_id_is_400(bad_id: str, api: ApiClient) -> None:
    assert_rejected(api.get(f"/api/v1/images/{bad_id}"), 400, "bad_request")


def test_unknown_image_id_is_404(api: ApiClient) -> None:
    response = api.get("/api/v1/images/00000000-0000-4000-8000-000000000000")
    assert_rejected(response, 404, "not_found")


def test_unknown_route_is_json_404(api: ApiClient) -> None:
    response = api.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"
