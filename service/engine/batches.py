"""Jobs -> the tensors of one batch: zero-padded, weighted, augmented as meta-trained.

Request threads hand the engine validated inputs in the cheapest form for each kind:
rows of numbers stay Python lists, and a whole batch of them becomes one tensor in one
``torch.tensor`` call here; images and arrays arrive as tensors of the input shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from models.augment import SupportShifts
from models.kernels import pad_batch
from service.engine.jobs import AdaptJob, Inputs


def inputs(batch: Sequence[Inputs], length: int, shape: tuple[int, ...]) -> Tensor:
    """B inputs of N_i entries each -> (B, N, *shape) float32, zero-padded to N = length."""
    if not any(isinstance(x, Tensor) for x in batch):  # rows: one conversion for the lot
        rows = _padded(list(batch), length, [0.0] * math.prod(shape))  # type: ignore[arg-type]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(batch), length, *shape)
    out = torch.zeros(len(batch), length, *shape)
    for i, x in enumerate(batch):
        one = x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float32)
        out[i, : len(one)] = one.reshape(len(one), *shape)
    return out


def support(
    jobs: Sequence[AdaptJob],
    shape: tuple[int, ...],
    *,
    classify: bool,
    outputs: int | None,
    shifts: SupportShifts | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's support sets: x (B, K, *shape), y (B, K) class indices or (B, K, O),
    w (B, K) with 0 on padding; each client's set augmented first where the meta-model
    was meta-trained that way."""
    k = max(len(job.inputs) for job in jobs)
    x = inputs([job.inputs for job in jobs], k, shape)  # (B, K, *shape)
    targets = [job.targets for job in jobs]
    if classify:
        y = torch.tensor(_padded(targets, k, 0), dtype=torch.long)  # (B, K)
    else:
        fill = 0.0 if outputs == 1 else [0.0] * (outputs or 1)
        y = torch.tensor(_padded(targets, k, fill), dtype=torch.float32)
        y = y.reshape(len(jobs), k, -1)  # (B, K, O)
    sizes = [len(job.inputs) for job in jobs]
    w = (torch.arange(k) < torch.tensor(sizes)[:, None]).float()  # (B, K): 0 on padding
    if shifts is None:
        return x, y, w
    grown = [shifts.expand(x[i, :n], y[i, :n], w[i, :n]) for i, n in enumerate(sizes)]
    return pad_batch([g[0] for g in grown], [g[1] for g in grown])


def _padded(lists: list[Sequence[Any]], length: int, fill: Any) -> list[Sequence[Any]]:
    """Each list padded with ``fill`` to ``length`` (the same object: torch only reads it)."""
    return [r if len(r) == length else [*r, *([fill] * (length - len(r)))] for r in lists]
