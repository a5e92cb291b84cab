"""The MAML inner loop, written with ``torch.func``, and the one home of its maths.

The losses (per task, and batched with their analytic output gradients), the step-size
rule (``step_rate``, ``rate_at``: past the learned steps, the last learned rate) and the
gradient clip (``clip_factor``) are defined here once; ``Learner`` and the engine's
hand-written kernels (``models.kernels``) both call them.

Parameters are data: adaptation takes a ``Params`` dict and returns a new one via
``functional_call`` + ``grad``; the meta-model is never mutated. One task is the unit
(``x``: (K, ...), ``y``: (K, ...), ``w``: (K,) weights that mask padding); a batch of
tasks is ``torch.func.vmap`` over that unit. Algorithms are configuration:

- MAML: ``first_order=False``; first-order MAML: ``first_order=True``;
- ANIL: ``adapt="head"`` (the body's support features are computed once per adaptation);
- Meta-SGD: ``learned_lr="per_param"``; MAML++ rates: ``learned_lr="per_layer_per_step"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from models.params import Params, select

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (K, O), (K[, O]), (K,) -> scalar
OutputGrad = Callable[[Tensor], Tensor]  # out (B, K, O) -> d loss / d out (B, K, O)
Adapt = Literal["all", "head"]
LearnedLr = Literal["none", "per_param", "per_layer_per_step"]
HeadInit = Literal["meta", "proto"]


@dataclass(frozen=True)
class InnerLoopConfig:
    steps: int = 5  # gradient steps per adaptation
    lr: float = 0.01  # inner step size (the initial value when rates are learned)
    first_order: bool = False  # drop second-order terms of the meta-gradient (FOMAML)
    adapt: Adapt = "all"  # "all" parameters (MAML) or the "head" alone (ANIL)
    learned_lr: LearnedLr = "none"  # or "per_param" (Meta-SGD), "per_layer_per_step" (MAML++)
    grad_clip: float | None = None  # clip each inner gradient to this global norm (None: off)
    # the head the descent starts from: the meta-learned one, or "proto" (Proto-MAML,
    # Triantafillou et al. 2020): each class's row from the mean of its support features
    head_init: HeadInit = "meta"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "inner") -> InnerLoopConfig:
        """From a saved ``inner`` block, which must name every field: a default that
        changes later must not change how an old artifact adapts. A missing or unknown
        key is a ValueError naming it (``where`` prefixes the name)."""
        names = [f.name for f in fields(cls)]
        data = {**ADDED_LATER, **data}
        for name in names:
            if name not in data:
                raise ValueError(f"{where}.{name} is missing")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: not an inner-loop option; known: {names}")
        return cls(**data)


# options added after artifacts were first saved, at the value those artifacts adapt with
ADDED_LATER: dict[str, Any] = {"head_init": "meta"}

Rate = Tensor | float  # a step size: a float, a learned tensor, or one per client (B, 1, 1)


# -- losses: the per-task form (autograd differentiates it) and the batched form with its
# analytic output gradient (the hand-written kernels use it); tests/models/test_maml.py checks
# that each batched loss equals its per-task loss per client and that its gradient is autograd's
def mse_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    # pred, target: (K, O); weight: (K,) -> scalar weighted mean of per-example MSE
    per_example = ((pred - target) ** 2).mean(-1)
    return (per_example * weight).sum() / weight.sum().clamp_min(1.0)


def cross_entropy_loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    # logits: (K, C); target: (K,) int64 class indices; weight: (K,)
    per_example = F.cross_entropy(logits, target, reduction="none")
    return (per_example * weight).sum() / weight.sum().clamp_min(1.0)


LOSSES: dict[str, LossFn] = {"regression": mse_loss, "classification": cross_entropy_loss}


def _weighted_mean(per_example: Tensor, weight: Tensor) -> Tensor:
    # per_example, weight: (B, K) -> (B,), each client divided by its own weight sum
    return (per_example * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def _row_share(weight: Tensor) -> Tensor:
    # weight: (B, K) -> (B, K, 1): each row's share of its client's loss, w / sum(w)
    return (weight / weight.sum(1, keepdim=True).clamp_min(1.0))[..., None]


def batched_mse_loss(out: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    # out, target: (B, K, O); weight: (B, K) -> (B,), mse_loss of each client
    return _weighted_mean(((out - target) ** 2).mean(-1), weight)


def mse_output_grad(target: Tensor, weight: Tensor, width: int) -> OutputGrad:
    """d batched_mse_loss / d out as a function of out (B, K, O) -> (B, K, O); the constant
    factor 2 w / (O sum(w)) is computed once per adaptation, not once per step."""
    scale = _row_share(weight) * (2.0 / width)  # (B, K, 1)
    return lambda out: (out - target) * scale


def batched_cross_entropy_loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    # logits: (B, K, C); target: (B, K) int64 class indices; weight: (B, K) -> (B,)
    per_example = -logits.log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)
    return _weighted_mean(per_example, weight)


def cross_entropy_output_grad(target: Tensor, weight: Tensor, width: int) -> OutputGrad:
    """d batched_cross_entropy_loss / d logits (B, K, C) -> (B, K, C): (softmax - one-hot)
    times each row's share, the one-hot targets and shares computed once per adaptation."""
    scale = _row_share(weight)  # (B, K, 1)
    one_hot = F.one_hot(target, width).to(weight.dtype)  # (B, K, C)
    return lambda logits: (logits.softmax(-1) - one_hot) * scale


