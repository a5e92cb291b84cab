"""Adapting and predicting many clients of one meta-model at once: the batch layout and
``BatchedLearner``, which picks the kernel per net.

Support sets of different sizes are padded to the longest and masked with weights of 0,
and every loss divides by its own weight sum, so each client's gradient is exactly its
unpadded one. Two kernels:

- ``"bmm"`` (``mlp_bmm``): for ``nets.MLP``, the hand-batched ReLU MLP; it takes
  per-client step counts and learning rates in one batch.
- ``"vmap"`` (``vmap``): any net, one step count and one learning rate per batch.

Both return what ``Learner.adapt`` returns for each client alone, stacked: ``AdaptResult``
with ``fast`` entries (B, ...) and losses (B,).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from models.kernels.mlp_bmm import MLPKernel, mlp_layout
from models.kernels.vmap import VmapKernel
from models.maml import AdaptResult, Learner, Rate
from models.params import Params

KernelPath = Literal["auto", "bmm", "vmap"]
T = TypeVar("T", int, float)


def pad_batch(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack support sets of different sizes: xs[i] (K_i, ...), ys[i] (K_i, ...) ->
    x (B, K, ...), y (B, K, ...) zero-padded, and w (B, K) with 1 on real rows."""
    x = nn.utils.rnn.pad_sequence(list(xs), batch_first=True)  # (B, K, ...)
    y = nn.utils.rnn.pad_sequence(list(ys), batch_first=True)  # (B, K, ...)
    sizes = torch.tensor([t.shape[0] for t in xs], device=x.device)
    w = (torch.arange(x.shape[1], device=x.device) < sizes[:, None]).to(x.dtype)  # (B, K)
    return x, y, w


def stack(params: Sequence[Params]) -> Params:
    """Per-client parameter dicts -> one dict of (B, ...) tensors."""
    return {n: torch.stack([p[n] for p in params]) for n in params[0]}


def unstack(params: Params) -> list[Params]:
    """One dict of (B, ...) tensors -> B per-client dicts (views, no copy)."""
    size = next(iter(params.values())).shape[0]
    return [{n: t[i] for n, t in params.items()} for i in range(size)]


class BatchedLearner:
    """A meta-model's learner and parameters, adapting and predicting B clients per call.

    ``path="auto"`` takes ``"bmm"`` for MLPs and ``"vmap"`` otherwise. Everything runs
    without autograd graphs (serving), on the device the parameters live on.
    """

    def __init__(
        self, learner: Learner, params: Params, lrs: Params, path: KernelPath = "auto"
    ) -> None:
        self.learner = learner
        self.params = params
        self.lrs = lrs
        # the hand-batched kernel starts every descent from the meta-learned head
        meta_head = learner.inner.head_init == "meta"
        layout = mlp_layout(learner) if path != "vmap" and meta_head else None
        if path == "bmm" and layout is None:
            raise ValueError("the bmm path needs an MLP of Linear and ReLU layers, meta head")
        self.frozen = learner.split(params)[1]
        self.kernel = MLPKernel(learner, layout, params, lrs) if layout is not None else None
        self.vmap = VmapKernel(learner, params, lrs) if layout is None else None

    @property
    def path(self) -> Literal["bmm", "vmap"]:
        return "bmm" if self.kernel is not None else "vmap"

    @property
    def mixed(self) -> bool:
        """Whether one ``adapt`` call may take a different step count and lr per client."""
        return self.kernel is not None

    def adapt(
        self,
        x: Tensor,
        y: Tensor,
        w: Tensor,
        *,
        steps: Sequence[int] | int | None = None,
        lr: Sequence[float] | float | None = None,
    ) -> AdaptResult:
        """x (B, K, ...), y (B, K, ...), w (B, K) -> fast (B, ...) entries, losses (B,).

        ``steps``/``lr`` of None take the meta-model's own (learned rates where it has
        them); a sequence gives one value per client (the vmap path needs them all equal).
        """
        steps = self.learner.inner.steps if steps is None else steps
        with torch.no_grad():
            if self.kernel is not None:
                return self.kernel.adapt(
                    self.frozen, x, y, w, self._per_client(steps, x), self._rate(lr, x)
                )
            assert self.vmap is not None
            one_steps = steps if isinstance(steps, int) else _same(steps, "steps")
            one_lr = lr if lr is None or isinstance(lr, float | int) else _same(lr, "lr")
            return self.vmap.adapt(x, y, w, one_steps, one_lr)

    @staticmethod
    def _per_client(steps: Sequence[int] | int, x: Tensor) -> Tensor | int:
        if isinstance(steps, int):
            return steps
        if len(set(steps)) == 1:
            return steps[0]
        return torch.tensor(list(steps), device=x.device)  # (B,)

    @staticmethod
    def _rate(lr: Sequence[float] | float | None, x: Tensor) -> Rate | None:
        if lr is None or isinstance(lr, float | int):
            return None if lr is None else float(lr)
        if len(set(lr)) == 1:
            return float(lr[0])
        return torch.tensor(list(lr), dtype=x.dtype, device=x.device)  # (B,)

    def predict(self, fast: Params, x: Tensor) -> Tensor:
        """Stacked fast params (B, ...) per entry, x (B, Q, ...) -> outputs (B, Q, O)."""
        with torch.no_grad():
            if self.kernel is not None:
                return self.kernel.predict(self.frozen, fast, x)
            assert self.vmap is not None
            return self.vmap.predict(fast, x)


def _same(values: Sequence[T], what: str) -> T:
    if len(set(values)) != 1:
        raise ValueError(f"the vmap path takes one {what} per batch, got {sorted(set(values))}")
    return values[0]
