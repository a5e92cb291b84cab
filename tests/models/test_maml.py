"""The torch.func inner loop against an independent plain-autograd reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from models.maml import (
    BATCHED_LOSSES,
    InnerLoopConfig,
    Learner,
    batched_loss,
    clip_factor,
    clip_norm,
    cross_entropy_loss,
    mse_loss,
    rate_at,
    step_rate,
)
from models.nets import MLP
from models.params import Params

torch.set_num_threads(1)


def reference_forward(p: Params, x: Tensor) -> Tensor:
    """A 1-40-40-1 ReLU MLP written out by hand: no nn.Module, no torch.func."""
    h = torch.relu(x @ p["body.0.weight"].T + p["body.0.bias"])
    h = torch.relu(h @ p["body.2.weight"].T + p["body.2.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def reference_adapt(
    p: Params,
    x: Tensor,
    y: Tensor,
    lr_of: dict[str, list[float] | float],
    steps: int,
    names: list[str],
    create_graph: bool = False,
) -> Params:
    """learn2learn-style: torch.autograd.grad on the support MSE, one step at a time."""
    fast = dict(p)
    for step in range(steps):
        loss = ((reference_forward(fast, x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph)
        for n, g in zip(names, grads, strict=True):
            rate = lr_of[n]
            r = rate[min(step, len(rate) - 1)] if isinstance(rate, list) else rate
            fast[n] = fast[n] - r * g
    return fast


def make(dtype: torch.dtype = torch.float32, **inner: object) -> tuple[Learner, Params]:
    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1).to(dtype)
    learner = Learner(net, mse_loss, InnerLoopConfig(**inner))  # type: ignore[arg-type]
    return learner, {n: p.detach().clone() for n, p in net.named_parameters()}


def support(k: int = 10, seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(k, 1, generator=g, dtype=dtype) * 10 - 5
    y = 3.0 * torch.sin(x - 0.5)
    return x, y, torch.ones(k, dtype=dtype)


def leaves(p: Params) -> Params:
    return {n: t.clone().requires_grad_() for n, t in p.items()}


def test_adapt_matches_plain_autograd_loop() -> None:
    learner, params = make(steps=7, lr=0.02)
    x, y, w = support()
    ours = learner.adapt(params, {}, x, y, w)
    ref = reference_adapt(leaves(params), x, y, dict.fromkeys(params, 0.02), 7, list(params))
    for name in params:
        torch.testing.assert_close(ours.fast[name], ref[name].detach(), atol=1e-5, rtol=1e-5)
    assert ours.loss_after < ours.loss_before


def test_learned_per_layer_per_step_rates_match_reference() -> None:
    learner, params = make(steps=3, lr=0.01, learned_lr="per_layer_per_step")
    lrs = {n: torch.tensor([0.03, 0.01, 0.02]) * (i + 1) for i, n in enumerate(params)}
    x, y, w = support()
    ours = learner.adapt(params, lrs, x, y, w, steps=5)  # past the trained steps: last rate
    ref_rates: dict[str, list[float] | float] = {n: r.tolist() for n, r in lrs.items()}
    ref = reference_adapt(leaves(params), x, y, ref_rates, 5, list(params))
    for name in params:
        torch.testing.assert_close(ours.fast[name], ref[name].detach(), atol=1e-5, rtol=1e-5)


def test_meta_sgd_per_parameter_rates() -> None:
    learner, params = make(steps=2, learned_lr="per_param")
    g = torch.Generator().manual_seed(3)
    lrs = {n: torch.rand(p.shape, generator=g) * 0.05 for n, p in params.items()}
    x, y, w = support()
    ours = learner.adapt(params, lrs, x, y, w)
    fast = leaves(params)
    for _ in range(2):
        loss = ((reference_forward(fast, x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {n: t - lrs[n] * gr for (n, t), gr in zip(fast.items(), grads, strict=True)}
    for name in params:
        torch.testing.assert_close(ours.fast[name], fast[name].detach(), atol=1e-5, rtol=1e-5)


def test_head_only_adaptation_freezes_the_body() -> None:
    learner, params = make(steps=4, lr=0.05, adapt="head")
    x, y, w = support()
    ours = learner.adapt(params, {}, x, y, w)
    assert set(ours.fast) == {"head.weight", "head.bias"}
    ref = reference_adapt(
        leaves(params), x, y, dict.fromkeys(params, 0.05), 4, ["head.weight", "head.bias"]
    )
    for name in ours.fast:
        torch.testing.assert_close(ours.fast[name], ref[name].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        learner.predict(params, ours.fast, x),
        reference_forward({n: t.detach() for n, t in ref.items()}, x),
    )


def test_padding_is_masked_in_a_batch() -> None:
    learner, params = make(steps=5, lr=0.02)
    sets = [support(k, seed=k) for k in (3, 10, 6)]
    xs = torch.zeros(3, 10, 1)
    ys = torch.full((3, 10, 1), 99.0)  # garbage on padding must not matter
    ws = torch.zeros(3, 10)
    for i, (x, y, w) in enumerate(sets):
        xs[i, : len(x)], ys[i, : len(x)], ws[i, : len(x)] = x, y, w
    batched = learner.adapt_batch(params, {}, xs, ys, ws)
    for i, (x, y, w) in enumerate(sets):
        alone = learner.adapt(params, {}, x, y, w)
        for name in params:
            torch.testing.assert_close(
                batched.fast[name][i], alone.fast[name], atol=1e-5, rtol=1e-5
            )
        torch.testing.assert_close(batched.loss_after[i], alone.loss_after)


def meta_objective(learner: Learner, params: Params, create_graph: bool) -> Tensor:
    x, y, w = support(5, seed=2, dtype=torch.float64)
    xq, yq, wq = support(20, seed=3, dtype=torch.float64)
    fast = learner.adapt(params, {}, x, y, w, create_graph=create_graph).fast
    return learner.loss(learner.predict(params, fast, xq), yq, wq)


def test_second_order_meta_gradient_matches_finite_differences() -> None:
    learner, params = make(torch.float64, steps=3, lr=0.05)
    theta = leaves(params)
    analytic = torch.autograd.grad(meta_objective(learner, theta, True), list(theta.values()))
    g = torch.Generator().manual_seed(7)
    direction = {
        n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()
    }
    eps = 1e-6
    plus = {n: p + eps * direction[n] for n, p in params.items()}
    minus = {n: p - eps * direction[n] for n, p in params.items()}
    numeric = (meta_objective(learner, plus, False) - meta_objective(learner, minus, False)) / (
        2 * eps
    )
    along = sum((a * direction[n]).sum() for n, a in zip(params, analytic, strict=True))
    torch.testing.assert_close(along, numeric, atol=1e-6, rtol=1e-6)
    # first-order MAML drops exactly the second-order terms: it must differ here
    first = torch.autograd.grad(meta_objective(learner, theta, False), list(theta.values()))
    along_first = sum((a * direction[n]).sum() for n, a in zip(params, first, strict=True))
    assert abs(float(along_first - numeric)) > 1e-4


def test_cross_entropy_masks_padding() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0], [9.0, -9.0]])
    target = torch.tensor([0, 1, 1])
    masked = cross_entropy_loss(logits, target, torch.tensor([1.0, 1.0, 0.0]))
    alone = cross_entropy_loss(logits[:2], target[:2], torch.ones(2))
    torch.testing.assert_close(masked, alone)


@pytest.mark.parametrize("steps", [0, 1])
def test_zero_and_one_step(steps: int) -> None:
    learner, params = make(steps=steps, lr=0.02)
    x, y, w = support()
    out = learner.adapt(params, {}, x, y, w)
    if steps == 0:
        for name in params:
            assert torch.equal(out.fast[name], params[name])
        torch.testing.assert_close(out.loss_before, out.loss_after)


def test_inner_gradient_clipping_bounds_each_step() -> None:
    learner, params = make(steps=3, lr=0.02, grad_clip=0.5)
    x, y, w = support()
    ours = learner.adapt(params, {}, x, y, w)
    fast = leaves(params)
    for _ in range(3):
        loss = ((reference_forward(fast, x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, list(fast.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, 0.5 / float(norm))
        fast = {n: t - 0.02 * scale * g for (n, t), g in zip(fast.items(), grads, strict=True)}
    for name in params:
        torch.testing.assert_close(ours.fast[name], fast[name].detach(), atol=1e-5, rtol=1e-5)


def batch_of_tasks(loss: object, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Three clients' outputs (B, K, O), targets and padding weights (B, K), float64."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    if loss is cross_entropy_loss:
        target = torch.randint(0, 4, (3, 6), generator=g)
    else:
        target = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    w = torch.ones(3, 6, dtype=torch.float64)
    w[0, 2:] = 0.0  # padding
    w[2, 1:] = 0.0
    return out, target, w


@pytest.mark.parametrize("loss", list(BATCHED_LOSSES), ids=lambda f: f.__name__)
def test_a_batched_loss_is_its_per_task_loss_per_client(loss: object) -> None:
    out, target, w = batch_of_tasks(loss)
    batched = batched_loss(loss)  # type: ignore[arg-type]
    got = batched.loss(out, target, w)  # (B,)
    assert got.shape == (3,)
    for i in range(3):
        real = w[i] > 0  # the client alone: its real rows only
        alone = loss(out[i][real], target[i][real], w[i][real])  # type: ignore[operator]
        torch.testing.assert_close(got[i], alone)


@pytest.mark.parametrize("loss", list(BATCHED_LOSSES), ids=lambda f: f.__name__)
def test_a_batched_output_gradient_is_autograds(loss: object) -> None:
    out, target, w = batch_of_tasks(loss, seed=1)
    batched = batched_loss(loss)  # type: ignore[arg-type]
    leaf = out.clone().requires_grad_()
    (expected,) = torch.autograd.grad(batched.loss(leaf, target, w).sum(), leaf)
    torch.testing.assert_close(batched.output_grad(target, w, out.shape[-1])(out), expected)


def test_a_loss_without_a_batched_form_is_refused() -> None:
    def l1(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        return ((pred - target).abs().mean(-1) * weight).sum()

    with pytest.raises(ValueError, match="l1 has no batched form"):
        batched_loss(l1)


def test_rates_past_the_learned_steps_stay_at_the_last_one() -> None:
    rates = torch.tensor([0.3, 0.2, 0.1])
    assert [float(rate_at(rates, s)) for s in range(5)] == pytest.approx([0.3, 0.2, 0.1, 0.1, 0.1])
    per_step = InnerLoopConfig(steps=3, lr=0.5, learned_lr="per_layer_per_step")
    assert float(step_rate(per_step, rates, 7, None)) == pytest.approx(0.1)
    assert step_rate(per_step, rates, 0, 0.05) == 0.05  # an explicit rate overrides
    per_param = InnerLoopConfig(learned_lr="per_param")
    assert step_rate(per_param, rates, 4, None) is rates
    assert step_rate(InnerLoopConfig(lr=0.5), None, 9, None) == 0.5
    with pytest.raises(ValueError, match="needs the learned rates"):
        step_rate(per_param, None, 0, None)


def test_clip_factor_bounds_the_global_norm_per_client() -> None:
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5
    torch.testing.assert_close(
        clip_factor([(g * g).sum() for g in grads.values()], 1.0), torch.tensor(0.2)
    )
    clipped = clip_norm(grads, 1.0)
    norm = torch.sqrt(sum((g * g).sum() for g in clipped.values()))
    torch.testing.assert_close(norm, torch.tensor(1.0))
    # per client: squared sums (B,) per tensor; a short gradient is left as it is
    squares = [torch.tensor([9.0, 0.01]), torch.tensor([16.0, 0.0])]
    torch.testing.assert_close(clip_factor(squares, 1.0), torch.tensor([0.2, 1.0]))
