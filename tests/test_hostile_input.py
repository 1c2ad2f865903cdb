"""Hostile input: every hostile upload or request gets a clear 4xx JSON error and leaves nothing
behind, or is accepted and then ends `failed` with a reason and no result object.

tests/test_upload_errors.py already covers text, HTML, GIF and PDF bodies, the empty file, the
65535x65535 JPEG bomb, oversized bodies, a missing, doubled or non-file `image` field, a missing
boundary, a truncated multipart body, path-traversal / NUL / 10,000-character filenames and three
malformed ids; this module adds the rest.
"""

from __future__ import annotations

import json
import socket
import struct
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

import cv2
import pytest

from tests.support import (
    ApiClient,
    StackProbe,
    free_port,
    jpeg,
    multipart,
    photo,
    png,
    served_api,
    wait_for,
)


def assert_rejected(response: Any, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]


@pytest.fixture
def nothing_stored(probe: StackProbe, user_id: str) -> Iterator[None]:
    before = probe.originals()
    yield
    assert probe.rows_for(user_id) == []
    assert probe.originals() == before


def encoded(extension: str) -> bytes:
    ok, data = cv2.imencode(extension, photo(32, 24))
    assert ok
    return bytes(data.tobytes())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose IHDR claims width x height: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def with_crc_flipped(data: bytes, kind: bytes) -> bytes:
    """The PNG with the CRC of its first `kind` chunk damaged (the chunk data left intact)."""
    out = bytearray(data)
    at = out.index(kind)
    (length,) = struct.unpack(">I", out[at - 4 : at])
    out[at + 4 + length] ^= 0xFF
    return bytes(out)


def before_frame_header(data: bytes) -> bytes:
    return data[: data.index(b"\xff\xc0")]


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'

# (file bytes, filename, expected status)
REFUSED_FILES: dict[str, tuple[bytes, str, int]] = {
    "svg_named_png": (SVG, "logo.png", 415),
    "webp_named_jpg": (encoded(".webp"), "photo.jpg", 415),
    "tiff_named_jpg": (encoded(".tiff"), "scan.jpg", 415),
    "bmp_named_png": (encoded(".bmp"), "paint.png", 415),
    "html_named_jpg": (b"<html><script>alert(1)</script></html>", "x.jpg", 415),
    "jpeg_magic_then_text": (b"\xff\xd8\xff" + b"not really a jpeg" * 4, "x.jpg", 415),
    "jpeg_cut_before_frame_header": (before_frame_header(jpeg(64, 48)), "cut.jpg", 415),
    "png_cut_inside_ihdr": (png(64, 48)[:30], "cut.png", 415),
    "png_signature_only": (b"\x89PNG\r\n\x1a\n", "sig.png", 415),
    "png_ihdr_crc_bad": (with_crc_flipped(png(64, 48), b"IHDR"), "crc.png", 415),
    "png_bomb_100000_square": (png_claiming(100_000, 100_000), "bomb.png", 422),
    "png_bomb_max_width": (png_claiming(2**31 - 1, 1), "wide.png", 422),
    "jpeg_bomb_65535_by_2000": (b"", "", 422),  # built below from a real JPEG
}


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


REFUSED_FILES["jpeg_bomb_65535_by_2000"] = (jpeg_claiming(65535, 2000), "bomb.jpg", 422)


@pytest.mark.parametrize("case", sorted(REFUSED_FILES))
def test_hostile_file_is_refused_and_stores_nothing(
    case: str, api: ApiClient, nothing_stored: None
) -> None:
    data, filename, status = REFUSED_FILES[case]
    assert_rejected(api.upload(data, filename), status)


def truncated_png_after_header() -> bytes:
    data = png(64, 48)
    return data[: data.index(b"IDAT") + 20]


