"""The MAML inner loop, written with ``torch.func``.

Parameters are data: adaptation takes a ``Params`` dict and returns a new one via
``functional_call`` + ``grad``; the meta-model is never mutated. One task is the unit
(``x``: (K, ...), ``y``: (K, ...), ``w``: (K,) weights that mask padding); a batch of
tasks is ``torch.func.vmap`` over that unit. Algorithms are configuration:

- MAML: ``first_order=False``; first-order MAML: ``first_order=True``;
- ANIL: ``adapt="head"`` (the body's support features are computed once per adaptation);
- Meta-SGD: ``learned_lr="per_param"``; MAML++ rates: ``learned_lr="per_layer_per_step"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from models.params import Params, select

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Adapt = Literal["all", "head"]
LearnedLr = Literal["none", "per_param", "per_layer_per_step"]


@dataclass(frozen=True)
class InnerLoopConfig:
    steps: int = 5  # gradient steps per adaptation
    lr: float = 0.01  # inner step size (the initial value when rates are learned)
    first_order: bool = False  # drop second-order terms of the meta-gradient (FOMAML)
    adapt: Adapt = "all"  # "all" parameters (MAML) or the "head" alone (ANIL)
    learned_lr: LearnedLr = "none"  # or "per_param" (Meta-SGD), "per_layer_per_step" (MAML++)
    grad_clip: float | None = None  # clip each inner gradient to this global norm (None: off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InnerLoopConfig:
        return cls(**data)


def mse_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    # pred, target: (K, O); weight: (K,) -> scalar weighted mean of per-example MSE
    per_example = ((pred - target) ** 2).mean(-1)
    return (per_example * weight).sum() / weight.sum().clamp_min(1.0)


def cross_entropy_loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    # logits: (K, C); target: (K,) int64 class indices; weight: (K,)
    per_example = F.cross_entropy(logits, target, reduction="none")
    return (per_example * weight).sum() / weight.sum().clamp_min(1.0)


LOSSES: dict[str, LossFn] = {"regression": mse_loss, "classification": cross_entropy_loss}


def clip_norm(grads: Params, max_norm: float) -> Params:
    """Scale the gradient down to ``max_norm`` (global over all entries) if it is longer:
    a support set that would make the learned step sizes diverge takes a bounded step."""
    norm = torch.stack([(g * g).sum() for g in grads.values()]).sum().sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return {n: g * scale for n, g in grads.items()}


class AdaptResult(NamedTuple):
    fast: Params  # the adapted parameters (all of them, or ``head.*`` alone for ANIL)
    loss_before: Tensor  # support loss at the meta-initialisation, scalar (or (B,) batched)
    loss_after: Tensor  # support loss after the last step


class _Features(nn.Module):
    """A net whose input is already the body's features: ``head`` alone."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.body = nn.Identity()
        self.head = head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(h)


