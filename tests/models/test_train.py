"""Meta-training: deterministic, resumable, and data-parallel equal to one process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.checkpoint import MetaModel
from models.maml import InnerLoopConfig, Learner, mse_loss
from models.nets import MLP
from models.params import Params
from models.tasks import Episode, sinusoid
from models.train import state
from models.train.loop import (
    Diverged,
    MetaStage,
    MetaTrainConfig,
    Selection,
    Trainer,
    step_weights,
    task_losses,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def trainer(out: Path, iterations: int = 12) -> Trainer:
    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1)
    learner = Learner(net, mse_loss, InnerLoopConfig(steps=2, learned_lr="per_layer_per_step"))
    cfg = MetaTrainConfig(
        iterations=iterations,
        meta_batch=4,
        multi_step_loss=0.5,
        first_order_until=0.25,
        validate_every=1000,
    )

    def sample(g: torch.Generator) -> Episode:
        return sinusoid.sample(g, 4, 5, 10, 10)

    params: Params = dict(net.named_parameters())
    return Trainer([MetaStage(learner, params, cfg, sample)], out)


def stage(t: Trainer) -> MetaStage:
    (only,) = t.stages
    assert isinstance(only, MetaStage)
    return only


def weights(t: Trainer) -> Params:
    params, lrs = stage(t).detached()
    return params | {f"lr.{n}": v for n, v in lrs.items()}


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a, b = trainer(tmp_path / "a"), trainer(tmp_path / "b")
    a.run()
    b.run()
    for name, value in weights(a).items():
        assert torch.equal(value, weights(b)[name]), name


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = trainer(tmp_path / "straight")
    straight.run()
    first = trainer(tmp_path / "resumed")
    for _ in range(5):
        first.step()
    first.save_state()
    second = trainer(tmp_path / "resumed")
    second.run(resume=True)
    assert second.done == 12
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(second)[name], value, atol=0, rtol=0)


def test_multi_step_loss_weights_anneal_to_the_last_step() -> None:
    early = step_weights(5, 0.0, 0.5)
    assert early == pytest.approx([0.2] * 5)
    assert step_weights(5, 0.5, 0.5) == [0.0, 0.0, 0.0, 0.0, 1.0]
    middle = step_weights(5, 0.25, 0.5)
    assert abs(sum(middle) - 1.0) < 1e-9 and middle[-1] > middle[0] > 0


def run_cli(out: Path, *launcher: str) -> Params:
    flags = "--iterations 4 --meta-batch 4 --validate-every 4 --inner-steps 2 --seed 3 --device cpu"
    args = ["sinusoid", "--out", str(out), *flags.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, "-m", "models.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    meta = MetaModel.load(out)
    return meta.params | {f"lr.{n}": t for n, t in meta.lrs.items()}


def test_two_processes_equal_one(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    one = run_cli(tmp_path / "one", sys.executable)
    two = run_cli(tmp_path / "two", *torchrun)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-6, rtol=1e-5)


def test_ships_the_best_validated_weights(tmp_path: Path) -> None:
    scores = iter([3.0, 1.0, 2.0])  # validated at iterations 4, 8 and 12
    snapshots: list[Params] = []

    def validate(params: Params, lrs: Params) -> dict[str, float]:
        snapshots.append({n: t.clone() for n, t in params.items()})
        return {"val": next(scores)}

    plain = stage(trainer(tmp_path))
    selecting = MetaStage(
        plain.learner,
        plain.params,
        replace(plain.cfg, validate_every=4),
        plain.sample,
        validate=validate,
        selection=Selection("val"),
    )
    Trainer([selecting], tmp_path).run()
    best, _ = selecting.final()
    for name, value in snapshots[1].items():
        assert torch.equal(best[name], value)
    assert not torch.equal(best["head.weight"], selecting.detached()[0]["head.weight"])
    assert Selection("acc", maximize=True).better(0.9, 0.8)
    assert not Selection("mse").better(float("nan"), None)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path,
) -> None:
    """Issue 20: a run that went to NaN kept training on NaN and shipped NaN weights. It
    stops at the first non-finite meta-loss, before stepping on it; the checkpoint on disk
    is the last report's, finite, and no later one is written."""
    plain = stage(trainer(tmp_path))
    calls = 0

    def sample(g: torch.Generator) -> Episode:  # the 7th meta-batch holds a NaN target
        nonlocal calls
        calls += 1
        ep = plain.sample(g)
        if calls == 7:
            ep.ys[0, 0, 0] = float("nan")
        return ep

    meta = MetaStage(plain.learner, plain.params, replace(plain.cfg, validate_every=3), sample)
    with pytest.raises(Diverged) as stopped:
        Trainer([meta], tmp_path).run()
    assert (stopped.value.step, stopped.value.checkpoint) == (7, 6)
    assert "meta-loss is nan" in str(stopped.value)
    for name, value in meta.detached()[0].items():
        assert torch.isfinite(value).all(), name  # the weights were not stepped on it
    found = state.load(tmp_path)
    assert found is not None and found[1]["done"] == 6
    assert all(torch.isfinite(t).all() for t in found[0].values() if t.is_floating_point())


