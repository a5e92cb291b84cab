"""What the engine takes and answers: validated jobs in, results (or a typed refusal) out.

Jobs come from ``service.requests``, which has validated them: the engine trusts them and
re-checks nothing. The fields marked "the engine's own" carry the cache's safety rule
from a submit to the call that follows it; callers hand them back untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from models.checkpoint import MetaModel

# (tenant_id, client_id, uid): the uid is the version's identity, never reused (a client
# deleted and re-created gets version 1 again, never the same uid), so a cache keyed by it
# can never answer a re-created client with a deleted one's params, in any process.
Key = tuple[str, str, str]

# Inputs for the engine: (N, D) rows of finite floats, D = prod(input_shape), kept as
# Python lists; or an (N, *input_shape) float32 tensor on the CPU (images, arrays).
# Rows stay lists because the worker converts a whole batch of them with one
# ``torch.tensor`` call: for a tiny sinusoid job, a tensor per job cost more than its
# inner loop (timeit, 5 rows of 1 float, on the shared 2-core machine: 14 us for a
# tensor per job, with or without stacking them, against 2.3 us per job as part of one
# call over 64 jobs).
# A text meta-model's inputs are its texts, validated; the engine encodes them first
# (``service.engine.texts``).
Texts = tuple[str, ...]
Inputs = Sequence[Sequence[float]] | Tensor | Texts


@dataclass(frozen=True)
class AdaptJob:
    meta_model: str  # the meta-model version (its sha) whose runner runs the job
    inputs: Inputs  # (K, D) rows or (K, *input_shape)
    targets: Sequence[float] | Sequence[int]  # (K,) numbers (one output), or class indices
    steps: int  # inner steps, resolved (the meta-model's default filled in)
    lr: float | None  # inner rate, resolved; None: the meta-model's learned rates
    # the version itself, to load it on the device if it is not (None: it must be)
    model: MetaModel | None = field(default=None, repr=False, compare=False)
    # whose support set: a text meta-model's embeddings are cached per tenant (a tenant
    # must not learn from the timing which texts another one sent)
    tenant: str = ""


@dataclass(frozen=True)
class Adapted:
    params: bytes  # safetensors of the adapted ("fast") params
    loss_before: float  # support loss at the meta-initialisation
    loss_after: float  # support loss after the last inner step
    steps: int  # inner steps taken
    lr: float | None  # inner rate used; None when the meta-model's learned rates were
    adapt_ms: float  # wall time of the batch this job ran in, tensors in to bytes out
    meta_model: str = field(default="", repr=False)  # the engine's own: whose params (sha)
    ticket: int = field(default=-1, repr=False)  # the engine's own: cache epoch at submit


@dataclass(frozen=True)
class PredictJob:
    meta_model: str  # the meta-model version (its sha) the client version was adapted from
    key: Key  # the client version (its uid) whose params predict
    inputs: Inputs  # (Q, D) rows or (Q, *input_shape)
    params: bytes | None = None  # its stored safetensors; None: from the cache, if there
    # the version itself, to load it on the device if it is not (None: it must be)
    model: MetaModel | None = field(default=None, repr=False, compare=False)
    ticket: int | None = field(default=None, repr=False)  # the engine's own (see NotCached)


class NotCached(LookupError):
    """``submit_predict`` without params found none cached for the job's key: read the
    stored params and submit ``loaded(params)``. Raised at once, in the caller's thread;
    the engine never reads the database itself."""

    def __init__(self, job: PredictJob, ticket: int) -> None:
        super().__init__(f"client version {job.key} is not cached")
        self.job = job
        self._ticket = ticket  # taken before the read: a forget since keeps it uncached

    @property
    def ticket(self) -> int:
        """The cache's epoch when the miss was found (an engine process sends it back)."""
        return self._ticket

    def loaded(self, params: bytes) -> PredictJob:
        """The same job with the stored params (read after this refusal)."""
        return replace(self.job, params=params, ticket=self._ticket)