class Learner:
    """A net, its loss and its inner-loop configuration, as pure functions of parameters."""

    def __init__(self, net: nn.Module, loss: LossFn, inner: InnerLoopConfig) -> None:
        self.net = net
        self.loss = loss
        self.inner = inner

    # -- which parameters adapt ------------------------------------------------------------
    def is_fast(self, name: str) -> bool:
        return self.inner.adapt == "all" or name.startswith("head.")

    def split(self, params: Params) -> tuple[Params, Params]:
        """(fast, frozen): the parameters the inner loop updates, and the rest."""
        fast = {n: p for n, p in params.items() if self.is_fast(n)}
        frozen = {n: p for n, p in params.items() if not self.is_fast(n)}
        return fast, frozen

    def init_lrs(self, params: Params) -> Params:
        """Initial learnable inner rates for ``learned_lr`` (empty when rates are fixed)."""
        fast, _ = self.split(params)
        lr = self.inner.lr
        if self.inner.learned_lr == "per_param":
            return {n: torch.full_like(p, lr) for n, p in fast.items()}
        if self.inner.learned_lr == "per_layer_per_step":
            return {
                n: torch.full((self.inner.steps,), lr, device=p.device) for n, p in fast.items()
            }
        return {}

    def step_lr(self, lrs: Params, name: str, step: int, lr: float | None) -> Tensor | float:
        if lr is not None or self.inner.learned_lr == "none":
            return self.inner.lr if lr is None else lr
        rate = lrs[name]
        if self.inner.learned_lr == "per_layer_per_step":
            return rate[min(step, rate.shape[0] - 1)]  # past the trained steps: the last rate
        return rate

    # -- forward -----------------------------------------------------------------------------
    def features(self, frozen: Params, x: Tensor) -> Tensor:
        """What the fast parameters see: the body's features (ANIL) or the input itself."""
        if self.inner.adapt == "head":
            return functional_call(self.net.get_submodule("body"), select(frozen, "body"), (x,))
        return x

    def fast_forward(self, fast: Params, frozen: Params, h: Tensor) -> Tensor:
        if self.inner.adapt == "head":
            return functional_call(self.net.get_submodule("head"), select(fast, "head"), (h,))
        return functional_call(self.net, {**frozen, **fast}, (h,))

    def on_features(self) -> Learner:
        """The head-only learner on precomputed body features (ANIL): meta-training runs
        the frozen body once over a whole meta-batch, outside ``vmap``, and adapts heads
        from its features. Its parameters are the ``head.*`` entries alone."""
        if self.inner.adapt != "head":
            raise ValueError("only head-only adaptation runs on features")
        return Learner(_Features(self.net.get_submodule("head")), self.loss, self.inner)

    def predict(self, params: Params, fast: Params, x: Tensor) -> Tensor:
        """Outputs of the adapted model for one task: x (Q, ...) -> (Q, O)."""
        _, frozen = self.split(params)
        return self.fast_forward(fast, frozen, self.features(frozen, x))

    # -- the inner loop ----------------------------------------------------------------------
    def _descend(
        self,
        fast: Params,
        frozen: Params,
        h: Tensor,
        y: Tensor,
        w: Tensor,
        lrs: Params,
        steps: int,
        lr: float | None,
        create_graph: bool,
    ) -> Iterator[tuple[Params, Tensor]]:
        def support_loss(fast: Params) -> Tensor:
            return self.loss(self.fast_forward(fast, frozen, h), y, w)

        step_grad = grad_and_value(support_loss)
        for step in range(steps):
            grads, loss = step_grad(fast)
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            if self.inner.grad_clip is not None:
                grads = clip_norm(grads, self.inner.grad_clip)
            fast = {n: p - self.step_lr(lrs, n, step, lr) * grads[n] for n, p in fast.items()}
            yield fast, loss

    def steps(
        self,
        params: Params,
        lrs: Params,
        x: Tensor,
        y: Tensor,
        w: Tensor,
        *,
        steps: int | None = None,
        lr: float | None = None,
        create_graph: bool = False,
    ) -> Iterator[tuple[Params, Tensor]]:
        """The inner loop on one task's support set: x (K, ...), y (K, ...), w (K,).

        Yields ``(fast, support_loss)`` after each step, where the loss is the one that
        step descended (at the parameters before it). ``create_graph=True`` keeps the
        inner gradients differentiable (second-order MAML); otherwise they are detached,
        which is first-order MAML during meta-training and plain fine-tuning when serving.
        """
        fast, frozen = self.split(params)
        h = self.features(frozen, x)  # computed once: ANIL's support features
        n = self.inner.steps if steps is None else steps
        yield from self._descend(fast, frozen, h, y, w, lrs, n, lr, create_graph)

    def adapt(
        self,
        params: Params,
        lrs: Params,
        x: Tensor,
        y: Tensor,
        w: Tensor,
        *,
        steps: int | None = None,
        lr: float | None = None,
        create_graph: bool = False,
    ) -> AdaptResult:
        """Run the whole inner loop (see ``steps``) and report the support loss around it."""
        fast, frozen = self.split(params)
        h = self.features(frozen, x)
        n = self.inner.steps if steps is None else steps
        trajectory = list(self._descend(fast, frozen, h, y, w, lrs, n, lr, create_graph))
        if trajectory:
            fast = trajectory[-1][0]
        loss_after = self.loss(self.fast_forward(fast, frozen, h), y, w)
        loss_before = trajectory[0][1] if trajectory else loss_after
        return AdaptResult(fast, loss_before, loss_after)

    def adapt_batch(
        self,
        params: Params,
        lrs: Params,
        x: Tensor,
        y: Tensor,
        w: Tensor,
        *,
        steps: int | None = None,
        lr: float | None = None,
        create_graph: bool = False,
    ) -> AdaptResult:
        """``adapt`` vmapped over tasks: x (B, K, ...), y (B, K, ...), w (B, K)."""

        def one(x: Tensor, y: Tensor, w: Tensor) -> AdaptResult:
            return self.adapt(params, lrs, x, y, w, steps=steps, lr=lr, create_graph=create_graph)

        return AdaptResult(*torch.func.vmap(one)(x, y, w))

    def predict_batch(self, params: Params, fast: Params, x: Tensor) -> Tensor:
        """``predict`` vmapped over tasks: fast (B, ...) per entry, x (B, Q, ...) -> (B, Q, O)."""
        return torch.func.vmap(lambda f, xi: self.predict(params, f, xi))(fast, x)
