"""Adapting and predicting many clients of one meta-model at once.

Support sets of different sizes are padded to the longest and masked with weights of 0,
and every loss divides by its own weight sum, so each client's gradient is exactly its
unpadded one. Two batched paths, picked per net by ``BatchedLearner``:

- ``"bmm"``: for ``nets.MLP`` (MAML or ANIL, fixed or learned inner rates), an explicit
  forward/backward of the ReLU MLP with per-client weights stacked on a batch dimension,
  no autograd. Each Linear layer carries its bias as an extra input row (``[W | b]^T``
  against ``[h | 1]``), so a layer is one ``bmm`` forward and two backward. It takes
  per-client step counts and learning rates in one batch.
- ``"vmap"``: ``torch.func.vmap`` over ``Learner.adapt``, for any net; one step count and
  one learning rate per batch. A batch of one takes ``autograd_adapt``, the same update
  with plain autograd, which is several times faster than torch.func for one task. With
  head-only adaptation (ANIL) the frozen body runs once over every client's real rows as
  one flat batch, outside vmap (padding rows skip it), and only the head's descent is
  vmapped: a convolutional body costs what a loop over the clients would, not more.

Both return what ``Learner.adapt`` returns for each client alone, stacked: ``AdaptResult``
with ``fast`` entries (B, ...) and losses (B,). ``BytesPacker`` turns stacked fast params
into one safetensors blob per client, byte-identical to ``params.to_bytes``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.maml import AdaptResult, Learner, clip_norm, cross_entropy_loss, mse_loss
from models.nets import MLP
from models.params import Params, from_bytes, to_bytes

Path = Literal["auto", "bmm", "vmap"]
Rate = Tensor | float
T = TypeVar("T", int, float)
# Images per call of a frozen body on a CPU: the shipped 128-channel Conv4 ran 320 images
# 1.8x faster in calls of 32 than in one call (its activations stay in cache). A GPU
# takes the whole batch at once.
CPU_BODY_ROWS = 32


def body_features(learner: Learner, frozen: Params, x: Tensor) -> Tensor:
    """``learner.features`` of x (N, ...) -> (N, D), in chunks of ``CPU_BODY_ROWS`` on a CPU."""
    if learner.inner.adapt != "head" or x.device.type != "cpu" or x.shape[0] <= CPU_BODY_ROWS:
        return learner.features(frozen, x)
    return torch.cat([learner.features(frozen, c) for c in x.split(CPU_BODY_ROWS)])


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


# -- the hand-batched ReLU MLP ---------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    name: str  # parameter prefix, e.g. "body.0" or "head"
    fan_in: int
    fan_out: int
    hidden: bool  # a ReLU follows it


@dataclass(frozen=True)
class _MLPSpec:
    layers: list[_Layer]  # the fast Linear layers, in order
    prefix: list[nn.Module]  # parameter-free modules before the first Linear (Standardize)


def mlp_spec(learner: Learner) -> _MLPSpec | None:
    """How the bmm kernel runs an ``MLP`` learner, or None for other nets.

    The body may open with parameter-free modules (``Standardize``), applied to the inputs
    once; after them it must be Linear and ReLU modules only.
    """
    net = learner.net
    if not isinstance(net, MLP):
        return None
    prefix: list[nn.Module] = []
    linears: list[tuple[str, nn.Linear]] = []
    for i, module in enumerate(net.body):
        if isinstance(module, nn.Linear):
            linears.append((f"body.{i}", module))
        elif not linears and not any(True for _ in module.parameters()):
            prefix.append(module)
        elif not isinstance(module, nn.ReLU):
            return None
    linears.append(("head", net.head))
    layers = [
        _Layer(name, lin.in_features, lin.out_features, hidden=name != "head")
        for name, lin in linears
    ]
    fast = [layer for layer in layers if learner.is_fast(layer.name + ".weight")]
    return _MLPSpec(fast, prefix)


@dataclass(frozen=True)
class _Workspace:
    acts: list[Tensor]  # layer inputs a_l = [h_l | 1]: (B, K, in+1), the 1s written once
    zs: list[Tensor | None]  # pre-activations (B, K, out); None for one output unit
    belows: list[Tensor]  # d loss / d h_l: (B, K, in) (unused for l = 0)
    grads: list[Tensor | None]  # the clipped step's d loss / d V_l: (B, in+1, out)


class _MLPKernel:
    """Explicit batched forward/backward of the fast layers of a ReLU MLP.

    Layer l is stored as V_l = [W_l | b_l]^T, (B, in+1, out), and its input as
    a_l = [h_l | 1], (B, K, in+1), in a buffer whose last column stays 1, so a layer is
    one ``bmm`` forward (z = a @ V) and one for its weight gradient (a^T @ g), all
    contiguous. Degenerate shapes, slow as bmm's, take other forms: a layer of fan-in 1
    (the sinusoid's first) is a broadcast x * w + b, and one of fan-out 1 (its head) a
    row-vector product.
    """

    def __init__(self, learner: Learner, spec: _MLPSpec, params: Params, lrs: Params):
        self.learner = learner
        self.layers = spec.layers
        self.prefix = spec.prefix
        self.classify = learner.loss is cross_entropy_loss
        if not self.classify and learner.loss is not mse_loss:
            raise ValueError("the bmm path knows mse_loss and cross_entropy_loss only")
        self.init = [self._stored(params, layer) for layer in self.layers]  # (in+1, out)
        self.learned = learner.inner.learned_lr
        self.clip = learner.inner.grad_clip  # a global-norm bound on each client's gradient
        # learned rates laid out like V: (in+1, out), or (S, in+1, out) per step
        self.rates = [self._rate(lrs, lay) for lay in self.layers] if self.learned != "none" else []

    @staticmethod
    def _stored(params: Params, layer: _Layer) -> Tensor:
        w, b = params[layer.name + ".weight"], params[layer.name + ".bias"]
        return torch.cat([w, b[:, None]], dim=1).T.contiguous()  # (in+1, out)

    def _rate(self, lrs: Params, layer: _Layer) -> Tensor:
        rw, rb = lrs[layer.name + ".weight"], lrs[layer.name + ".bias"]
        if self.learned == "per_param":
            return torch.cat([rw, rb[:, None]], dim=1).T.contiguous()  # (in+1, out)
        steps = rw.shape[0]
        return torch.cat(  # (S, in+1, out)
            [
                rw[:, None, None].expand(steps, layer.fan_in, layer.fan_out),
                rb[:, None, None].expand(steps, 1, layer.fan_out),
            ],
            dim=1,
        )

    # -- pieces ------------------------------------------------------------------------------
    def features(self, frozen: Params, x: Tensor) -> Tensor:
        # x: (B, N, ...) -> what the first fast layer sees: (B, N, in)
        b, n = x.shape[:2]
        h = x.reshape(b * n, *x.shape[2:])
        if self.learner.inner.adapt == "head":
            h = self.learner.features(frozen, h)  # the whole frozen body
        else:
            for module in self.prefix:
                h = module(h)
        return h.reshape(b, n, -1)

    def workspace(self, h: Tensor) -> _Workspace:
        """The buffers one ``adapt`` call reuses at every step, a_0 = [h | 1] filled in.

        Big tensors are written in place (``out=``) rather than allocated each step:
        fresh multi-megabyte outputs page-fault, which costs more than the bmm's."""
        b, k = h.shape[:2]
        acts = [h.new_ones(b, k, layer.fan_in + 1) for layer in self.layers]
        acts[0][..., :-1] = h
        layers = self.layers
        return _Workspace(  # narrow (one-unit) outputs are small: no buffer
            acts=acts,
            zs=[h.new_empty(b, k, n.fan_out) if n.fan_out > 1 else None for n in layers],
            belows=[h.new_empty(b, k, n.fan_in) for n in layers],
            grads=[  # for the clipped step only
                h.new_empty(b, n.fan_in + 1, n.fan_out)
                if n.fan_out > 1 and self.clip is not None
                else None
                for n in layers
            ],
        )

    def forward(self, vs: list[Tensor], ws: _Workspace) -> tuple[Tensor, list[Tensor]]:
        """vs[l]: (B, in+1, out), or (in+1, out) shared by all clients (one big matmul);
        fills ws.acts[1:] -> output (B, K, O), pre-activations."""
        zs: list[Tensor] = []
        for i, (layer, v) in enumerate(zip(self.layers, vs, strict=True)):
            a, out = ws.acts[i], ws.zs[i]
            if out is None:  # one output unit: a row-vector product beats a column one
                if v.dim() == 2:
                    z = torch.matmul(a, v)  # (B, K, 1)
                else:
                    z = torch.bmm(v.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
            elif layer.fan_in == 1:  # x * w + b: a broadcast beats a bmm with inner size 2
                z = torch.addcmul(v[..., 1:, :], a[..., :1], v[..., :1, :], out=out)
            elif v.dim() == 2:  # the shared initialisation: one (B*K, in+1) matmul
                z = torch.matmul(a, v, out=out)  # (B, K, out)
            else:
                z = torch.bmm(a, v, out=out)  # (B, K, out)
            if layer.hidden:
                torch.clamp_min(z, 0.0, out=ws.acts[i + 1][..., :-1])  # relu into a_{l+1}
            zs.append(z)
        return zs[-1], zs

    def loss_grad(self, out: Tensor, target: Tensor, scale: Tensor) -> Tensor:
        # out: (B, K, O); target: (B, K, O), one-hot for classes; scale: (B, K, 1) = w / sum(w)
        if self.classify:
            return (out.softmax(-1) - target) * scale  # d loss_b / d out
        return (out - target) * scale  # scale already holds the 2 / O of the MSE

    def loss(self, out: Tensor, y: Tensor, w: Tensor) -> Tensor:
        # out: (B, K, O); y: (B, K, O) or (B, K) class indices; w: (B, K) -> (B,)
        if self.classify:
            per = -out.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
        else:
            per = ((out - y) ** 2).mean(-1)
        return (per * w).sum(1) / w.sum(1).clamp_min(1.0)

    def below(self, i: int, v: Tensor, g: Tensor, zs: list[Tensor], ws: _Workspace) -> Tensor:
        """d loss / d h_l (B, K, in) from g = d loss / d z_l, through the old W_l and the
        ReLU below it (relu(z) > 0 iff z > 0), into a reused buffer."""
        out = ws.belows[i]
        wt = v[:, :-1].transpose(1, 2)  # W_l: (B, out, in)
        if self.layers[i].fan_out == 1:
            torch.mul(g, wt, out=out)  # (B, K, 1) * (B, 1, in)
        else:
            torch.bmm(g, wt, out=out)
        return torch.ops.aten.threshold_backward.grad_input(out, zs[i - 1], 0.0, grad_input=out)

    def backward_step(
        self,
        vs: list[Tensor],
        ws: _Workspace,
        zs: list[Tensor],
        g: Tensor,
        rates: list[Rate],
    ) -> None:
        """One gradient step on every V_l, in place, from g = d loss / d out (B, K, O).

        Layer by layer from the top: the gradient passes below through the old W_l, then
        V_l -= rate * a_l^T @ g_l, fused into one ``baddbmm`` where the rate is a scalar
        or one per client (per-parameter rates need the gradient itself)."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer, a, v, rate = self.layers[i], ws.acts[i], vs[i], rates[i]
            below = self.below(i, v, g, zs, ws) if i > 0 else None  # before V_l changes
            at = a.transpose(1, 2)  # (B, in+1, K)
            if layer.fan_out == 1:  # (g^T a)^T: a baddbmm into one column is slow
                grad = torch.bmm(g.transpose(1, 2), a).transpose(1, 2)  # (B, in+1, 1)
                if isinstance(rate, Tensor):
                    v.addcmul_(rate, grad, value=-1.0)
                else:
                    v.add_(grad, alpha=-rate)
            elif not isinstance(rate, Tensor):
                v.baddbmm_(at, g, alpha=-rate)  # (B, in+1, out)
            elif rate.dim() == 0 or rate.shape[1:] == (1, 1):  # one rate, or one per client
                v.baddbmm_(at, g * rate, alpha=-1.0)
            else:  # per-parameter rates: (in+1, out), maybe times (B, 1, 1)
                v.addcmul_(rate, torch.bmm(at, g), value=-1.0)
            if below is not None:
                g = below

    def clipped_step(
        self,
        vs: list[Tensor],
        ws: _Workspace,
        zs: list[Tensor],
        g: Tensor,
        rates: list[Rate],
    ) -> None:
        """``backward_step`` with each client's gradient scaled to a global norm of at most
        ``grad_clip`` (as ``maml.clip_norm``), so every layer's norm comes before any update.

        A wide layer's norm comes from Gram matrices, ||a^T g||^2 = <a a^T, g g^T>, (B, K, K)
        for small K, and its update stays one fused ``baddbmm``; other layers materialise
        their gradient."""
        assert self.clip is not None
        gs: list[Tensor] = [g] * len(self.layers)  # d loss / d z_l, all at the old weights
        for i in range(len(self.layers) - 1, 0, -1):
            gs[i - 1] = self.below(i, vs[i], gs[i], zs, ws)
        grads: list[Tensor | None] = []
        squares: list[Tensor] = []  # (B,) per layer
        for layer, a, gl, rate, buf in zip(self.layers, ws.acts, gs, rates, ws.grads, strict=True):
            k = a.shape[1]
            per_param = isinstance(rate, Tensor) and rate.dim() > 0 and rate.shape[1:] != (1, 1)
            if layer.fan_out == 1:
                grad = torch.bmm(gl.transpose(1, 2), a).transpose(1, 2)  # (B, in+1, 1)
            elif per_param or buf is None or k * k > (layer.fan_in + 1) * layer.fan_out:
                grad = torch.bmm(a.transpose(1, 2), gl, out=buf)  # (B, in+1, out)
            else:
                gram_a = torch.bmm(a, a.transpose(1, 2))  # (B, K, K)
                gram_g = torch.bmm(gl, gl.transpose(1, 2))  # (B, K, K)
                squares.append((gram_a * gram_g).sum((1, 2)))
                grads.append(None)
                continue
            squares.append((grad * grad).sum((1, 2)))
            grads.append(grad)
        norm = torch.stack(squares).sum(0).sqrt()  # (B,)
        scale = torch.clamp(self.clip / (norm + 1e-12), max=1.0)[:, None, None]  # (B, 1, 1)
        for v, a, gl, maybe, rate in zip(vs, ws.acts, gs, grads, rates, strict=True):
            if maybe is None:
                v.baddbmm_(a.transpose(1, 2), gl * (scale * rate), alpha=-1.0)
            else:
                v.addcmul_(scale * rate, maybe, value=-1.0)

    def step_rate(self, i: int, step: int, lr: Rate | None) -> Rate:
        if lr is not None:
            return lr
        if self.learned == "per_param":
            return self.rates[i]
        if self.learned == "per_layer_per_step":
            rate = self.rates[i]
            return rate[min(step, rate.shape[0] - 1)]
        return self.learner.inner.lr

    # -- the inner loop ----------------------------------------------------------------------
    def adapt(
        self, frozen: Params, x: Tensor, y: Tensor, w: Tensor, steps: Tensor | int, lr: Rate | None
    ) -> AdaptResult:
        b = x.shape[0]
        ws = self.workspace(self.features(frozen, x))  # a_0 = [x | 1]: (B, K, in+1)
        scale = (w / w.sum(1, keepdim=True).clamp_min(1.0))[..., None]  # (B, K, 1)
        if not self.classify:
            scale = scale * (2.0 / y.shape[-1])
        vs = [v.expand(b, *v.shape).clone() for v in self.init]  # (B, in+1, out)
        target = F.one_hot(y, self.layers[-1].fan_out).to(x.dtype) if self.classify else y
        if isinstance(lr, Tensor):
            lr = lr.to(x.dtype)[:, None, None]  # (B, 1, 1)
        total = int(steps.max()) if isinstance(steps, Tensor) else steps
        loss_before: Tensor | None = None
        for step in range(total):
            out, zs = self.forward(self.init if step == 0 else vs, ws)
            if loss_before is None:
                loss_before = self.loss(out, y, w)
            rates = [self.step_rate(i, step, lr) for i in range(len(self.layers))]
            if isinstance(steps, Tensor):  # clients past their own step count step by 0
                live = (steps > step).to(x.dtype)[:, None, None]  # (B, 1, 1)
                rates = [rate * live for rate in rates]
            g = self.loss_grad(out, target, scale)  # (B, K, O)
            if self.clip is None:
                self.backward_step(vs, ws, zs, g, rates)
            else:
                self.clipped_step(vs, ws, zs, g, rates)
        out, _ = self.forward(vs, ws)
        loss_after = self.loss(out, y, w)
        return AdaptResult(
            self.split(vs), loss_after if loss_before is None else loss_before, loss_after
        )

    def split(self, vs: list[Tensor]) -> Params:
        """V stacks -> named (B, out, in) weights and (B, out) biases (views)."""
        fast: Params = {}
        for layer, v in zip(self.layers, vs, strict=True):
            fast[layer.name + ".weight"] = v[:, :-1].transpose(1, 2)
            fast[layer.name + ".bias"] = v[:, -1]
        return fast

    def predict(self, frozen: Params, fast: Params, x: Tensor) -> Tensor:
        # fast: (B, ...) per entry; x: (B, Q, ...) -> (B, Q, O)
        h = self.features(frozen, x)  # (B, Q, in)
        for layer in self.layers:
            weight, bias = fast[layer.name + ".weight"], fast[layer.name + ".bias"]
            h = torch.baddbmm(bias[:, None, :], h, weight.transpose(1, 2))  # (B, Q, out)
            if layer.hidden:
                h = h.relu_()
        return h


# -- the public entry point ------------------------------------------------------------------
class BatchedLearner:
    """A meta-model's learner and parameters, adapting and predicting B clients per call.

    ``path="auto"`` takes ``"bmm"`` for MLPs and ``"vmap"`` otherwise. Everything runs
    without autograd graphs (serving), on the device the parameters live on.
    """

    def __init__(self, learner: Learner, params: Params, lrs: Params, path: Path = "auto"):
        self.learner = learner
        self.params = params
        self.lrs = lrs
        self.frozen = learner.split(params)[1]
        spec = mlp_spec(learner) if path != "vmap" else None
        if path == "bmm" and spec is None:
            raise ValueError("the bmm path needs an MLP of Linear and ReLU layers")
        self.kernel = _MLPKernel(learner, spec, params, lrs) if spec is not None else None
        # head-only nets on the vmap path: the head's learner on precomputed body features
        self.head = learner.on_features() if learner.inner.adapt == "head" else None

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
            one_steps = steps if isinstance(steps, int) else _same(steps, "steps")
            one_lr = lr if lr is None or isinstance(lr, float | int) else _same(lr, "lr")
            return self._vmap_adapt(x, y, w, one_steps, one_lr)

    def _vmap_adapt(
        self, x: Tensor, y: Tensor, w: Tensor, steps: int, lr: float | None
    ) -> AdaptResult:
        if x.shape[0] == 1:  # a lone request: plain autograd beats torch.func and vmap here
            one = autograd_adapt(self.learner, self.params, self.lrs, x[0], y[0], w[0], steps, lr)
            fast = {n: t.unsqueeze(0) for n, t in one.fast.items()}
            return AdaptResult(fast, one.loss_before.reshape(1), one.loss_after.reshape(1))
        if self.head is not None:
            head = self.learner.split(self.params)[0]
            h = self._features(x, w)  # (B, K, D)
            return self.head.adapt_batch(head, self.lrs, h, y, w, steps=steps, lr=lr)
        return self.learner.adapt_batch(self.params, self.lrs, x, y, w, steps=steps, lr=lr)

    def _features(self, x: Tensor, w: Tensor | None = None) -> Tensor:
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
            if self.head is not None:
                h = self._features(x)  # (B, Q, D)
                if x.shape[0] == 1:
                    one = {n: t[0] for n, t in fast.items()}
                    return self.head.predict({}, one, h[0]).unsqueeze(0)
                return self.head.predict_batch({}, fast, h)
            if x.shape[0] == 1:
                one = {n: t[0] for n, t in fast.items()}
                return self.learner.predict(self.params, one, x[0]).unsqueeze(0)
            return self.learner.predict_batch(self.params, fast, x)


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
    the same update, two to four times faster for a lone request on the CPU."""
    fast, frozen = learner.split(params)
    with torch.no_grad():
        h = body_features(learner, frozen, x)
    fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
    loss_before: Tensor | None = None
    for step in range(steps):
        with torch.enable_grad():
            loss = learner.loss(learner.fast_forward(fast, frozen, h), y, w)
            grads = torch.autograd.grad(loss, list(fast.values()))
        if loss_before is None:
            loss_before = loss.detach()
        with torch.no_grad():
            if learner.inner.grad_clip is not None:
                grads = tuple(
                    clip_norm(dict(zip(fast, grads, strict=True)), learner.inner.grad_clip).values()
                )
            fast = {
                n: (p - learner.step_lr(lrs, n, step, lr) * g).requires_grad_()
                for (n, p), g in zip(fast.items(), grads, strict=True)
            }
    with torch.no_grad():
        loss_after = learner.loss(learner.fast_forward(fast, frozen, h), y, w)
    fast = {n: p.detach() for n, p in fast.items()}
    return AdaptResult(fast, loss_after if loss_before is None else loss_before, loss_after)


def _same(values: Sequence[T], what: str) -> T:
    if len(set(values)) != 1:
        raise ValueError(f"the vmap path takes one {what} per batch, got {sorted(set(values))}")
    return values[0]


# -- serialisation ---------------------------------------------------------------------------
class BytesPacker:
    """Stacked fast params -> one safetensors blob per client, in one copy; and back, to
    one flat (P,) tensor per client.

    Every client of a meta-model has the same names, shapes and dtypes, hence the same
    safetensors header; the packer takes it from ``to_bytes`` once and appends each
    client's raw little-endian data in the header's order. Byte-identical to ``to_bytes``.
    That data section, read back as one tensor, is the client's params flattened: the
    form the engine caches (one tensor, not a dict of them: a seventh of the objects for
    the garbage collector to scan, one allocation on the device).
    """

    def __init__(self, example: Params) -> None:
        blob = to_bytes(example)
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])
        header.pop("__metadata__", None)
        self.prefix = blob[: 8 + size]
        self.order = sorted(header, key=lambda n: header[n]["data_offsets"][0])
        self.shapes = {n: tuple(example[n].shape) for n in self.order}
        self.dtypes = {n: example[n].dtype for n in self.order}
        dtypes = set(self.dtypes.values())
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None  # flat form: one dtype only
        self.numel = sum(example[n].numel() for n in self.order)  # P
        self.nbytes = len(blob) - len(self.prefix)

    def unpack(self, blob: bytes) -> Tensor:
        """One client's safetensors -> its params flattened (P,) in this packer's order.
        Raises ValueError for params of other names, shapes or dtypes."""
        if self.dtype is None:
            raise ValueError("flat params need a single dtype")
        if len(blob) == len(self.prefix) + self.nbytes and blob.startswith(self.prefix):
            data = bytearray(memoryview(blob)[len(self.prefix) :])  # a writable copy
            return torch.frombuffer(data, dtype=self.dtype)
        params = from_bytes(blob)  # the same params under another header layout
        if {n: (tuple(t.shape), t.dtype) for n, t in params.items()} != {
            n: (self.shapes[n], self.dtypes[n]) for n in self.order
        }:
            raise ValueError("the params' names, shapes or dtypes differ")
        return torch.cat([params[n].reshape(-1) for n in self.order])

    def unflatten(self, flat: Tensor) -> Params:
        """(B, P) flat params -> (B, ...) per entry (views where the layout allows)."""
        out: Params = {}
        start = 0
        for name in self.order:
            size = math.prod(self.shapes[name])
            out[name] = flat[:, start : start + size].reshape(len(flat), *self.shapes[name])
            start += size
        return out

    def pack(self, fast: Params) -> list[bytes]:
        # fast: (B, ...) per entry -> B safetensors blobs
        size = fast[self.order[0]].shape[0]
        for name in self.order:
            if tuple(fast[name].shape[1:]) != self.shapes[name]:
                raise ValueError(
                    f"{name}: shape {tuple(fast[name].shape[1:])} != {self.shapes[name]}"
                )
        pieces = [fast[n].detach().reshape(size, -1) for n in self.order]
        if len({t.dtype for t in pieces}) == 1:
            rows = torch.cat(pieces, dim=1).view(torch.uint8)  # (B, nbytes), freshly laid out
        else:
            fresh = [t.new_empty(t.shape).copy_(t).view(torch.uint8) for t in pieces]
            rows = torch.cat(fresh, dim=1)
        data = rows.cpu().numpy()
        return [self.prefix + data[i].tobytes() for i in range(size)]
