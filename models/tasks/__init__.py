"""Task families: each module samples meta-training episodes and describes its inputs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass(frozen=True)
class Episode:
    """A meta-batch of tasks; weights of 0 mark padding (support sets of different sizes)."""

    xs: Tensor  # (B, K, ...) support inputs
    ys: Tensor  # (B, K, O) regression targets or (B, K) class indices
    ws: Tensor  # (B, K) support weights
    xq: Tensor  # (B, Q, ...) query inputs
    yq: Tensor  # (B, Q, O) or (B, Q)
    wq: Tensor  # (B, Q) query weights
    classes: Tensor | None = None  # (B, N) the split's class behind each label, if any

    def to(self, device: str) -> Episode:
        xs, ys, ws, xq, yq, wq = (
            t.to(device) for t in (self.xs, self.ys, self.ws, self.xq, self.yq, self.wq)
        )
        return Episode(xs, ys, ws, xq, yq, wq, self.classes)


IMAGE_FAMILIES = ("omniglot",)


def image_preprocess(family: str) -> Callable[[np.ndarray], Tensor] | None:
    """The function that turns a grayscale (H, W) uint8 image of any size into one model
    input, exactly as in training; None for families whose inputs are not images."""
    if family not in IMAGE_FAMILIES:
        return None
    module = importlib.import_module(f"models.tasks.{family}")
    preprocess: Callable[[np.ndarray], Tensor] = module.preprocess
    return preprocess