# Files whose header is intact but whose pixel data is damaged: accepted, then `failed`.
DAMAGED_DATA: dict[str, bytes] = {
    "jpeg_cut_in_half": jpeg(320, 240)[: len(jpeg(320, 240)) // 2],
    "jpeg_without_end_marker": jpeg(320, 240)[:-2],
    "png_cut_after_header": truncated_png_after_header(),
    "png_idat_crc_bad": with_crc_flipped(png(64, 48), b"IDAT"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_DATA))
def test_damaged_pixel_data_is_accepted_then_failed_with_a_reason_and_no_result(
    case: str, api: ApiClient, probe: StackProbe, worker: Any
) -> None:
    created = api.upload(DAMAGED_DATA[case], f"{case}.bin")
    assert created.status_code == 201, created.text
    image_id = created.json["id"]
    wait_for(lambda: probe.status(image_id) == "failed", timeout=60)
    document = api.get(f"/api/v1/images/{image_id}").json
    assert document["status"] == "failed"
    assert "could not be decoded" in document["error"]
    assert not document.get("download_url")
    assert not [key for key in probe.results() if image_id in key]


BOUNDARY = "hostile"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
IMAGE_PART_HEADERS = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
    "Content-Type: image/jpeg\r\n\r\n"
).encode()

# (raw body, content type) of malformed forms; each is a 400.
MALFORMED_FORMS: dict[str, tuple[bytes, str]] = {
    "empty_body": (b"", CONTENT_TYPE),
    "zero_byte_part": (f"--{BOUNDARY}\r\n\r\n\r\n--{BOUNDARY}--\r\n".encode(), CONTENT_TYPE),
    "empty_boundary_parameter": (
        multipart([("image", "a.jpg", jpeg(32, 32), "image/jpeg")])[0],
        "multipart/form-data; boundary=",
    ),
    "body_uses_another_boundary": (
        multipart([("image", "a.jpg", jpeg(32, 32), "image/jpeg")], boundary="other")[0],
        CONTENT_TYPE,
    ),
    "part_without_content_disposition": (
        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\n".encode()
        + jpeg(32, 32)
        + f"\r\n--{BOUNDARY}--\r\n".encode(),
        CONTENT_TYPE,
    ),
    "part_headers_never_end": (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=image\r\nX: ".encode()
        + b"a" * 40_000,
        CONTENT_TYPE,
    ),
    "garbage_instead_of_part_headers": (
        f"--{BOUNDARY}\r\n".encode() + bytes(range(256)) + f"\r\n--{BOUNDARY}--\r\n".encode(),
        CONTENT_TYPE,
    ),
    "no_closing_boundary": (IMAGE_PART_HEADERS + jpeg(32, 32), CONTENT_TYPE),
    "non_utf8_field_name": (
        f"--{BOUNDARY}\r\n".encode()
        + b'Content-Disposition: form-data; name="\xff\xfeimage"; filename="a.jpg"\r\n\r\n'
        + jpeg(32, 32)
        + f"\r\n--{BOUNDARY}--\r\n".encode(),
        CONTENT_TYPE,
    ),
    "non_utf8_filename": (
        f"--{BOUNDARY}\r\n".encode()
        + b'Content-Disposition: form-data; name="image"; filename="caf\xe9\xff.jpg"\r\n\r\n'
        + jpeg(32, 32)
        + f"\r\n--{BOUNDARY}--\r\n".encode(),
        CONTENT_TYPE,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_FORMS))
def test_malformed_multipart_is_400_and_stores_nothing(
    case: str, api: ApiClient, nothing_stored: None
) -> None:
    body, content_type = MALFORMED_FORMS[case]
    length = {"Content-Length": str(len(body))}  # falcon.testing leaves it out for b""
    assert_rejected(api.post_raw("/api/v1/upload", body, content_type, **length), 400)


