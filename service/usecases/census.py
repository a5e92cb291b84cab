"""How much is stored, per meta-model: what ``/metrics`` reports as stored clients and
versions. One grouped query; the caller decides how often to ask."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.errors import Unavailable
from service.store import repository


@dataclass(frozen=True)
class Stored:
    meta_model: str
    clients: int  # clients whose current version was adapted from it
    versions: int  # versions adapted from it, of every client (all tenants)


def count(*, session: Session) -> list[Stored]:
    """Every meta-model with stored versions (those of unloaded meta-models included);
    ``Unavailable`` when the database does not answer."""
    try:
        rows = repository.count_by_meta_model(session=session)
    except SQLAlchemyError as exc:
        raise Unavailable(f"the database is unreachable ({type(exc).__name__})") from None
    return [Stored(name, clients, versions) for name, clients, versions in rows]
