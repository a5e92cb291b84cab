"""What the engine tells an observer as it runs: a read-only hook for metrics.

The engine counts batches, jobs, batch sizes, refusals and the cache itself
(``Engine.stats``); an observer receives only what it does not keep: how long each batch
ran and how long its jobs waited. Calls come from the device worker's thread, once per
batch, after its futures are complete (or from a request thread, for predictions an idle
engine ran at once there); an observer must be quick, thread-safe, and must not raise.
The engine knows nothing of HTTP or of any metrics library.
"""

from __future__ import annotations

from collections.abc import Sequence


class EngineObserver:
    """The do-nothing observer (the engine's default); subclass to record."""

    def batch_ran(
        self, *, meta_model: str, kind: str, seconds: float, waited: Sequence[float]
    ) -> None:
        """A batch of ``kind`` ("adapt" or "predict") ran on the device for ``seconds``
        (wall time, tensors in to results out); ``waited`` holds each of its jobs' seconds
        in the queue, from submit to the batch's start."""
