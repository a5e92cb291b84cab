"""Bring your own task distribution: a CSV where each row is one example of one task.

One column names the task, one holds the label (a number for ``regression``, any
string for classification); the features are the other columns whose every value is
a number. Tasks are split (seeded) into meta-training and held-out validation tasks.
Classification episodes use each task's own classes, shuffled to the first N outputs
every episode, so the head learns no fixed meaning per output.

The recipe: an MLP over the standardised features, MAML through the served inner loop
(``MetaStage``), the weights that score best on the held-out tasks shipped. The
meta-test: those held-out tasks, adapted against the meta-initialisation alone.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models import nets
from models.checkpoint import ArtifactConfig, MetaModel, TrainedFor
from models.evaluate import Score, episode_scores, load_artifact
from models.maml import LOSSES, InnerLoopConfig, Learner
from models.params import Params
from models.tasks import Episode, Family
from models.train import options
from models.train.loop import MetaStage, MetaTrainConfig, Selection, Trainer, init_distributed

NAME = "tabular"


@dataclass(frozen=True)
class Task:
    name: str
    x: Tensor  # (n, D) float32 features
    y: Tensor  # (n, 1) float32 targets, or (n,) int64 class ids 0..C-1 within the task


@dataclass(frozen=True)
class Table:
    features: tuple[str, ...]
    regression: bool
    tasks: tuple[Task, ...]
    dropped: tuple[tuple[str, str], ...] = ()  # (column, why) of columns left out

    @property
    def max_way(self) -> int:
        return max(int(t.y.max()) + 1 for t in self.tasks) if not self.regression else 1

    def standardize(self) -> tuple[list[float], list[float]]:
        """Per-feature mean and std over all rows (std of a constant column is 1)."""
        x = torch.cat([t.x for t in self.tasks]).double()
        std = x.std(dim=0, unbiased=False)
        return x.mean(dim=0).tolist(), torch.where(std > 0, std, 1.0).tolist()

    def split(self, held_out: float, seed: int) -> tuple[Table, Table]:
        names = sorted(t.name for t in self.tasks)
        random.Random(seed).shuffle(names)
        cut = max(1, round(len(names) * held_out)) if held_out > 0 else 0
        return self.only(set(names[cut:])), self.only(set(names[:cut]))

    def only(self, names: set[str]) -> Table:
        return Table(
            self.features, self.regression, tuple(t for t in self.tasks if t.name in names)
        )


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_csv(path: str | Path, *, task_column: str, label_column: str, regression: bool) -> Table:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for column in (task_column, label_column):
        if column not in rows[0]:
            raise ValueError(f"{path}: no column {column!r}; columns: {sorted(rows[0])}")
    features: list[str] = []
    dropped: list[tuple[str, str]] = []
    for c in rows[0]:
        if c in (task_column, label_column):
            continue
        bad = next((i for i, r in enumerate(rows) if _number(r[c]) is None), None)
        if bad is None:
            features.append(c)
        else:  # line numbers count the header as line 1
            dropped.append((c, f"line {bad + 2} holds {rows[bad][c]!r}, not a finite number"))
    if not features:
        raise ValueError(f"{path}: no numeric feature columns besides task and label")
    grouped: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        grouped.setdefault(r[task_column], []).append(r)
    tasks = []
    for name, group in sorted(grouped.items()):
        x = torch.tensor([[float(r[c]) for c in features] for r in group], dtype=torch.float32)
        if regression:
            labels = [_number(r[label_column]) for r in group]
            if any(v is None for v in labels):
                raise ValueError(f"{path}: task {name!r} has a non-numeric {label_column!r}")
            y = torch.tensor(labels, dtype=torch.float32).unsqueeze(1)
        else:
            classes = sorted({r[label_column] for r in group})
            y = torch.tensor([classes.index(r[label_column]) for r in group])
        tasks.append(Task(name, x, y))
    return Table(tuple(features), regression, tuple(tasks), tuple(dropped))


def columns_report(table: Table, *, task_column: str, label_column: str) -> str:
    """Which columns training uses, and which it dropped and why (``fastadapt train``)."""
    lines = [
        f"task column: {task_column}; label column: {label_column}",
        f"features ({len(table.features)}): {', '.join(table.features)}",
    ]
    if table.dropped:
        lines.append(f"dropped ({len(table.dropped)}), features must be numbers in every row:")
        lines += [f"  {column}: {why}" for column, why in table.dropped]
    else:
        lines.append("dropped: none")
    return "\n".join(lines)


def sample(
    g: torch.Generator, table: Table, tasks: int, shots: tuple[int, int], queries: int
) -> Episode:
    """``tasks`` episodes. Regression: K ~ U{shots} support rows, ``queries`` query rows.
    Classification: K ~ U{shots} support rows per class (as the task allows), the rest of
    each sampled class's rows (up to ``queries`` per class) as queries."""
    lo, hi = shots
    d = len(table.features)
    way = 1 if table.regression else table.max_way
    ks, kq = hi * way, queries * way
    xs, xq = torch.zeros(tasks, ks, d), torch.zeros(tasks, kq, d)
    ws, wq = torch.zeros(tasks, ks), torch.zeros(tasks, kq)
    if table.regression:
        ys, yq = torch.zeros(tasks, ks, 1), torch.zeros(tasks, kq, 1)
    else:
        ys, yq = torch.zeros(tasks, ks, dtype=torch.long), torch.zeros(tasks, kq, dtype=torch.long)
    picks = torch.randint(len(table.tasks), (tasks,), generator=g).tolist()
    for b, index in enumerate(picks):
        task = table.tasks[index]
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        s = q = 0
        for rows, label in _groups(g, task, table.regression):
            k_here = min(k, max(len(rows) - 1, 1))
            support, query = rows[:k_here], rows[k_here : k_here + queries]
            xs[b, s : s + len(support)] = task.x[support]
            xq[b, q : q + len(query)] = task.x[query]
            ws[b, s : s + len(support)] = 1.0
            wq[b, q : q + len(query)] = 1.0
            ys[b, s : s + len(support)] = task.y[support] if label is None else label
            yq[b, q : q + len(query)] = task.y[query] if label is None else label
            s, q = s + len(support), q + len(query)
    return Episode(xs, ys, ws, xq, yq, wq)


