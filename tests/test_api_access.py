"""Who may do what through the HTTP API: tokens, roles, ownership, listing, deletion, limits."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from ops.issuer import LocalIssuer
from tests.support import ApiClient, StackProbe, jpeg, wait_for

API_ROUTES = [
    ("POST", "/api/v1/upload"),
    ("GET", "/api/v1/images"),
    ("GET", "/api/v1/images/00000000-0000-4000-8000-000000000000"),
    ("DELETE", "/api/v1/images/00000000-0000-4000-8000-000000000000"),
]


def client_for(app, issuer: LocalIssuer, roles=("user",), sub: str | None = None) -> ApiClient:
    return ApiClient(app, issuer.mint_token(sub or f"user-{uuid.uuid4()}", roles))


def unsigned_token(issuer: LocalIssuer) -> str:
    claims = {
        "iss": issuer.issuer,
        "sub": "mallory",
        "azp": issuer.client_id,
        "exp": int(time.time()) + 300,
        "realm_access": {"roles": ["admin", "user"]},
    }
    return jwt.encode(claims, key=None, algorithm="none", headers={"kid": issuer.kid})


def hs256_with_public_key(issuer: LocalIssuer) -> str:
    claims = {
        "iss": issuer.issuer,
        "sub": "mallory",
        "azp": issuer.client_id,
        "exp": int(time.time()) + 300,
        "realm_access": {"roles": ["admin"]},
    }
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    signing_input = (
        jwt.utils.base64url_encode(jwt.api_jws.json.dumps(header).encode())
        + b"."
        + jwt.utils.base64url_encode(jwt.api_jws.json.dumps(claims).encode())
    )
    import hashlib
    import hmac

    signature = hmac.new(issuer.public_key_pem(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()


BAD_AUTHORIZATION = {
    "no_header": lambda issuer: None,
    "basic_scheme": lambda issuer: "Basic dXNlcjp1c2Vy",
    "bearer_without_token": lambda issuer: "Bearer",
    "garbage_token": lambda issuer: "Bearer not.a.jwt",
    "expired": lambda issuer: "Bearer " + issuer.mint_token("u", expires_in=-600),
    "wrong_issuer": lambda issuer: "Bearer " + issuer.mint_token("u", iss="https://evil/realms/x"),
    "wrong_client": lambda issuer: "Bearer " + issuer.mint_token("u", azp="other", aud="other"),
    "alg_none": lambda issuer: "Bearer " + unsigned_token(issuer),
    "hs256_signed_with_public_key": lambda issuer: "Bearer " + hs256_with_public_key(issuer),
    "huge_header": lambda issuer: "Bearer " + "a" * 12000,
}


@pytest.mark.parametrize("case", sorted(BAD_AUTHORIZATION))
@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_bad_or_missing_token_is_401_with_bearer_challenge(
    case: str, method: str, path: str, app, issuer: LocalIssuer
) -> None:
    authorization = BAD_AUTHORIZATION[case](issuer)
    client = ApiClient(app, None)
    headers = {"Authorization": authorization} if authorization else {}
    response = client.client.simulate_request(method, path, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json["error"]["code"] == "invalid_token"


def test_other_users_image_is_404_and_admin_sees_it(app, issuer: LocalIssuer, worker) -> None:
    alice = client_for(app, issuer)
    bob = client_for(app, issuer)
    admin = client_for(app, issuer, roles=("admin", "user"))
    image_id = alice.upload(jpeg(300, 200)).json["id"]
    assert bob.get(f"/api/v1/images/{image_id}").status_code == 404
    assert bob.get("/api/v1/images", ids=image_id).json["items"] == []
    assert admin.get(f"/api/v1/images/{image_id}").status_code == 200
    assert alice.get(f"/api/v1/images/{image_id}").status_code == 200


def test_token_without_user_role_is_403_insufficient_scope(app, issuer: LocalIssuer) -> None:
    guest = client_for(app, issuer, roles=("offline_access",))
    response = guest.upload(jpeg(64, 64))
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


def test_listing_is_newest_first_with_keyset_pages(app, issuer: LocalIssuer) -> None:
    owner = client_for(app, issuer)
    ids = [owner.upload(jpeg(64, 64, seed=i)).json["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = owner.get("/api/v1/images", **params).json
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    other = client_for(app, issuer)
    assert other.get("/api/v1/images").json["items"] == []


def test_admin_lists_anyones_images_by_owner(app, issuer: LocalIssuer) -> None:
    sub = f"user-{uuid.uuid4()}"
    owner = client_for(app, issuer, sub=sub)
    image_id = owner.upload(jpeg(64, 64)).json["id"]
    admin = client_for(app, issuer, roles=("admin",))
    listed = admin.get("/api/v1/images", owner=sub).json["items"]
    assert [item["id"] for item in listed] == [image_id]


def test_admin_delete_removes_objects_row_and_cache(
    app, issuer: LocalIssuer, worker, probe: StackProbe
) -> None:
    owner = client_for(app, issuer)
    image_id = owner.upload(jpeg(900, 600)).json["id"]
    done = wait_for(
        lambda: (b := owner.get(f"/api/v1/images/{image_id}").json)["status"] == "completed" and b
    )
    result_key = done["result"]["key"]
    assert result_key in probe.results()

    assert owner.delete(f"/api/v1/images/{image_id}").status_code == 403
    admin = client_for(app, issuer, roles=("admin", "user"))
    assert admin.delete(f"/api/v1/images/{image_id}").status_code == 204
    assert owner.get(f"/api/v1/images/{image_id}").status_code == 404
    assert probe.status(image_id) is None
    assert f"originals/{image_id}" not in probe.originals()
    assert result_key not in probe.results()
    assert admin.delete(f"/api/v1/images/{image_id}").status_code == 404


def test_status_filter_must_be_a_known_status(app, issuer: LocalIssuer) -> None:
    response = client_for(app, issuer).get("/api/v1/images", status="bogus")
    assert response.status_code == 400


def test_every_response_carries_security_headers(app, issuer: LocalIssuer) -> None:
    for response in (
        ApiClient(app, None).get("/health"),
        client_for(app, issuer).get("/api/v1/images"),
        ApiClient(app, None).get("/api/v1/images"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "X-Request-ID" in response.headers


def test_health_and_ready_answer_without_token(app) -> None:
    client = ApiClient(app, None)
    assert client.get("/health").json == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json["status"] == "ready"
