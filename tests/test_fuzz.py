"""Fuzzing the upload parser through the real Falcon app: mutated multipart bodies (boundaries,
truncations, header garbage, random or damaged image bytes) always get a JSON answer with a
documented status, never a 500, and a refused one leaves no row behind.

The image kernel is fuzzed separately, in tests/test_kernel.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import falcon.testing
import psycopg
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from common.config import Settings
from tests.support import jpeg, png

DOCUMENTED = {201, 400, 401, 411, 413, 415, 422}
FUZZ_USER = "fuzz-user"
JPEG = jpeg(48, 32)
PNG = png(40, 30)
FUZZ_SETTINGS = hypothesis_settings(
    max_examples=150,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
# Every character RFC 2046 allows in a boundary; some need the parameter quoted.
BOUNDARY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=? "


def damaged(data: bytes, draw: Any) -> bytes:
    """`data` with a few bytes overwritten and perhaps cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(out) - 1))
        out[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


@st.composite
def file_bytes(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["jpeg", "png", "damaged_jpeg", "damaged_png", "random"]))
    if kind == "jpeg":
        return JPEG
    if kind == "png":
        return PNG
    if kind == "damaged_jpeg":
        return damaged(JPEG, draw)
    if kind == "damaged_png":
        return damaged(PNG, draw)
    return bytes(draw(st.binary(max_size=512)))


@st.composite
def part_headers(draw: Any) -> bytes:
    name = draw(st.sampled_from(["image", "image", "image", "Image", "img", ""]))
    filename = draw(
        st.one_of(st.sampled_from(["a.jpg", "../x.png"]), st.text(max_size=40), st.none())
    )
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    lines = [disposition.encode("utf-8", "surrogatepass"), b"Content-Type: image/jpeg"]
    if draw(st.integers(0, 3)) == 0:
        garbage = draw(st.binary(max_size=64))
        lines.insert(draw(st.integers(0, len(lines))), garbage)
    return b"\r\n".join(lines)


@st.composite
def multipart_requests(draw: Any) -> tuple[bytes, str]:
    """A multipart body and its Content-Type, mutated in the ways a hostile client might."""
    alphabet = draw(st.sampled_from([TOKEN_CHARS, TOKEN_CHARS, BOUNDARY_CHARS]))
    boundary = draw(st.text(alphabet, min_size=1, max_size=70)).strip() or "b"
    parts = [
        b"--"
        + boundary.encode()
        + b"\r\n"
        + draw(part_headers())
        + b"\r\n\r\n"
        + draw(file_bytes())
        + b"\r\n"
        for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 3])))
    ]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    if draw(st.integers(0, 3)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=32)) + body[at:]
    announced = draw(st.sampled_from(["same", "same", "same", "quoted", "other", "none"]))
    content_type = {
        "same": f"multipart/form-data; boundary={boundary}",
        "other": "multipart/form-data; boundary=somethingelse",
        "quoted": f'multipart/form-data; boundary="{boundary}"',
        "none": "multipart/form-data",
    }[announced]
    return body, content_type


def row_count(stack_settings: Settings) -> int:
    with psycopg.connect(stack_settings.postgres_url) as conn:
        row = conn.execute("SELECT count(*) FROM images WHERE owner = %s", (FUZZ_USER,)).fetchone()
    return int(row[0]) if row else 0


def test_mutated_multipart_uploads_never_500_and_refusals_store_nothing(
    app: Any, issuer: Any, settings: Settings
) -> None:
    client = falcon.testing.TestClient(app)
    token = issuer.mint_token(FUZZ_USER, ("user",))
    seen: Counter[int] = Counter()

    @FUZZ_SETTINGS
    @given(request=multipart_requests())
    def check(request: tuple[bytes, str]) -> None:
        body, content_type = request
        before = row_count(settings)
        response = client.simulate_post(
            "/api/v1/upload",
            body=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": content_type,
                "Content-Length": str(len(body)),
            },
        )
        assert response.status_code in DOCUMENTED, (response.status_code, response.text)
        seen[response.status_code] += 1
        assert response.headers["Content-Type"].startswith("application/json")
        if response.status_code == 201:
            assert row_count(settings) == before + 1
            return
        assert set(response.json["error"]) >= {"code", "message"}
        assert row_count(settings) == before

    check()
    print(f"\nfuzzed upload statuses: {dict(sorted(seen.items()))}")