@dataclass(frozen=True)
class BatchedLoss:
    """A per-task loss for B clients at once, for kernels that run without autograd."""

    loss: Callable[[Tensor, Tensor, Tensor], Tensor]  # (B, K, O), (B, K[, O]), (B, K) -> (B,)
    # (target, weight, O) -> the gradient of ``loss`` (summed over clients) w.r.t. out
    output_grad: Callable[[Tensor, Tensor, int], OutputGrad]


BATCHED_LOSSES: dict[LossFn, BatchedLoss] = {
    mse_loss: BatchedLoss(batched_mse_loss, mse_output_grad),
    cross_entropy_loss: BatchedLoss(batched_cross_entropy_loss, cross_entropy_output_grad),
}


def batched_loss(loss: LossFn) -> BatchedLoss:
    """The batched form of a per-task loss; a ValueError for a loss that has none."""
    if loss not in BATCHED_LOSSES:
        known = ", ".join(f.__name__ for f in BATCHED_LOSSES)
        raise ValueError(f"{getattr(loss, '__name__', loss)} has no batched form; known: {known}")
    return BATCHED_LOSSES[loss]


# -- step sizes ------------------------------------------------------------------------------
def rate_at(rates: Tensor, step: int) -> Tensor:
    """A per-step learned rate (S, ...) at ``step``: past the S learned steps, the last one
    (an adaptation may run longer than meta-training did)."""
    return rates[min(step, rates.shape[0] - 1)]


def step_rate(inner: InnerLoopConfig, learned: Tensor | None, step: int, lr: Rate | None) -> Rate:
    """The step size of one parameter (or layer) at ``step``.

    An explicit ``lr`` overrides everything; fixed rates are ``inner.lr``; ``learned`` is
    that parameter's learned rates: the rate itself (``per_param``, shaped like it) or one
    per step (``per_layer_per_step``, (S,) or laid out as the kernel needs, (S, ...)).
    """
    if lr is not None:
        return lr
    if inner.learned_lr == "none":
        return inner.lr
    if learned is None:
        raise ValueError(f"learned_lr={inner.learned_lr!r} needs the learned rates")
    if inner.learned_lr == "per_layer_per_step":
        return rate_at(learned, step)
    return learned


