"""Meta-test protocols that print paper-style tables: ``fastadapt eval <family>``.

Every family's protocol (``Family.evaluate``) adapts the artifact's meta-model to fresh
tasks exactly as the service does, with the artifact's default inner loop, and reports
its metric with a 95% confidence interval over tasks (``mean_ci95``). The flags every
family takes (``--tasks --seed --device --threads``) are added here.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from models.checkpoint import MetaModel
from models.device import resolve_device
from models.params import Params

if TYPE_CHECKING:
    from models.tasks import Episode, Family

ARTIFACTS = Path(__file__).parent / "artifacts"


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (0 for one value)."""
    values = values.double()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else 0.0
    return values.mean().item(), 1.96 * std / math.sqrt(max(n, 1))


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
        used = torch.zeros(pred.shape[0], pred.shape[-1], dtype=torch.bool, device=pred.device)
        used.scatter_(1, ep.ys * (ep.ws > 0), True)  # padding points at class 0: harmless
        pred = pred.masked_fill(~used[:, None, :], float("-inf"))
        per_row = (pred.argmax(-1) == ep.yq).float()
    return (per_row * ep.wq).sum(1) / ep.wq.sum(1).clamp_min(1.0)


def episode_scores(meta: MetaModel, ep: Episode) -> Score:
    """Adapted and unadapted query scores of a batch of episodes, with their 95% CIs."""
    tasks = ep.xs.shape[0]
    with torch.no_grad():
        fast = meta.learner.adapt_batch(meta.params, meta.lrs, ep.xs, ep.ys, ep.ws).fast
        init, _ = meta.learner.split(meta.params)
        stacked = {n: t.expand(tasks, *t.shape) for n, t in init.items()}
        adapted = query_scores(meta, fast, ep)
        unadapted = query_scores(meta, stacked, ep)
    metric = "mse" if meta.config.kind == "regression" else "accuracy"
    return Score(metric, mean_ci95(adapted.cpu()), mean_ci95(unadapted.cpu()))


def load_artifact(args: argparse.Namespace) -> MetaModel:
    """``--artifact``, loaded onto ``--device``; one that cannot be (missing, tampered,
    NaN weights) ends the command with the reason, exit 1, no traceback."""
    try:
        return MetaModel.load(args.artifact).to(args.device)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{PROG}: cannot load {args.artifact}: {exc}") from None


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=int, default=600, help="fresh tasks per row")
    p.add_argument("--seed", type=int, default=0, help="seeds the tasks (each row its own)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


PROG = "fastadapt eval"
DESCRIPTION = "Meta-test a meta-model of a task family."


def arguments(family: Family, p: argparse.ArgumentParser) -> None:
    """The flags every family takes, then the family's own."""
    add_common_arguments(p)
    family.add_eval_arguments(p)


def main(argv: Sequence[str] | None = None) -> None:
    from models.tasks import parse_command

    argv = list(sys.argv[1:] if argv is None else argv)
    family, args = parse_command(PROG, DESCRIPTION, argv, arguments)
    torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    family.evaluate(args)


if __name__ == "__main__":
    main()
