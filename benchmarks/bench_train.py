"""Meta-training speed: tasks vmapped against a per-task Python loop, same run.

    python -m benchmarks.bench_train [--repeats 5] [--threads 1] [--device cpu|cuda]

Set-ups from issue 3: sinusoid (meta-batch 25, 5 inner steps, second order) and
Omniglot (20-way 1-shot, 5 queries per class, meta-batch 16, 5 inner steps, first
order, the whole Conv4 adapting; ``omniglot-anil``: the head alone, as served).
Timings don't depend on the data, so episodes are synthetic. Prints meta-iterations
per second (median over repeats) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from models.maml import Adapt, InnerLoopConfig, Learner, cross_entropy_loss, mse_loss
from models.nets import MLP, Conv4
from models.params import Params
from models.tasks import Episode, sinusoid
from models.train.loop import task_losses


def looped_losses(learner: Learner, params: Params, ep: Episode, create_graph: bool) -> Tensor:
    """The baseline: one task at a time, the way a per-task MAML loop is usually written."""
    losses = []
    for i in range(ep.xs.shape[0]):
        fast = learner.adapt(params, {}, ep.xs[i], ep.ys[i], ep.ws[i], create_graph=create_graph)
        pred = learner.predict(params, fast.fast, ep.xq[i])
        losses.append(learner.loss(pred, ep.yq[i], ep.wq[i]))
    return torch.stack(losses)


def its_per_s(
    step: Callable[[], None], seconds: float, repeats: int, device: torch.device
) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up
    sync()
    rates = []
    for _ in range(repeats):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            done += 1
        sync()
        rates.append(done / (time.perf_counter() - t0))
    return statistics.median(rates)


def meta_step(
    learner: Learner, params: Params, ep: Episode, second_order: bool, batched: bool
) -> None:
    if batched:
        losses = task_losses(learner, params, {}, ep, create_graph=second_order)
    else:
        losses = looped_losses(learner, params, ep, second_order)
    torch.autograd.grad(losses.mean(), list(params.values()))


def setup(name: str, device: torch.device) -> tuple[Learner, Params, Episode, bool]:
    g = torch.Generator().manual_seed(0)
    if name == "sinusoid":
        net = MLP(1, (40, 40), 1).to(device)
        learner = Learner(net, mse_loss, InnerLoopConfig(steps=5, lr=0.01))
        ep = sinusoid.sample(g, 25, 10, 10, 10).to(str(device))
        return learner, dict(net.named_parameters()), ep, True
    conv = Conv4(out_features=20).to(device)
    adapt: Adapt = "head" if name == "omniglot-anil" else "all"
    inner = InnerLoopConfig(steps=5, lr=0.4, first_order=True, adapt=adapt)
    learner = Learner(conv, cross_entropy_loss, inner)
    way, queries, tasks = 20, 5, 16
    labels = torch.arange(way)
    ep = Episode(
        xs=torch.rand(tasks, way, 1, 28, 28, generator=g),
        ys=labels.expand(tasks, way).clone(),
        ws=torch.ones(tasks, way),
        xq=torch.rand(tasks, way * queries, 1, 28, 28, generator=g),
        yq=labels.repeat(queries).expand(tasks, -1).clone(),
        wq=torch.ones(tasks, way * queries),
    ).to(str(device))
    return learner, dict(conv.named_parameters()), ep, False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--setups", nargs="+", default=["sinusoid", "omniglot", "omniglot-anil"])
    p.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {on}, {args.threads} intra-op thread(s), "
        f"median of {args.repeats} x {args.seconds}s"
    )
    print()
    print("| set-up        | per-task loop it/s | vmapped it/s | ratio |")
    print("|---------------|--------------------|--------------|-------|")
    for name in args.setups:
        learner, params, ep, second_order = setup(name, device)
        rates = [
            its_per_s(
                partial(meta_step, learner, params, ep, second_order, batched),
                args.seconds,
                args.repeats,
                device,
            )
            for batched in (False, True)
        ]
        loop, vmapped = rates
        print(f"| {name:<13} | {loop:>18.2f} | {vmapped:>12.2f} | {vmapped / loop:>4.1f}x |")


if __name__ == "__main__":
    main()
