"""The sinusoid regression family of Finn et al. 2017: y = A sin(x - phase).

Amplitude ~ U[0.1, 5.0], phase ~ U[0, pi], x ~ U[-5, 5]. Support sets have between
``min_shots`` and ``max_shots`` points (padding is masked by the weights), so one
meta-model serves any K in that range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.tasks import Episode

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