@pytest.mark.parametrize("path", ["/api/v1/upload", "/api/v1/uploads"])
def test_non_utf8_part_headers_are_400_on_both_upload_routes(
    path: str, api: ApiClient, nothing_stored: None
) -> None:
    body, content_type = MALFORMED_FORMS["non_utf8_filename"]
    assert_rejected(api.post_raw(path, body, content_type), 400)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer " + "a" * 200_000,
        "Bearer " + "eyJ" + "A" * 9000 + "." + "B" * 9000 + "." + "C" * 9000,
        "Bearer \xff\xfe\xfd",
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ],
    ids=["200k_token", "27k_jwt_shape", "latin1_bytes", "basic_scheme", "no_token"],
)
def test_hostile_authorization_is_401_and_stores_nothing(
    authorization: str, app: Any, probe: StackProbe
) -> None:
    before = probe.originals()
    client = ApiClient(app, None).client
    body, content_type = multipart([("image", "a.jpg", jpeg(32, 32), "image/jpeg")])
    response = client.simulate_post(
        "/api/v1/upload",
        body=body,
        headers={"Authorization": authorization, "Content-Type": content_type},
    )
    assert_rejected(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert probe.originals() == before


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/images/" + "f" * 10_000,
        "/api/v1/images/00000000-0000-0000-0000-00000000000g",
        "/api/v1/images/%00",
        "/api/v1/images/%E2%80%AE00000000-0000-4000-8000-000000000000",
        "/api/v1/images/{00000000-0000-4000-8000-000000000000}x",
    ],
    ids=["10k_chars", "bad_hex", "nul", "rtl_override", "braced_with_tail"],
)
def test_id_that_is_not_a_uuid_is_400(path: str, api: ApiClient) -> None:
    assert_rejected(api.get(path), 400)


@pytest.mark.parametrize(
    "params",
    [{"ids": "not-a-uuid"}, {"ids": ",".join(["x"] * 500)}, {"cursor": "\x00garbage"}],
    ids=["ids_not_uuid", "ids_500_garbage", "cursor_garbage"],
)
def test_listing_with_malformed_ids_or_cursor_is_400(
    params: dict[str, str], api: ApiClient
) -> None:
    assert_rejected(api.get("/api/v1/images", **params), 400)


@pytest.fixture(scope="module")
def served(env: dict[str, str], settings: Any, tmp_path_factory: Any) -> Iterator[str]:
    """A real gunicorn with one process of two threads, so one stalled client is half of it."""
    log = tmp_path_factory.mktemp("hostile-api") / "api.log"
    with served_api(env, log, "--workers", "1", "--threads", "2") as (base, _):
        yield base


def http_status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def test_stalled_slow_client_does_not_block_other_requests(
    served: str, issuer: Any, probe: StackProbe
) -> None:
    slow_user = f"slow-{free_port()}"
    token = issuer.mint_token(slow_user, ("user",))
    body, content_type = multipart([("image", "slow.jpg", jpeg(640, 480), "image/jpeg")])
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(
            f"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 3]
        )
        # The slow client now stalls mid-body; a normal client must still be served meanwhile.
        assert http_status(f"{served}/health") == 200
        normal_token = issuer.mint_token(f"normal-{free_port()}", ("user",))
        upload, upload_type = multipart([("image", "ok.jpg", jpeg(64, 48), "image/jpeg")])
        headers = {"Authorization": f"Bearer {normal_token}", "Content-Type": upload_type}
        assert http_status(f"{served}/api/v1/upload", upload, headers) == 201
    # The stalled upload was never complete, so it left nothing behind once the client left.
    wait_for(lambda: http_status(f"{served}/health") == 200, timeout=10)
    assert probe.rows_for(slow_user) == []


def raw_exchange(served: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the server and read its whole answer (it closes the connection)."""
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        # Above gunicorn's 16 KiB field limit the server refuses before the app; below it, the
        # app's own MAX_TOKEN_BYTES check answers 401 (tested above).
        (
            b"GET /api/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"a" * 20_000
            + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_uri_too_long"),
        (b"GET\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "bad_request"),
    ],
    ids=["header-over-16-KiB", "request-line-too-long", "malformed-request-line", "bad-header"],
)
def test_requests_gunicorn_refuses_itself_get_the_json_error_shape(
    served: str, request_bytes: bytes, status: int, code: str
) -> None:
    answer_status, headers, body = raw_exchange(served, request_bytes)

    assert answer_status == status
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["message"]
    assert http_status(f"{served}/health") == 200
