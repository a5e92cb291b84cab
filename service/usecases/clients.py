"""A client's record, its deletion, and whether the service is ready for clients."""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.engine import Backend
from service.errors import NotFound, Unavailable
from service.store import repository
from service.store.tables import Client
from service.usecases.registry import ModelRegistry
from service.usecases.runtime import DATABASE_RETRY_AFTER_S, storing


@storing
def get(*, session: Session, tenant_id: str, client_id: str) -> Client:
    client = repository.get_client(session=session, tenant_id=tenant_id, client_id=client_id)
    if client is None:
        raise NotFound(f"unknown client {client_id!r}")
    return client


@storing
def delete(*, session: Session, engine: Backend, tenant_id: str, client_id: str) -> None:
    """Delete the client with every version and support set, and drop its cached models."""
    if not repository.delete_client(session=session, tenant_id=tenant_id, client_id=client_id):
        raise NotFound(f"unknown client {client_id!r}")
    session.commit()
    engine.forget(tenant_id, client_id)


def readiness(*, session: Session, registry: ModelRegistry) -> None:
    """Raise ``Unavailable`` unless the database answers and a meta-model is promoted."""
    try:
        repository.ping(session=session)
        promotions = registry.promotions(session)
    except SQLAlchemyError as exc:
        raise Unavailable(
            f"the database is unreachable ({type(exc).__name__})",
            retry_after=DATABASE_RETRY_AFTER_S,
        ) from None
    if not promotions:
        raise Unavailable("no meta-model is registered", retry_after=DATABASE_RETRY_AFTER_S)
