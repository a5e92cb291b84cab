"""Batched adaptation and prediction against ``Learner.adapt`` / ``Learner.predict`` alone.

Whatever a client is batched with (other support sizes, padding, other step counts and
rates on the bmm path), its adapted parameters and losses equal those of its request
run on its own, to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from models.kernels import (
    CPU_BODY_ROWS,
    BatchedLearner,
    autograd_adapt,
    pad_batch,
    stack,
    unstack,
)
from models.maml import (
    AdaptResult,
    InnerLoopConfig,
    LearnedLr,
    Learner,
    cross_entropy_loss,
    mse_loss,
)
from models.nets import MLP, Conv4
from models.params import Params

torch.set_num_threads(1)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


RATES: list[LearnedLr] = ["none", "per_param", "per_layer_per_step"]


def make_learner(
    *,
    adapt: str = "all",
    learned_lr: LearnedLr = "none",
    net: nn.Module | None = None,
    grad_clip: float | None = None,
) -> tuple[Learner, Params, Params]:
    torch.manual_seed(0)
    net = MLP() if net is None else net
    inner = InnerLoopConfig(
        steps=5,
        lr=0.02,
        adapt=adapt,  # type: ignore[arg-type]
        learned_lr=learned_lr,
        grad_clip=grad_clip,
    )
    learner = Learner(net, mse_loss, inner)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    # learned rates that differ per entry, as after meta-training
    lrs = {n: t * (0.5 + torch.rand_like(t)) for n, t in learner.init_lrs(params).items()}
    return learner, params, lrs


def sinusoids(sizes: list[int], seed: int = 1) -> tuple[list[Tensor], list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(k, 1, generator=g) * 10 - 5 for k in sizes]
    amps = [float(torch.rand(1, generator=g)) * 4.9 + 0.1 for _ in sizes]
    return xs, [a * torch.sin(x - 1.0) for a, x in zip(amps, xs, strict=True)]


def alone(
    learner: Learner,
    params: Params,
    lrs: Params,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float | None,
) -> AdaptResult:
    with torch.no_grad():
        w = torch.ones(x.shape[0])
        return learner.adapt(params, lrs, x, y, w, steps=steps, lr=lr)


def assert_same_client(batched: AdaptResult, i: int, single: AdaptResult) -> None:
    assert set(batched.fast) == set(single.fast)
    for name, tensor in single.fast.items():
        close(batched.fast[name][i], tensor)
    close(batched.loss_before[i], single.loss_before)
    close(batched.loss_after[i], single.loss_after)


@pytest.mark.parametrize("path", ["bmm", "vmap"])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("learned_lr", RATES)
def test_each_client_of_a_padded_batch_adapts_as_if_alone(
    path: str, adapt: str, learned_lr: LearnedLr
) -> None:
    learner, params, lrs = make_learner(adapt=adapt, learned_lr=learned_lr)
    sizes = [1, 5, 10, 20, 3]
    xs, ys = sinusoids(sizes)
    x, y, w = pad_batch(xs, ys)
    batch = BatchedLearner(learner, params, lrs, path=path)  # type: ignore[arg-type]
    assert batch.path == path
    result = batch.adapt(x, y, w, steps=7)
    for i in range(len(sizes)):
        assert_same_client(result, i, alone(learner, params, lrs, xs[i], ys[i], 7, None))
    # an explicit rate overrides learned ones, as in Learner.adapt
    result = batch.adapt(x, y, w, steps=3, lr=0.05)
    for i in range(len(sizes)):
        assert_same_client(result, i, alone(learner, params, lrs, xs[i], ys[i], 3, 0.05))


@pytest.mark.parametrize("learned_lr", RATES)
def test_bmm_takes_a_step_count_and_a_rate_per_client(learned_lr: LearnedLr) -> None:
    learner, params, lrs = make_learner(learned_lr=learned_lr)
    sizes = [4, 10, 7, 2]
    steps = [0, 10, 3, 6]  # 10 > the 5 trained per-step rates: the last rate repeats
    rates = [0.01, 0.03, 0.002, 0.02]
    xs, ys = sinusoids(sizes)
    x, y, w = pad_batch(xs, ys)
    batch = BatchedLearner(learner, params, lrs, path="bmm")
    assert batch.mixed
    result = batch.adapt(x, y, w, steps=steps, lr=rates)
    for i in range(len(sizes)):
        single = alone(learner, params, lrs, xs[i], ys[i], steps[i], rates[i])
        assert_same_client(result, i, single)
    result = batch.adapt(x, y, w, steps=steps)  # the meta-model's own rates, per client steps
    for i in range(len(sizes)):
        assert_same_client(result, i, alone(learner, params, lrs, xs[i], ys[i], steps[i], None))


@pytest.mark.parametrize("path", ["bmm", "vmap"])
def test_a_client_gets_the_same_params_whatever_it_is_batched_with(path: str) -> None:
    learner, params, lrs = make_learner(learned_lr="per_param")
    batch = BatchedLearner(learner, params, lrs, path=path)  # type: ignore[arg-type]
    xs, ys = sinusoids([10])
    companions = [[], [3], [20, 1, 7], [10] * 63]
    results = []
    for extra in companions:
        cx, cy = sinusoids(extra, seed=len(extra) + 2)
        x, y, w = pad_batch(cx + xs, cy + ys)  # the client last, after the others
        out = batch.adapt(x, y, w, steps=10)
        results.append({n: t[-1] for n, t in out.fast.items()})
    for other in results[1:]:
        for name, tensor in results[0].items():
            close(other[name], tensor)


@pytest.mark.parametrize("path", ["bmm", "vmap"])
@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("learned_lr", RATES)
def test_gradient_clipping_per_client(path: str, adapt: str, learned_lr: LearnedLr) -> None:
    learner, params, lrs = make_learner(adapt=adapt, learned_lr=learned_lr, grad_clip=0.5)
    sizes = [3, 10, 1, 20]
    steps = [6, 6, 6, 6] if path == "vmap" else [6, 2, 0, 9]
    xs, ys = sinusoids(sizes)
    x, y, w = pad_batch(xs, ys)
    batch = BatchedLearner(learner, params, lrs, path=path)  # type: ignore[arg-type]
    result = batch.adapt(x, y, w, steps=steps)
    unclipped = BatchedLearner(make_learner(adapt=adapt, learned_lr=learned_lr)[0], params, lrs)
    free = unclipped.adapt(x, y, w, steps=steps)
    assert not torch.allclose(result.loss_after, free.loss_after)  # the clip bites
    for i in range(len(sizes)):
        assert_same_client(result, i, alone(learner, params, lrs, xs[i], ys[i], steps[i], None))


def test_a_lone_request_takes_plain_autograd_and_matches() -> None:
    for learned_lr, clip in [*((r, None) for r in RATES), ("per_param", 0.5)]:
        learner, params, lrs = make_learner(learned_lr=learned_lr, grad_clip=clip)
        (x,), (y,) = sinusoids([8])
        fast = autograd_adapt(learner, params, lrs, x, y, torch.ones(8), 6, None)
        single = alone(learner, params, lrs, x, y, 6, None)
        for name, tensor in single.fast.items():
            close(fast.fast[name], tensor)
        batched = BatchedLearner(learner, params, lrs, path="vmap").adapt(
            x[None], y[None], torch.ones(1, 8), steps=6
        )
        assert_same_client(batched, 0, single)


def test_the_vmap_path_refuses_mixed_steps() -> None:
    learner, params, lrs = make_learner()
    xs, ys = sinusoids([3, 4])
    x, y, w = pad_batch(xs, ys)
    batch = BatchedLearner(learner, params, lrs, path="vmap")
    assert not batch.mixed
    with pytest.raises(ValueError, match="one steps per batch"):
        batch.adapt(x, y, w, steps=[1, 2])


@pytest.mark.parametrize("path", ["bmm", "vmap"])
def test_classification_with_cross_entropy(path: str) -> None:
    torch.manual_seed(0)
    net = MLP(in_features=4, hidden=(16,), out_features=5)
    learner = Learner(net, cross_entropy_loss, InnerLoopConfig(steps=4, lr=0.3))
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    sizes = [5, 10, 2]
    xs = [torch.randn(k, 4) for k in sizes]
    ys = [torch.randint(0, 5, (k,)) for k in sizes]
    x, y, w = pad_batch(xs, ys)
    assert y.dtype == torch.long and y.shape == (3, 10)
    result = BatchedLearner(learner, params, {}, path=path).adapt(x, y, w)  # type: ignore[arg-type]
    for i in range(len(sizes)):
        assert_same_client(result, i, alone(learner, params, {}, xs[i], ys[i], 4, None))


def test_a_standardized_mlp_takes_the_bmm_path() -> None:
    net = MLP(in_features=3, standardize=([1.0, -2.0, 0.5], [2.0, 0.5, 3.0]))
    learner, params, lrs = make_learner(net=net)
    batch = BatchedLearner(learner, params, lrs)
    assert batch.path == "bmm"
    xs = [torch.randn(k, 3) * 3 for k in (6, 2)]
    ys = [x.sum(1, keepdim=True) for x in xs]
    x, y, w = pad_batch(xs, ys)
    result = batch.adapt(x, y, w)
    for i in range(2):
        assert_same_client(result, i, alone(learner, params, lrs, xs[i], ys[i], 5, None))
    queries = torch.randn(2, 4, 3)
    out = batch.predict(result.fast, queries)
    for i, fast in enumerate(unstack(result.fast)):
        close(out[i], learner.predict(params, fast, queries[i]))


@pytest.mark.parametrize("learned_lr", RATES)
def test_a_conv_net_takes_the_vmap_path_head_only(learned_lr: LearnedLr) -> None:
    net = Conv4(channels=4, blocks=2, groups=2, image_size=8, out_features=3)
    torch.manual_seed(0)
    inner = InnerLoopConfig(steps=3, lr=0.5, adapt="head", learned_lr=learned_lr)
    learner = Learner(net, cross_entropy_loss, inner)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    lrs = {n: t * (0.5 + torch.rand_like(t)) for n, t in learner.init_lrs(params).items()}
    batch = BatchedLearner(learner, params, lrs)
    assert batch.path == "vmap"
    xs = [torch.randn(k, 1, 8, 8) for k in (3, 6, 1)]
    ys = [torch.randint(0, 3, (k,)) for k in (3, 6, 1)]
    x, y, w = pad_batch(xs, ys)
    result = batch.adapt(x, y, w)
    assert set(result.fast) == {"head.weight", "head.bias"}
    for i in range(3):
        assert_same_client(result, i, alone(learner, params, lrs, xs[i], ys[i], 3, None))
    queries = torch.randn(3, 5, 1, 8, 8)
    out = batch.predict(result.fast, queries)  # (B, Q, 3)
    for i, fast in enumerate(unstack(result.fast)):
        close(out[i], learner.predict(params, fast, queries[i]))


def test_a_body_run_in_chunks_on_the_cpu_gives_the_same_clients() -> None:
    """Support sets longer than ``CPU_BODY_ROWS`` go through the body in chunks, alone
    (plain autograd) and batched; the heads and predictions are those of one call."""
    net = Conv4(channels=4, blocks=2, groups=2, image_size=8, out_features=3)
    torch.manual_seed(0)
    learner = Learner(net, cross_entropy_loss, InnerLoopConfig(steps=2, lr=0.5, adapt="head"))
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    sizes = (CPU_BODY_ROWS + 9, 3)
    xs = [torch.randn(k, 1, 8, 8) for k in sizes]
    ys = [torch.randint(0, 3, (k,)) for k in sizes]
    batch = BatchedLearner(learner, params, {})
    x, y, w = pad_batch(xs, ys)
    both = batch.adapt(x, y, w)
    lone = batch.adapt(x[:1], y[:1], w[:1])
    for i in range(2):
        assert_same_client(both, i, alone(learner, params, {}, xs[i], ys[i], 2, None))
    assert_same_client(lone, 0, alone(learner, params, {}, xs[0], ys[0], 2, None))
    queries = torch.randn(1, 2 * CPU_BODY_ROWS, 1, 8, 8)
    close(
        batch.predict(lone.fast, queries)[0],
        learner.predict(params, unstack(lone.fast)[0], queries[0]),
    )


def test_padding_rows_never_reach_the_body_of_a_head_only_net() -> None:
    """The body runs on the real rows alone: whatever the padding holds (here NaN), each
    client's head is the one it gets alone."""
    net = Conv4(channels=4, blocks=2, groups=2, image_size=8, out_features=3)
    torch.manual_seed(0)
    learner = Learner(net, cross_entropy_loss, InnerLoopConfig(steps=2, lr=0.5, adapt="head"))
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    xs = [torch.randn(k, 1, 8, 8) for k in (2, 5)]
    ys = [torch.randint(0, 3, (k,)) for k in (2, 5)]
    x, y, w = pad_batch(xs, ys)
    x[0, 2:] = float("nan")  # client 0's padding
    result = BatchedLearner(learner, params, {}).adapt(x, y, w)
    for i in range(2):
        assert_same_client(result, i, alone(learner, params, {}, xs[i], ys[i], 2, None))


