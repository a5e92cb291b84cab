"""Meta-test protocols that print paper-style tables.

``python -m models.evaluate sinusoid [--artifact DIR]`` adapts the artifact's
meta-model to fresh tasks exactly as the service does (``MetaModel.adapt`` with the
artifact's default inner loop) and reports the query error with a 95% confidence
interval over tasks.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from models.checkpoint import MetaModel
from models.params import Params
from models.tasks import Episode, sinusoid, tabular
from models.tasks.tabular import Table

ARTIFACTS = Path(__file__).parent / "artifacts"


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval."""
    values = values.double()
    half = 1.96 * values.std(unbiased=True).item() / math.sqrt(values.numel())
    return values.mean().item(), half


def sinusoid_mse(
    meta: MetaModel,
    *,
    shots: int,
    tasks: int = 600,
    queries: int = 100,
    seed: int = 0,
    chunk: int = 200,
) -> tuple[float, float]:
    """Query MSE after the default adaptation on ``tasks`` fresh sinusoids with K=shots."""
    g = torch.Generator().manual_seed(seed)
    errors: list[Tensor] = []
    learner = meta.learner
    for start in range(0, tasks, chunk):
        ep = sinusoid.sample(g, min(chunk, tasks - start), shots, shots, queries)
        with torch.no_grad():
            fast = learner.adapt_batch(meta.params, meta.lrs, ep.xs, ep.ys, ep.ws).fast
            pred = learner.predict_batch(meta.params, fast, ep.xq)  # (B, Q, 1)
        errors.append(((pred - ep.yq) ** 2).mean(dim=(1, 2)))
    return mean_ci95(torch.cat(errors))


def evaluate_sinusoid(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="fastadapt eval sinusoid")
    p.add_argument("--artifact", type=Path, default=ARTIFACTS / "sinusoid")
    p.add_argument("--tasks", type=int, default=600, help="fresh tasks per row")
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--seed", type=int, default=2017)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    meta = MetaModel.load(args.artifact)
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
        mean, half = sinusoid_mse(meta, shots=k, tasks=args.tasks, seed=args.seed + k)
        print(f"| {k:<2} | {mean:.4f} | ± {half:.4f} |")


class Score(NamedTuple):
    metric: str  # "mse" or "accuracy"
    adapted: tuple[float, float]  # mean, 95% half-width after the inner loop
    unadapted: tuple[float, float]  # the meta-initialisation itself, for contrast


def query_scores(meta: MetaModel, fast: Params, ep: Episode) -> Tensor:
    """Per-task query MSE (regression) or accuracy (classification, over the outputs the
    support set uses, as the service answers): (B,)."""
    pred = meta.learner.predict_batch(meta.params, fast, ep.xq)  # (B, Q, O)
    if meta.config.kind == "regression":
        per_row = ((pred - ep.yq) ** 2).mean(-1)
    else:
        used = torch.zeros(pred.shape[0], pred.shape[-1], dtype=torch.bool)
        used.scatter_(1, ep.ys * (ep.ws > 0), True)  # padding points at class 0: harmless
        pred = pred.masked_fill(~used[:, None, :], float("-inf"))
        per_row = (pred.argmax(-1) == ep.yq).float()
    return (per_row * ep.wq).sum(1) / ep.wq.sum(1).clamp_min(1.0)


def tabular_scores(
    meta: MetaModel, table: Table, *, shots: int, tasks: int = 600, seed: int = 0
) -> Score:
    g = torch.Generator().manual_seed(seed)
    ep = tabular.sample(g, table, tasks, (shots, shots), queries=10)
    with torch.no_grad():
        fast = meta.learner.adapt_batch(meta.params, meta.lrs, ep.xs, ep.ys, ep.ws).fast
        init, _ = meta.learner.split(meta.params)
        stacked = {n: t.expand(tasks, *t.shape) for n, t in init.items()}
        adapted = query_scores(meta, fast, ep)
        unadapted = query_scores(meta, stacked, ep)
    metric = "mse" if meta.config.kind == "regression" else "accuracy"
    return Score(metric, mean_ci95(adapted), mean_ci95(unadapted))


def evaluate_tabular(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="fastadapt eval tabular")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="the CSV it was trained on")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--seed", type=int, default=2017)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    meta = MetaModel.load(args.artifact)
    task = meta.config.task
    table = tabular.load_csv(
        args.data,
        task_column=task["task_column"],
        label_column=task["label_column"],
        regression=meta.config.kind == "regression",
    )
    held_out = table.only(set(task["held_out_tasks"]))
    if not held_out.tasks:
        raise SystemExit("the artifact holds no tasks out; nothing to evaluate")
    print(
        f"meta-model {meta.name} {meta.version[:12]}: {len(held_out.tasks)} held-out tasks, "
        f"{args.tasks} episodes per row, K per class (classification) or in all"
    )
    print()
    print("| K  | metric   | adapted           | meta-init alone   |")
    print("|----|----------|-------------------|-------------------|")
    for k in args.shots:
        s = tabular_scores(meta, held_out, shots=k, tasks=args.tasks, seed=args.seed + k)
        print(
            f"| {k:<2} | {s.metric:<8} | {s.adapted[0]:.4f} ± {s.adapted[1]:.4f} "
            f"| {s.unadapted[0]:.4f} ± {s.unadapted[1]:.4f} |"
        )


def evaluate_omniglot(argv: Sequence[str]) -> None:
    from models import evaluate_omniglot as omniglot

    omniglot.main(list(argv))


FAMILIES: dict[str, Callable[[Sequence[str]], None]] = {
    "sinusoid": evaluate_sinusoid,
    "omniglot": evaluate_omniglot,
    "tabular": evaluate_tabular,
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in FAMILIES:
        print(f"usage: fastadapt eval {{{','.join(FAMILIES)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    FAMILIES[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
