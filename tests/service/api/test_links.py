"""The OpenAPI links of service/api/links.py: on the app's document, and skipped where an
operation is missing."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from service.api.links import LINKS, Link, add_links


def test_every_link_names_an_operation_of_the_document(api: TestClient) -> None:
    document = api.get("/openapi.json").json()
    operation_ids = {
        op["operationId"]: (method, path)
        for path, operations in document["paths"].items()
        for method, op in operations.items()
    }
    declared = 0
    for link in LINKS:
        method, path = link.source
        links = document["paths"][path][method]["responses"][link.status]["links"]
        target = links[link.name]
        assert operation_ids[target["operationId"]] == link.target
        assert target["parameters"] == link.parameters
        for name in link.parameters:  # every parameter the link fills is the target's
            target_method, target_path = link.target
            params = document["paths"][target_path][target_method]["parameters"]
            assert name in {p["name"] for p in params}, (link, name)
        declared += 1
    assert declared == len(LINKS)


def test_a_link_to_or_from_a_missing_operation_is_skipped() -> None:
    document: dict[str, Any] = {
        "paths": {
            "/a": {"post": {"operationId": "a", "responses": {"201": {"description": "ok"}}}},
            "/b": {"get": {"operationId": "b", "responses": {"200": {"description": "ok"}}}},
        }
    }
    links = (
        Link("to_b", ("post", "/a"), "201", ("get", "/b"), {"id": "$response.body#/id"}),
        Link("to_c", ("post", "/a"), "201", ("get", "/c")),
        Link("from_c", ("post", "/c"), "201", ("get", "/b")),
        Link("on_404", ("post", "/a"), "404", ("get", "/b")),
    )
    add_links(document, links)
    assert document["paths"]["/a"]["post"]["responses"]["201"]["links"] == {
        "to_b": {"operationId": "b", "parameters": {"id": "$response.body#/id"}, "description": ""}
    }
    assert "links" not in document["paths"]["/b"]["get"]["responses"]["200"]