def test_a_non_finite_meta_gradient_stops_training_before_the_step(tmp_path: Path) -> None:
    """A finite loss whose meta-gradient is not (an overflow in the backward pass) would
    step the weights to NaN unseen and checkpoint them: it stops training too."""
    plain = stage(trainer(tmp_path))
    meta = MetaStage(plain.learner, plain.params, plain.cfg, plain.sample)
    before = {n: t.clone() for n, t in meta.detached()[0].items()}
    meta.params["head.bias"].register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(Diverged, match="meta-gradient is not finite") as stopped:
        Trainer([meta], tmp_path).run()
    assert (stopped.value.step, stopped.value.checkpoint) == (1, None)
    for name, value in meta.detached()[0].items():
        assert torch.equal(value, before[name]), name  # not stepped


def test_anil_runs_the_body_once_with_the_same_losses_and_gradients() -> None:
    torch.manual_seed(0)
    net = MLP(1, (40, 40), 1)
    learner = Learner(net, mse_loss, InnerLoopConfig(steps=3, lr=0.1, adapt="head"))
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    ep = sinusoid.sample(torch.Generator().manual_seed(1), 4, 3, 8, 6)
    hoisted = task_losses(learner, params, {}, ep, create_graph=True)
    looped = []
    for i in range(4):
        fast = learner.adapt(params, {}, ep.xs[i], ep.ys[i], ep.ws[i], create_graph=True).fast
        looped.append(mse_loss(learner.predict(params, fast, ep.xq[i]), ep.yq[i], ep.wq[i]))
    torch.testing.assert_close(hoisted, torch.stack(looped))
    ours = torch.autograd.grad(hoisted.sum(), list(params.values()))
    theirs = torch.autograd.grad(torch.stack(looped).sum(), list(params.values()))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("head_init", ["meta", "proto"])
def test_first_order_heads_take_the_batched_path_with_the_same_gradients(head_init: str) -> None:
    """ANIL's first-order meta-gradient through the hand-batched linear head equals the one
    through ``Learner.adapt``'s autograd loop (forced by a one-entry multi-step weight)."""
    from models.maml import cross_entropy_loss
    from models.nets import Residual

    torch.manual_seed(1)
    net = Residual(in_features=8, hidden=6, out_features=5, scale=2.0)
    inner = InnerLoopConfig(
        steps=3,
        lr=0.4,
        first_order=True,
        adapt="head",
        learned_lr="per_layer_per_step",
        grad_clip=0.5,
        head_init=head_init,  # type: ignore[arg-type]
    )
    learner = Learner(net, cross_entropy_loss, inner)
    g = torch.Generator().manual_seed(2)
    ys = torch.randint(0, 3, (4, 7), generator=g)
    ws = (torch.rand(4, 7, generator=g) > 0.2).float()
    ep = Episode(
        torch.randn(4, 7, 8, generator=g), ys, ws,
        torch.randn(4, 6, 8, generator=g), torch.randint(0, 3, (4, 6), generator=g),
        torch.ones(4, 6),
    )  # fmt: skip

    def gradients(weights: list[float] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
        lrs = {n: t.requires_grad_() for n, t in learner.init_lrs(params).items()}
        losses = task_losses(learner, params, lrs, ep, create_graph=False, weights=weights)
        leaves = [*params.values(), *lrs.values()]
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        return losses.detach(), [
            torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads, strict=True)
        ]

    fast_losses, fast_grads = gradients(None)
    loop_losses, loop_grads = gradients([1.0])
    torch.testing.assert_close(fast_losses, loop_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, loop_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
