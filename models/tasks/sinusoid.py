"""The sinusoid regression family of Finn et al. 2017: y = A sin(x - phase).

Amplitude ~ U[0.1, 5.0], phase ~ U[0, pi], x ~ U[-5, 5]. Support sets have between
``min_shots`` and ``max_shots`` points (padding is masked by the weights), so one
meta-model serves any K in that range.

The recipe: a 1-40-40-1 MLP, MAML through the served inner loop (``MetaStage``), the
weights with the best validation MSE at K=5 shipped. The meta-test: query MSE on fresh
sinusoids for each K, with a 95% confidence interval over tasks.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models import nets
from models.checkpoint import ArtifactConfig, MetaModel, TrainedFor
from models.evaluate import ARTIFACTS, load_artifact, mean_ci95
from models.maml import LOSSES, InnerLoopConfig, Learner
from models.params import Params
from models.tasks import Episode, Family
from models.train import options
from models.train.loop import MetaStage, MetaTrainConfig, Selection, Trainer, init_distributed

NAME = "sinusoid"

INPUT_SHAPE = (1,)
OUTPUT = "y = A sin(x - phase), one float per input"


@dataclass(frozen=True)
class SinusoidConfig:
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def sample(
    g: torch.Generator,
    tasks: int,
    min_shots: int,
    max_shots: int,
    queries: int,
    cfg: SinusoidConfig = SinusoidConfig(),
) -> Episode:
    """``tasks`` sinusoids, each with a support set of K ~ U{min_shots..max_shots} points."""
    amp = _uniform(g, (tasks, 1, 1), *cfg.amplitude)
    phase = _uniform(g, (tasks, 1, 1), *cfg.phase)
    xs = _uniform(g, (tasks, max_shots, 1), *cfg.x_range)  # (B, K, 1)
    xq = _uniform(g, (tasks, queries, 1), *cfg.x_range)  # (B, Q, 1)
    shots = torch.randint(min_shots, max_shots + 1, (tasks, 1), generator=g)
    ws = (torch.arange(max_shots).unsqueeze(0) < shots).float()  # (B, K)
    return Episode(
        xs=xs,
        ys=amp * torch.sin(xs - phase),
        ws=ws,
        xq=xq,
        yq=amp * torch.sin(xq - phase),
        wq=torch.ones(tasks, queries),
    )


# -- meta-training ----------------------------------------------------------------------------
ARCHITECTURE: dict[str, Any] = {
    "kind": "mlp",
    "in_features": 1,
    "hidden": [40, 40],
    "out_features": 1,
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    options.add_multi_step_loss(p, FAMILY.meta_defaults)
    p.add_argument("--min-shots", type=int, default=5, help="fewest support points per task")
    p.add_argument("--max-shots", type=int, default=20, help="most support points per task")
    p.add_argument("--queries", type=int, default=20, help="query points per task")


def train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    cfg = options.meta_config(args)
    device = options.device(args)
    rank = init_distributed(device)
    torch.manual_seed(cfg.seed)
    net = nets.build(ARCHITECTURE)
    inner = options.inner_config(args)
    config = ArtifactConfig(
        name=NAME,
        family=NAME,
        architecture=ARCHITECTURE,
        task={
            "kind": "regression",
            "input_shape": list(INPUT_SHAPE),
            "output": OUTPUT,
            "shots": [args.min_shots, args.max_shots],
        },
        inner=inner,
        training={"command": options.command(FAMILY, argv), "config": asdict(cfg)},
        trained_for=TrainedFor.of(inner, support=(args.min_shots, args.max_shots)),
    )
    learner = Learner(net, LOSSES[config.kind], inner)
    params: Params = dict(net.named_parameters())

    def episodes(g: torch.Generator) -> Episode:
        return sample(g, cfg.meta_batch, args.min_shots, args.max_shots, args.queries)

    def validate(params: Params, lrs: Params) -> dict[str, float]:
        probe = MetaModel(config, params, lrs, version="")
        return {"val-mse@5": query_mse(probe, shots=5, tasks=500, seed=10_000)[0]}

    stage = MetaStage(
        learner,
        params,
        cfg,
        episodes,
        device=device,
        rank=rank,
        validate=validate if rank.main else None,
        selection=Selection("val-mse@5"),
    )
    trainer = Trainer([stage], args.out, rank=rank)
    options.run_and_save(trainer, lambda: (config, *stage.final()), args.out, resume=args.resume)


# -- meta-test --------------------------------------------------------------------------------
def query_mse(
    meta: MetaModel,
    *,
    shots: int,
    tasks: int = 600,
    queries: int = 100,
    seed: int = 0,
    chunk: int = 200,
) -> tuple[float, float]:
    """Query MSE after the default adaptation on ``tasks`` fresh sinusoids with K=shots:
    the mean and its 95% half-width."""
    g = torch.Generator().manual_seed(seed)
    errors: list[Tensor] = []
    learner = meta.learner
    device = next(iter(meta.params.values())).device
    for start in range(0, tasks, chunk):
        ep = sample(g, min(chunk, tasks - start), shots, shots, queries).to(device)
        with torch.no_grad():
            fast = learner.adapt_batch(meta.params, meta.lrs, ep.xs, ep.ys, ep.ws).fast
            pred = learner.predict_batch(meta.params, fast, ep.xq)  # (B, Q, 1)
        errors.append(((pred - ep.yq) ** 2).mean(dim=(1, 2)).cpu())
    return mean_ci95(torch.cat(errors))


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", type=Path, default=ARTIFACTS / NAME, help="artifact directory")
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20], help="K of each row")
    p.set_defaults(seed=2017)


def evaluate(args: argparse.Namespace) -> None:
    meta = load_artifact(args)
    inner = meta.config.inner
    print(
        f"meta-model {meta.name} {meta.version[:12]}: {inner.steps} inner steps, "
        f"lr {inner.lr} ({inner.learned_lr} learned rates), {args.tasks} tasks per row, "
        f"100 query points, seed {args.seed}"
    )
    print()
    print("| K  | MSE    | 95% CI   |")
    print("|----|--------|----------|")
    for k in args.shots:
        mean, half = query_mse(meta, shots=k, tasks=args.tasks, seed=args.seed + k)
        print(f"| {k:<2} | {mean:.4f} | ± {half:.4f} |")


FAMILY = Family(
    name=NAME,
    summary="regression on sinusoids y = A sin(x - phase) (Finn et al. 2017)",
    input_shape=INPUT_SHAPE,
    sample=sample,
    preprocess=None,
    meta_defaults=MetaTrainConfig(),
    inner_defaults=InnerLoopConfig(steps=5, lr=0.01, learned_lr="per_layer_per_step"),
    add_train_arguments=add_train_arguments,
    train=train,
    add_eval_arguments=add_eval_arguments,
    evaluate=evaluate,
)
