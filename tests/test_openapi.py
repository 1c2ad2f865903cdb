"""The OpenAPI document matches the API: every route and method, and real responses."""

from __future__ import annotations

import re

import falcon.inspect
import jsonschema
import pytest
from openapi_spec_validator import validate

from tests.support import ApiClient, StackProbe, jpeg, multipart

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module")
def document(app) -> dict:
    return ApiClient(app, None).get("/openapi.json").json


def test_document_is_valid_openapi(document: dict) -> None:
    validate(document)


def test_every_route_and_method_is_documented_and_nothing_else(app, document: dict) -> None:
    served = {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if method.method in METHODS and method.internal is False
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served == documented


def response_schema(document: dict, path: str, method: str, status: int) -> dict:
    """The documented schema, resolvable against the document's components."""
    content = document["paths"][path][method]["responses"][str(status)]["content"]
    return {**content["application/json"]["schema"], "components": document["components"]}


def check(document: dict, path: str, method: str, response) -> None:
    schema = response_schema(document, path, method, response.status_code)
    jsonschema.validate(response.json, schema)


def test_real_responses_match_their_schemas(api: ApiClient, document: dict) -> None:
    created = api.upload(jpeg(120, 90))
    check(document, "/api/v1/upload", "post", created)
    image_path = f"/api/v1/images/{created.json['id']}"
    check(document, "/api/v1/images/{image_id}", "get", api.get(image_path))
    check(document, "/api/v1/images", "get", api.get("/api/v1/images"))
    body, content_type = multipart(
        [("image", "a.jpg", jpeg(64, 64), "image/jpeg"), ("image", "b.txt", b"text", "text/plain")]
    )
    check(document, "/api/v1/uploads", "post", api.post_raw("/api/v1/uploads", body, content_type))
    check(document, "/api/v1/upload", "post", api.upload(b"not an image"))
    check(document, "/api/v1/images/{image_id}", "get", api.get("/api/v1/images/nope"))
    anonymous = ApiClient(api.client.app, None)
    check(document, "/api/v1/images", "get", anonymous.get("/api/v1/images"))


def schema_refs(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in schema_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in schema_refs(value)]
    return []


def test_operations_and_schemas_are_named_for_client_generators(document: dict) -> None:
    operations = [op for item in document["paths"].values() for op in item.values()]
    names = [op.get("operationId") for op in operations]
    assert None not in names and len(set(names)) == len(names)
    # Generators follow references to whole schemas only, never into a schema's properties.
    component = re.compile(r"^#/components/schemas/[A-Za-z]+$")
    assert [ref for ref in schema_refs(document) if not component.match(ref)] == []
    bodies = [op["requestBody"]["content"] for op in operations if "requestBody" in op]
    assert all("$ref" in media["schema"] for body in bodies for media in body.values())


def test_listing_by_ids_refuses_a_status_outside_the_enum_and_a_bad_limit(api: ApiClient) -> None:
    image_id = api.upload(jpeg(64, 48)).json["id"]
    for params in ({"status": "bogus"}, {"limit": "0"}, {"cursor": "garbage"}):
        refused = api.get("/api/v1/images", ids=image_id, **params)
        assert refused.status_code == 400, params
        assert set(refused.json) == {"error"}


def test_listing_by_ids_keeps_only_the_status_asked_for(api: ApiClient) -> None:
    image_id = api.upload(jpeg(64, 48)).json["id"]
    found = api.get("/api/v1/images", ids=image_id).json["items"]
    assert [item["id"] for item in found] == [image_id]
    # A valid JPEG never fails, so the filter must leave it out.
    assert api.get("/api/v1/images", ids=image_id, status="failed").json["items"] == []


def test_bulk_upload_without_a_file_part_is_400_and_stores_nothing(
    api: ApiClient, user_id: str, probe: StackProbe
) -> None:
    originals = probe.originals()
    body, content_type = multipart(
        [("image", None, b"a text value", "text/plain"), ("image", None, b"another", "text/plain")]
    )
    refused = api.post_raw("/api/v1/uploads", body, content_type)
    assert refused.status_code == 400
    assert refused.json["error"]["code"] == "bad_request"
    assert probe.rows_for(user_id) == []
    assert probe.originals() == originals


def test_bulk_upload_refuses_a_text_value_beside_files_in_its_own_entry(api: ApiClient) -> None:
    body, content_type = multipart(
        [
            ("image", None, b"a text value", "text/plain"),
            ("image", "a.jpg", jpeg(64, 48), "image/jpeg"),
        ]
    )
    answer = api.post_raw("/api/v1/uploads", body, content_type)
    assert answer.status_code == 207
    assert [item["status"] for item in answer.json["items"]] == [400, 201]


def test_batch_responses_match_their_schemas(api: ApiClient, document: dict) -> None:
    created = api.client.simulate_post(
        "/api/v1/batches", json={"name": "schema"}, headers=api.headers()
    )
    check(document, "/api/v1/batches", "post", created)
    chosen = api.client.simulate_post(
        "/api/v1/batches", json={"renditions": ["default"]}, headers=api.headers()
    )
    assert chosen.json["renditions"] == ["default"]
    check(document, "/api/v1/batches", "post", chosen)
    check(
        document,
        "/api/v1/batches/{batch_id}",
        "get",
        api.get(f"/api/v1/batches/{chosen.json['id']}"),
    )
    batch_path = f"/api/v1/batches/{created.json['id']}"
    body, content_type = multipart([("image", "a.jpg", jpeg(64, 64), "image/jpeg")])
    joined = api.post_raw(f"/api/v1/upload?batch={created.json['id']}", body, content_type)
    check(document, "/api/v1/upload", "post", joined)
    check(document, "/api/v1/batches/{batch_id}", "get", api.get(batch_path))
    check(document, "/api/v1/batches", "get", api.get("/api/v1/batches"))
    check(document, "/api/v1/batches/{batch_id}/images", "get", api.get(f"{batch_path}/images"))
    for action in ("close", "retry", "cancel"):
        answer = api.client.simulate_post(f"{batch_path}/{action}", headers=api.headers())
        check(document, f"/api/v1/batches/{{batch_id}}/{action}", "post", answer)
    check(document, "/api/v1/batches/{batch_id}", "get", api.get("/api/v1/batches/nope"))