def _groups(g: torch.Generator, task: Task, regression: bool) -> list[tuple[Tensor, int | None]]:
    """Shuffled row indices to draw support and query from, with the episode label to
    give them: all rows unlabelled (regression), or one group per class, each class sent
    to a random output."""
    if regression:
        return [(torch.randperm(task.x.shape[0], generator=g), None)]
    n_classes = int(task.y.max()) + 1
    order = torch.randperm(n_classes, generator=g).tolist()
    groups = []
    for c in range(n_classes):
        rows = torch.nonzero(task.y == c).squeeze(1)
        groups.append((rows[torch.randperm(len(rows), generator=g)], order[c]))
    return groups


# -- meta-training ----------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    options.add_multi_step_loss(p, FAMILY.meta_defaults)
    p.add_argument("--data", type=Path, required=True, help="CSV, one row per example")
    p.add_argument("--task-column", required=True, help="the column that names the task")
    p.add_argument("--label-column", required=True, help="the column that holds the label")
    p.add_argument("--regression", action="store_true", help="numeric labels (else classes)")
    p.add_argument("--name", default=None, help="meta-model name (default: the out folder's)")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="MLP hidden widths")
    p.add_argument(
        "--shots",
        type=int,
        nargs=2,
        default=[2, 10],
        metavar=("MIN", "MAX"),
        help="support rows per task (per class for classification)",
    )
    p.add_argument("--queries", type=int, default=10, help="query rows per task (per class)")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of tasks for validation")