# -- gradient clipping -----------------------------------------------------------------------
def clip_factor(squares: Sequence[Tensor], max_norm: float) -> Tensor:
    """The factor that scales a gradient down to a global norm of ``max_norm`` if it is
    longer, from its tensors' squared sums (each a scalar, or (B,) per client): a support
    set that would make the learned step sizes diverge takes a bounded step."""
    norm = torch.stack(list(squares)).sum(0).sqrt()  # scalar or (B,)
    return torch.clamp(max_norm / (norm + 1e-12), max=1.0)


def clip_norm(grads: Params, max_norm: float) -> Params:
    """``grads`` scaled by ``clip_factor``: global over all entries."""
    scale = clip_factor([(g * g).sum() for g in grads.values()], max_norm)
    return {n: g * scale for n, g in grads.items()}


# -- Proto-MAML's head ------------------------------------------------------------------------
UNUSED_BIAS = -1e4  # an output no support example uses: its softmax share is exp(-1e4) = 0


def proto_head(h: Tensor, y: Tensor, w: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """The linear head that scores features by their squared distance to each class's mean
    (Snell et al. 2017, as Proto-MAML initialises it): h (K, D) features, y (K,) class
    indices, w (K,) weights -> weight (ways, D) = 2 mean_c, bias (ways,) = -|mean_c|^2.
    Outputs that no weighted example uses get weight 0 and bias ``UNUSED_BIAS``: they
    take no probability and no gradient. Shapes are static, so ``vmap`` runs it."""
    one_hot = F.one_hot(y, ways).to(h.dtype) * w[:, None]  # (K, ways)
    counts = one_hot.sum(0)  # (ways,)
    means = (one_hot.T @ h) / counts.clamp_min(1e-12)[:, None]  # (ways, D)
    used = counts > 0
    weight = torch.where(used[:, None], 2.0 * means, torch.zeros_like(means))
    bias = torch.where(used, -(means * means).sum(-1), torch.full_like(counts, UNUSED_BIAS))
    return weight, bias


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

    def start(self, fast: Params, h: Tensor, y: Tensor, w: Tensor) -> Params:
        """Where the descent starts: the meta-learned fast params, or with
        ``head_init="proto"`` the head from the support features' class means (``h`` are
        what the head sees: head-only adaptation)."""
        if self.inner.head_init == "meta":
            return fast
        weight, bias = proto_head(h, y, w, fast["head.weight"].shape[0])
        return {**fast, "head.weight": weight, "head.bias": bias}

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

    def step_lr(self, lrs: Params, name: str, step: int, lr: float | None) -> Rate:
        """The step size of parameter ``name`` at ``step`` (``maml.step_rate``)."""
        learned = lrs[name] if lr is None and self.inner.learned_lr != "none" else None
        return step_rate(self.inner, learned, step, lr)

    def update(
        self, fast: Params, grads: Params, lrs: Params, step: int, lr: float | None
    ) -> Params:
        """One inner step from the support gradient: clipped (``grad_clip``), then
        ``p - rate * g`` with each parameter's rate for this step."""
        if self.inner.grad_clip is not None:
            grads = clip_norm(grads, self.inner.grad_clip)
        return {n: p - self.step_lr(lrs, n, step, lr) * grads[n] for n, p in fast.items()}

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

    def support_loss(self, fast: Params, frozen: Params, h: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """The loss the inner loop descends, on features h (K, ...) from ``features``."""
        return self.loss(self.fast_forward(fast, frozen, h), y, w)

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
            return self.support_loss(fast, frozen, h, y, w)

        step_grad = grad_and_value(support_loss)
        for step in range(steps):
            grads, loss = step_grad(fast)
            if not create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = self.update(fast, grads, lrs, step, lr)
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
        fast = self.start(fast, h, y, w)
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
        fast = self.start(fast, h, y, w)
        n = self.inner.steps if steps is None else steps
        trajectory = list(self._descend(fast, frozen, h, y, w, lrs, n, lr, create_graph))
        if trajectory:
            fast = trajectory[-1][0]
        loss_after = self.support_loss(fast, frozen, h, y, w)
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
