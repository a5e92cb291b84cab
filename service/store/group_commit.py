"""Group commit: new client versions from concurrent requests share one transaction.

At high concurrency one commit per adapted version costs more than the adaptation (a
SQLite commit is an fsync under the one write lock; a PostgreSQL commit is a WAL flush).
``GroupCommit.append`` is leader/follower group commit, as databases do it for their
own logs: a caller that finds no commit running becomes the leader and commits, in its
own session, every row queued so far; callers that arrive meanwhile wait, and the next
of them leads the rows that piled up. Nobody waits for a group to fill, so a lone
request commits at once. ``append`` returns only after the transaction holding the row
has committed: an acknowledged version is durably stored.

This module commits, which repository functions never do: it is the use cases'
commit, shared. A group is three statements (``repository.append_versions``), four
with retention (one ``DELETE`` prunes every client of the group past its newest
``keep``), which lock clients in (tenant, client) order, so two processes' groups
cannot deadlock. If a group's transaction fails, its rows are retried one transaction
each, so one bad row fails only its own request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from service.store import repository
from service.store.tables import ClientVersion


@dataclass(eq=False)
class _Pending:
    row: ClientVersion
    woken: threading.Event = field(default_factory=threading.Event)  # done, or to lead
    done: bool = False
    error: BaseException | None = None


class GroupCommit:
    def __init__(self, max_rows: int = 256, keep: int | None = None) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if keep is not None and keep < 1:
            raise ValueError("keep must be >= 1")
        self.max_rows = max_rows  # most rows in one transaction
        self.keep = keep  # versions kept per client (None: all), pruned in the same transaction
        self._pending: list[_Pending] = []
        self._leading = False  # a leader is committing, or has been chosen
        self._lock = threading.Lock()
        self.commits = 0  # transactions committed (groups and retries)
        self.rows = 0  # rows committed
        self.on_commit: Callable[[int], None] | None = None  # told each commit's rows (metrics)

    def append(self, *, session: Session, row: ClientVersion) -> ClientVersion:
        """Store ``row`` as its client's next version and commit it (with whatever other
        threads appended meanwhile). Raises what storing this row raised (the session
        is then rolled back); ``session`` must have no other pending work."""
        mine = _Pending(row)
        with self._lock:
            self._pending.append(mine)
            leading = not self._leading
            self._leading = True
        while not mine.done:
            if not leading:  # each waiter is woken once: its row is done, or it leads next
                mine.woken.wait()
                mine.woken.clear()
                if mine.done:
                    break
            leading = self._lead(session, mine) is mine
        if mine.error is not None:
            raise mine.error
        return mine.row

    def _lead(self, session: Session, me: _Pending) -> _Pending | None:
        """Commit the oldest pending rows, wake their owners, and hand over to the
        oldest row still pending (returned), if any."""
        with self._lock:
            group = self._pending[: self.max_rows]
            del self._pending[: self.max_rows]
        successor = None
        try:
            self._commit(session, group)
        finally:
            with self._lock:
                for pending in group:
                    pending.done = True
                successor = self._pending[0] if self._pending else None
                self._leading = successor is not None
            for pending in group:
                if pending is not me:
                    pending.woken.set()
            if successor is not None and successor is not me:
                successor.woken.set()
        return successor

    def _commit(self, session: Session, group: list[_Pending]) -> None:
        try:
            repository.append_versions(session=session, rows=[p.row for p in group], keep=self.keep)
            session.commit()
        except BaseException as exc:
            session.rollback()
            if len(group) == 1:
                group[0].error = exc
                return
            for pending in group:  # alone, each row meets only its own error
                self._commit(session, [pending])
            return
        self.commits += 1
        self.rows += len(group)
        if self.on_commit is not None:
            self.on_commit(len(group))