@pytest.mark.parametrize("path", ["bmm", "vmap"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_batched_predictions_equal_single_ones(path: str, adapt: str) -> None:
    learner, params, lrs = make_learner(adapt=adapt)
    batch = BatchedLearner(learner, params, lrs, path=path)  # type: ignore[arg-type]
    xs, ys = sinusoids([5, 9, 2])
    x, y, w = pad_batch(xs, ys)
    fast = batch.adapt(x, y, w, steps=4).fast
    queries = torch.linspace(-5, 5, 3 * 11).reshape(3, 11, 1)
    out = batch.predict(fast, queries)  # (B, Q, O)
    assert out.shape == (3, 11, 1)
    for i, one in enumerate(unstack(fast)):
        close(out[i], learner.predict(params, one, queries[i]))
    lone = batch.predict(stack(unstack(fast)[1:2]), queries[1:2])  # a batch of one
    close(lone[0], out[1])


def test_pad_batch_weights_mark_the_real_rows() -> None:
    x, y, w = pad_batch([torch.ones(2, 1), torch.ones(4, 1)], [torch.ones(2, 1)] * 2)
    assert x.shape == (2, 4, 1) and y.shape == (2, 2, 1)
    assert w.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert x[0, 2:].abs().sum() == 0


def test_losses_are_finite_and_decrease_on_a_batch() -> None:
    learner, params, lrs = make_learner()
    xs, ys = sinusoids([10] * 16)
    x, y, w = pad_batch(xs, ys)
    result = BatchedLearner(learner, params, lrs).adapt(x, y, w, steps=20)
    assert all(math.isfinite(v) for v in result.loss_after.tolist())
    assert float(result.loss_after.mean()) < float(result.loss_before.mean())
