"""The OpenAPI document matches the API: every route and method, and real responses."""

from __future__ import annotations

import falcon.inspect
import jsonschema
import pytest
from openapi_spec_validator import validate

from tests.support import ApiClient, jpeg, multipart

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
