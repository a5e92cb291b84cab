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

import torch
from torch import Tensor

from models.checkpoint import MetaModel
from models.tasks import sinusoid

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


FAMILIES: dict[str, Callable[[Sequence[str]], None]] = {"sinusoid": evaluate_sinusoid}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in FAMILIES:
        print(f"usage: fastadapt eval {{{','.join(FAMILIES)}}} ...", file=sys.stderr)
        raise SystemExit(2)
    FAMILIES[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
