"""The generic paths: ``torch.func.vmap`` over ``Learner.adapt`` for any net, plain autograd
for a lone task, and the frozen body run once outside ``vmap`` for head-only nets.

One step count and one rate per batch. A batch of one takes ``autograd_adapt``, the same
update with plain autograd, which is several times faster than torch.func for one task.
With head-only adaptation (ANIL) the frozen body runs once over every client's real rows
as one flat batch (padding rows skip it), in chunks on a CPU, and only the head's descent
is vmapped: a convolutional body costs what a loop over the clients would, not more.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.maml import AdaptResult, Learner
from models.params import Params

# Images per call of a frozen body on a CPU: the shipped 128-channel Conv4 ran 320 images
# 1.8x faster in calls of 32 than in one call (its activations stay in cache). A GPU
# takes the whole batch at once.
CPU_BODY_ROWS = 32


def body_features(learner: Learner, frozen: Params, x: Tensor) -> Tensor:
    """``learner.features`` of x (N, ...) -> (N, D), in chunks of ``CPU_BODY_ROWS`` on a CPU."""
    if learner.inner.adapt != "head" or x.device.type != "cpu" or x.shape[0] <= CPU_BODY_ROWS:
        return learner.features(frozen, x)
    return torch.cat([learner.features(frozen, c) for c in x.split(CPU_BODY_ROWS)])


def autograd_adapt(
    learner: Learner,
    params: Params,
    lrs: Params,
    x: Tensor,
    y: Tensor,
    w: Tensor,
    steps: int,
    lr: float | None,
) -> AdaptResult:
    """``Learner.adapt`` for one task with ``torch.autograd.grad`` instead of ``torch.func``:
    the same loss and update (``Learner.support_loss``, ``Learner.update``), two to four
    times faster for a lone request on the CPU."""
    fast, frozen = learner.split(params)
    with torch.no_grad():
        h = body_features(learner, frozen, x)
        fast = learner.start(fast, h, y, w)
    fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
    loss_before: Tensor | None = None
    for step in range(steps):
        with torch.enable_grad():
            loss = learner.support_loss(fast, frozen, h, y, w)
            grads = torch.autograd.grad(loss, list(fast.values()))
        if loss_before is None:
            loss_before = loss.detach()
        with torch.no_grad():
            named = dict(zip(fast, grads, strict=True))
            fast = {
                n: p.requires_grad_() for n, p in learner.update(fast, named, lrs, step, lr).items()
            }
    with torch.no_grad():
        loss_after = learner.support_loss(fast, frozen, h, y, w)
    fast = {n: p.detach() for n, p in fast.items()}
    return AdaptResult(fast, loss_after if loss_before is None else loss_before, loss_after)


class VmapKernel:
    """Any net's learner, adapting and predicting B clients with ``torch.func.vmap``
    (autograd alone for a batch of one). Callers hold ``torch.no_grad``."""

    def __init__(self, learner: Learner, params: Params, lrs: Params) -> None:
        self.learner = learner
        self.params = params
        self.lrs = lrs
        self.frozen = learner.split(params)[1]
        # head-only nets: the head's learner on precomputed body features
        self.head = learner.on_features() if learner.inner.adapt == "head" else None

    def adapt(self, x: Tensor, y: Tensor, w: Tensor, steps: int, lr: float | None) -> AdaptResult:
        # x (B, K, ...), y (B, K, ...), w (B, K) -> fast (B, ...) entries, losses (B,)
        if x.shape[0] == 1:  # a lone request: plain autograd beats torch.func and vmap here
            one = autograd_adapt(self.learner, self.params, self.lrs, x[0], y[0], w[0], steps, lr)
            fast = {n: t.unsqueeze(0) for n, t in one.fast.items()}
            return AdaptResult(fast, one.loss_before.reshape(1), one.loss_after.reshape(1))
        if self.head is not None:
            head = self.learner.split(self.params)[0]
            h = self.features(x, w)  # (B, K, D)
            return self.head.adapt_batch(head, self.lrs, h, y, w, steps=steps, lr=lr)
        return self.learner.adapt_batch(self.params, self.lrs, x, y, w, steps=steps, lr=lr)

    def features(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        """The frozen body's features, one flat batch for all clients: x (B, K, ...) ->
        (B, K, D). Rows of weight 0 (padding) skip the body and get zero features; they
        carry no weight in any loss."""
        flat = x.flatten(0, 1)  # (B*K, ...)
        if w is None or bool((w > 0).all()):
            h = body_features(self.learner, self.frozen, flat)  # (B*K, D)
        else:
            real = w.flatten() > 0  # (B*K,)
            h_real = body_features(self.learner, self.frozen, flat[real])
            h = h_real.new_zeros(flat.shape[0], h_real.shape[-1])
            h[real] = h_real
        return h.reshape(*x.shape[:2], -1)

    def predict(self, fast: Params, x: Tensor) -> Tensor:
        # fast: (B, ...) per entry; x: (B, Q, ...) -> (B, Q, O)
        if self.head is not None:
            h = self.features(x)  # (B, Q, D)
            if x.shape[0] == 1:
                one = {n: t[0] for n, t in fast.items()}
                return self.head.predict({}, one, h[0]).unsqueeze(0)
            return self.head.predict_batch({}, fast, h)
        if x.shape[0] == 1:
            one = {n: t[0] for n, t in fast.items()}
            return self.learner.predict(self.params, one, x[0]).unsqueeze(0)
        return self.learner.predict_batch(self.params, fast, x)
