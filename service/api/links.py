"""OpenAPI links: how one operation's response feeds the next (adapt -> predict -> history
-> delete), for readers of the API document and for stateful fuzzing (schemathesis follows
them to chain real calls). Every link is declared here, in one table; ``install`` adds them
to the app's generated document.

A link names its operations by method and path template, and a value of the response
(``$response.body#/client_id``) per path parameter of the target. A link whose operation
is not in the document (a router left out) is skipped, so the table may name routes that
another build does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

CLIENT = "/v1/clients/{client_id}"
CLIENT_ID = {"client_id": "$response.body#/client_id"}


@dataclass(frozen=True)
class Link:
    name: str  # the link's name in the source response's ``links``
    source: tuple[str, str]  # (method, path template) of the operation that answers
    status: str  # the answer's status code
    target: tuple[str, str]  # (method, path template) of the operation it feeds
    parameters: dict[str, str] = field(default_factory=lambda: dict(CLIENT_ID))
    description: str = ""


ADAPT = ("post", f"{CLIENT}/adaptations")
READAPT = ("post", f"{CLIENT}/readaptations")
ROLLBACK = ("post", f"{CLIENT}/rollback")
EXAMPLES = ("post", f"{CLIENT}/examples")
PREDICT = ("post", f"{CLIENT}/predictions")
PREDICT_GET = ("get", f"{CLIENT}/predictions")
GET_CLIENT = ("get", CLIENT)
VERSIONS = ("get", f"{CLIENT}/versions")
DELETE_CLIENT = ("delete", CLIENT)
# operations that answer a new version of the client (201, an AdaptResponse)
NEW_VERSION = (ADAPT, READAPT, ROLLBACK, EXAMPLES)
# what a caller does with a client once it has one
FOLLOW_UPS = {
    "predict": PREDICT,
    "predict_query": PREDICT_GET,
    "client": GET_CLIENT,
    "versions": VERSIONS,
    "readapt": READAPT,
    "rollback": ROLLBACK,
    "examples": EXAMPLES,
    "delete": DELETE_CLIENT,
}

LINKS: tuple[Link, ...] = (
    *(
        Link(name, source, "201", target, description=f"{name} the client just adapted")
        for source in NEW_VERSION
        for name, target in FOLLOW_UPS.items()
    ),
    *(
        Link(name, source, "200", target, description=f"{name} the client just read")
        for source in (PREDICT, PREDICT_GET, GET_CLIENT, VERSIONS)
        for name, target in (
            ("client", GET_CLIENT),
            ("versions", VERSIONS),
            ("delete", DELETE_CLIENT),
        )
        if target != source
    ),
    Link(
        "revoke",
        ("post", "/v1/keys"),
        "201",
        ("delete", "/v1/keys/{key_id}"),
        parameters={"key_id": "$response.body#/id"},
        description="revoke the key just created",
    ),
)


def add_links(document: dict[str, Any], links: tuple[Link, ...] = LINKS) -> dict[str, Any]:
    """``document`` (an OpenAPI dict) with ``links`` on the responses of ``links``'
    sources; changed in place and returned."""
    paths: dict[str, dict[str, Any]] = document.get("paths", {})

    def operation(method: str, path: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = paths.get(path, {}).get(method)
        return found

    for link in links:
        source, target = operation(*link.source), operation(*link.target)
        if source is None or target is None or "operationId" not in target:
            continue
        response = source.get("responses", {}).get(link.status)
        if response is None:
            continue
        response.setdefault("links", {})[link.name] = {
            "operationId": target["operationId"],
            "parameters": link.parameters,
            "description": link.description,
        }
    return document


def install(app: FastAPI) -> None:
    """Generate the app's document with its links (FastAPI caches it after the first
    call)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_links(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