def train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    cfg = options.meta_config(args)
    device = options.device(args)
    rank = init_distributed(device)
    table = load_csv(
        args.data,
        task_column=args.task_column,
        label_column=args.label_column,
        regression=args.regression,
    )
    if rank.main:
        print(
            columns_report(table, task_column=args.task_column, label_column=args.label_column),
            flush=True,
        )
    train, held_out = table.split(args.held_out, cfg.seed)
    torch.manual_seed(cfg.seed)
    width = len(table.features)
    out_features = 1 if table.regression else table.max_way
    architecture = {
        "kind": "mlp",
        "in_features": width,
        "hidden": args.hidden,
        "out_features": out_features,
        "standardize": train.standardize(),
    }
    net = nets.build(architecture)
    inner = options.inner_config(args)
    kind = "regression" if table.regression else "classification"
    task: dict[str, Any] = {
        "kind": kind,
        "input_shape": [width],
        "features": list(table.features),
        "task_column": args.task_column,
        "label_column": args.label_column,
        "held_out_tasks": sorted(t.name for t in held_out.tasks),
        "output": "the label" if table.regression else "logits over max_way classes",
    }
    if not table.regression:
        task["max_way"] = table.max_way
    config = ArtifactConfig(
        name=args.name or args.out.name,
        family=NAME,
        architecture=architecture,
        task=task,
        inner=inner,
        training={"command": options.command(FAMILY, argv), "config": asdict(cfg)},
        trained_for=TrainedFor.of(inner, support=(args.shots[0], args.shots[1])),
    )
    learner = Learner(net, LOSSES[kind], inner)
    params: Params = dict(net.named_parameters())
    shots = (args.shots[0], args.shots[1])

    def episodes(g: torch.Generator) -> Episode:
        return sample(g, train, cfg.meta_batch, shots, args.queries)

    def validate(params: Params, lrs: Params) -> dict[str, float]:
        if not held_out.tasks:
            return {}
        probe = MetaModel(config, params, lrs, version="")
        score = scores(probe, held_out, shots=shots[1], tasks=100, seed=10_000)
        return {"val-" + score.metric: score.adapted[0]}

    metric = "val-" + ("mse" if table.regression else "accuracy")
    stage = MetaStage(
        learner,
        params,
        cfg,
        episodes,
        device=device,
        rank=rank,
        validate=validate if rank.main else None,
        selection=Selection(metric, maximize=not table.regression),
    )
    trainer = Trainer([stage], args.out, rank=rank)
    options.run_and_save(trainer, lambda: (config, *stage.final()), args.out, resume=args.resume)


# -- meta-test --------------------------------------------------------------------------------
def scores(meta: MetaModel, table: Table, *, shots: int, tasks: int = 600, seed: int = 0) -> Score:
    """Adapted and unadapted query scores on ``tasks`` episodes of ``table``'s tasks."""
    g = torch.Generator().manual_seed(seed)
    device = next(iter(meta.params.values())).device
    return episode_scores(meta, sample(g, table, tasks, (shots, shots), queries=10).to(device))


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", type=Path, required=True, help="artifact directory")
    p.add_argument("--data", type=Path, required=True, help="the CSV it was trained on")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="K of each row")
    p.set_defaults(seed=2017)


def evaluate(args: argparse.Namespace) -> None:
    meta = load_artifact(args)
    task = meta.config.task
    table = load_csv(
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
        s = scores(meta, held_out, shots=k, tasks=args.tasks, seed=args.seed + k)
        print(
            f"| {k:<2} | {s.metric:<8} | {s.adapted[0]:.4f} ± {s.adapted[1]:.4f} "
            f"| {s.unadapted[0]:.4f} ± {s.unadapted[1]:.4f} |"
        )


FAMILY = Family(
    name=NAME,
    summary="your own task distribution: a CSV with one row per example of one task",
    input_shape=None,
    sample=sample,
    preprocess=None,
    meta_defaults=MetaTrainConfig(iterations=5_000, meta_batch=16),
    inner_defaults=InnerLoopConfig(steps=5, lr=0.05, learned_lr="per_layer_per_step"),
    add_train_arguments=add_train_arguments,
    train=train,
    add_eval_arguments=add_eval_arguments,
    evaluate=evaluate,
)
