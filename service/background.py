"""The reconcile runner: a daemon thread in every serving process that works on the
database's reconcile jobs (``service.usecases.reconcile``) alongside the others.

Idle, it looks for claimable items every ``reconcile_poll_s`` (a read). It claims
``reconcile_claim`` items at a time for ``reconcile_lease_s``, re-adapts them one at a
time (so the engine interleaves them with serving, never a batch of them at once), at
most ``reconcile_rate`` clients per second, and renews the lease of the rest between
clients once a third of it has passed (the heartbeat); the items of a killed process
are claimed again once their lease expires. On shutdown it finishes the client in hand
and hands the rest back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from sqlalchemy.orm import Session, sessionmaker

from service.errors import FastAdaptError
from service.usecases import reconcile
from service.usecases.runtime import Runtime

log = logging.getLogger(__name__)
ERROR_PAUSE_S = 5.0  # after an unexpected error (the database down, say)
RENEW_AFTER = 3  # the heartbeat renews the claims once a third of their lease has passed


def worker_id() -> str:
    """This process, as the claims name it: host, pid and a random suffix (pids recur)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Reconciler:
    def __init__(self, sessions: sessionmaker[Session], runtime: Runtime) -> None:
        self.sessions = sessions
        self.runtime = runtime
        self.worker = worker_id()
        self.outcomes: dict[str, int] = {}  # run outcome -> count, for tests and logs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.runtime.settings.reconcile_rate > 0

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="fastadapt-reconcile", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the client in hand (whose adaptation waits for the engine at most
        its job timeout); the other claims go back to pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        settings = self.runtime.settings
        while not self._stop.wait(settings.reconcile_poll_s):
            try:
                while not self._stop.is_set() and self.round():
                    pass
            except FastAdaptError as exc:
                log.warning("reconcile: %s", exc.message)
                self._stop.wait(ERROR_PAUSE_S)
            except Exception as exc:  # the thread must survive; its log names the type only
                log.error("reconcile: unexpected %s", type(exc).__name__)
                self._stop.wait(ERROR_PAUSE_S)

    def round(self) -> bool:
        """Claim and run one batch of items; False when there was nothing to claim (or the
        engine refused): then the loop waits a poll."""
        settings = self.runtime.settings
        lease = settings.reconcile_lease_s
        with self.sessions() as session:
            if not reconcile.claimable(session=session, lease_s=lease):
                return False
            claims = reconcile.claim(
                session=session, worker=self.worker, lease_s=lease, limit=settings.reconcile_claim
            )
        busy = bool(claims)
        interval = 1.0 / settings.reconcile_rate
        renewed = time.monotonic()
        while claims and not self._stop.is_set():
            started = time.monotonic()
            claim, claims = claims[0], claims[1:]
            with self.sessions() as session:
                outcome = reconcile.run(
                    session=session, runtime=self.runtime, worker=self.worker, claim=claim
                )
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                if claims and time.monotonic() - renewed > lease / RENEW_AFTER:
                    reconcile.renew(session=session, worker=self.worker, claims=claims)
                    renewed = time.monotonic()
            if outcome == "released":  # the engine is busy or the job was cancelled
                busy = False  # wait a poll before claiming again
                break
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))
        if claims:
            with self.sessions() as session:
                reconcile.release(session=session, worker=self.worker, claims=claims)
        return busy
