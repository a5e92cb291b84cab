"""Bring your own task distribution: a CSV where each row is one example of one task.

One column names the task, one holds the label (a number for ``regression``, any
string for classification); the features are the other columns whose every value is
a number. Tasks are split (seeded) into meta-training and held-out validation tasks.
Classification episodes use each task's own classes, shuffled to the first N outputs
every episode, so the head learns no fixed meaning per output.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.tasks import Episode


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
    features = tuple(
        c
        for c in rows[0]
        if c not in (task_column, label_column) and all(_number(r[c]) is not None for r in rows)
    )
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
    return Table(features, regression, tuple(tasks))


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
