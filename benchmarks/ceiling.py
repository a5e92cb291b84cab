"""The HTTP ceiling: what this machine serves from a FastAPI app that does nothing else.

    python -m benchmarks.ceiling --port 8001 [--workers N]

The same two routes as fastadapt's adaptations and predictions (same paths, the same
client-id pattern, the same pydantic request and response schemas), served by uvicorn
with the settings ``fastadapt serve`` uses; each parses and validates the body, then
answers a constant-shaped response (zeros, one per input) without a database, an engine
or auth. ``benchmarks.bench_http`` runs it beside fastadapt and prints fastadapt's share
of it: the part of a request that is HTTP, JSON and pydantic alone. With ``--workers N``,
uvicorn's own N worker processes serve it on the one port (``benchmarks.bench_workers``
sets it beside ``fastadapt serve --workers N``).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from fastapi import FastAPI

from service.api.deps import ClientId
from service.api.schemas import (
    AdaptRequest,
    AdaptResponse,
    PredictionRequest,
    PredictionResponse,
    Status,
)

UID = "0" * 32  # a version_id's shape
SHA = "0" * 64  # a meta-model version's shape
STARTED = datetime.now(UTC)


def create_app() -> FastAPI:
    app = FastAPI(title="fastadapt HTTP ceiling")

    @app.get("/readyz")
    async def readyz() -> Status:
        return Status(status="ready")

    @app.post("/v1/clients/{client_id}/adaptations", status_code=201)
    async def adapt(client_id: ClientId, body: AdaptRequest) -> AdaptResponse:
        return AdaptResponse(
            client_id=client_id,
            version=1,
            version_id=UID,
            meta_model=body.meta_model,
            meta_model_version=SHA,
            support_size=len(body.support.inputs),
            inner_steps=body.inner_steps or 5,
            inner_lr=body.inner_lr,
            support_loss_before=0.0,
            support_loss_after=0.0,
            adapt_ms=0.0,
            labels=None,
            origin="adapt",
            source_version=None,
            out_of_scope_threshold=None,
        )

    @app.post("/v1/clients/{client_id}/predictions")
    async def predict(client_id: ClientId, body: PredictionRequest) -> PredictionResponse:
        return PredictionResponse(
            client_id=client_id,
            version=body.version or 1,
            version_id=UID,
            predictions=[0.0] * len(body.inputs),
        )

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (1: none)")
    args = p.parse_args()
    if args.workers < 1:
        p.error("--workers must be at least 1")
    import uvicorn

    # as ``fastadapt serve`` runs uvicorn (service/cli.py): its defaults, no access log
    if args.workers == 1:
        uvicorn.run(create_app(), host=args.host, port=args.port, access_log=False)
        return
    # uvicorn starts its workers from an import string (each builds its own app)
    uvicorn.run(
        "benchmarks.ceiling:create_app",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        access_log=False,
    )


if __name__ == "__main__":
    main()
