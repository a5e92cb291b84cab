"""The hand-batched ReLU MLP: an explicit forward/backward with per-client weights stacked
on a batch dimension, no autograd.

For ``nets.MLP`` (MAML or ANIL, fixed or learned inner rates, clipped or not). Each Linear
layer carries its bias as an extra input row (``[W | b]^T`` against ``[h | 1]``), so a
layer is one ``bmm`` forward and two backward. It takes per-client step counts and rates
in one batch, and pays 2.7-5.6x over ``vmap`` on the sinusoid (README, benchmarks).

The maths is ``models.maml``'s: the batched loss and its output gradient
(``batched_loss``), the step-size rule (``step_rate``) and the clip (``clip_factor``);
this module only lays it out for ``bmm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.maml import AdaptResult, Learner, Rate, batched_loss, clip_factor, step_rate
from models.nets import MLP
from models.params import Params


@dataclass(frozen=True)
class _Layer:
    name: str  # parameter prefix, e.g. "body.0" or "head"
    fan_in: int
    fan_out: int
    hidden: bool  # a ReLU follows it


@dataclass(frozen=True)
class MLPLayout:
    layers: list[_Layer]  # the fast Linear layers, in order
    prefix: list[nn.Module]  # parameter-free modules before the first Linear (Standardize)


def mlp_layout(learner: Learner) -> MLPLayout | None:
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
    return MLPLayout(fast, prefix)


@dataclass(frozen=True)
class _Workspace:
    acts: list[Tensor]  # layer inputs a_l = [h_l | 1]: (B, K, in+1), the 1s written once
    zs: list[Tensor | None]  # pre-activations (B, K, out); None for one output unit
    belows: list[Tensor]  # d loss / d h_l: (B, K, in) (unused for l = 0)
    grads: list[Tensor | None]  # the clipped step's d loss / d V_l: (B, in+1, out)


class MLPKernel:
    """Explicit batched forward/backward of the fast layers of a ReLU MLP.

    Layer l is stored as V_l = [W_l | b_l]^T, (B, in+1, out), and its input as
    a_l = [h_l | 1], (B, K, in+1), in a buffer whose last column stays 1, so a layer is
    one ``bmm`` forward (z = a @ V) and one for its weight gradient (a^T @ g), all
    contiguous. Degenerate shapes, slow as bmm's, take other forms: a layer of fan-in 1
    (the sinusoid's first) is a broadcast x * w + b, and one of fan-out 1 (its head) a
    row-vector product.
    """

    def __init__(self, learner: Learner, layout: MLPLayout, params: Params, lrs: Params) -> None:
        self.learner = learner
        self.layers = layout.layers
        self.prefix = layout.prefix
        self.loss = batched_loss(learner.loss)  # maml's loss for B clients, and its gradient
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
        ``grad_clip`` (``maml.clip_factor``), so every layer's norm comes before any update.

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
        scale = clip_factor(squares, self.clip)[:, None, None]  # (B, 1, 1)
        for v, a, gl, maybe, rate in zip(vs, ws.acts, gs, grads, rates, strict=True):
            if maybe is None:
                v.baddbmm_(a.transpose(1, 2), gl * (scale * rate), alpha=-1.0)
            else:
                v.addcmul_(scale * rate, maybe, value=-1.0)

    def step_rate(self, i: int, step: int, lr: Rate | None) -> Rate:
        """Layer i's rate at ``step`` (``maml.step_rate``), laid out like V_l."""
        return step_rate(self.learner.inner, self.rates[i] if self.rates else None, step, lr)

    # -- the inner loop ----------------------------------------------------------------------
    def adapt(
        self, frozen: Params, x: Tensor, y: Tensor, w: Tensor, steps: Tensor | int, lr: Rate | None
    ) -> AdaptResult:
        b = x.shape[0]
        ws = self.workspace(self.features(frozen, x))  # a_0 = [x | 1]: (B, K, in+1)
        vs = [v.expand(b, *v.shape).clone() for v in self.init]  # (B, in+1, out)
        output_grad = self.loss.output_grad(y, w, self.layers[-1].fan_out)  # out -> (B, K, O)
        if isinstance(lr, Tensor):
            lr = lr.to(x.dtype)[:, None, None]  # (B, 1, 1)
        total = int(steps.max()) if isinstance(steps, Tensor) else steps
        loss_before: Tensor | None = None
        for step in range(total):
            out, zs = self.forward(self.init if step == 0 else vs, ws)
            if loss_before is None:
                loss_before = self.loss.loss(out, y, w)
            rates = [self.step_rate(i, step, lr) for i in range(len(self.layers))]
            if isinstance(steps, Tensor):  # clients past their own step count step by 0
                live = (steps > step).to(x.dtype)[:, None, None]  # (B, 1, 1)
                rates = [rate * live for rate in rates]
            g = output_grad(out)  # d loss / d out: (B, K, O)
            if self.clip is None:
                self.backward_step(vs, ws, zs, g, rates)
            else:
                self.clipped_step(vs, ws, zs, g, rates)
        out, _ = self.forward(vs, ws)
        loss_after = self.loss.loss(out, y, w)
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

    def names(self) -> list[str]:
        """The fast entries ``predict_one`` takes, in its order: weight, bias per layer."""
        return [f"{layer.name}.{kind}" for layer in self.layers for kind in ("weight", "bias")]

    def predict_one(self, frozen: Params, fast: Sequence[Tensor], x: Tensor) -> Tensor:
        """One client: fast = its entries in ``names()`` order; x (Q, ...) -> (Q, O).
        The same maths as ``predict`` with B = 1, as plain ``linear`` calls (no stacking,
        no autograd graph: neither params nor inputs require grad)."""
        h = x
        if self.learner.inner.adapt == "head":
            h = self.learner.features(frozen, h)  # the whole frozen body
        else:
            for module in self.prefix:
                h = module(h)
        if h.dim() != 2:
            h = h.reshape(len(h), -1)  # (Q, in)
        for i, layer in enumerate(self.layers):
            h = F.linear(h, fast[2 * i], fast[2 * i + 1])  # (Q, out)
            if layer.hidden:
                h = h.relu_()
        return h

    @property
    def plain(self) -> bool:
        """Every layer adapted and nothing before them: ``predict_numpy`` may serve."""
        return self.learner.inner.adapt != "head" and not self.prefix

    def predict_numpy(self, fast: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
        """``predict_one`` of a ``plain`` net in NumPy: x (Q, in) -> (Q, O). A NumPy
        operation on tiny arrays costs about a microsecond, a torch one several, and a
        small net's forward is a handful of them (the engine uses it for small nets on
        the CPU; tested equal to ``predict_one``)."""
        h = x
        for i, layer in enumerate(self.layers):
            h = h @ fast[2 * i].T  # (Q, out)
            h += fast[2 * i + 1]
            if layer.hidden:
                np.maximum(h, 0.0, out=h)
        return h

    def predict(self, frozen: Params, fast: Params, x: Tensor) -> Tensor:
        # fast: (B, ...) per entry; x: (B, Q, ...) -> (B, Q, O)
        h = self.features(frozen, x)  # (B, Q, in)
        for layer in self.layers:
            weight, bias = fast[layer.name + ".weight"], fast[layer.name + ".bias"]
            h = torch.baddbmm(bias[:, None, :], h, weight.transpose(1, 2))  # (B, Q, out)
            if layer.hidden:
                h = h.relu_()
        return h
