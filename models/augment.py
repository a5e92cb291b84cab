"""Support-set augmentation for image families: a one-shot head sees each image in
five positions.

A head adapted from one drawing per class fits that drawing's exact position; adding
each support image's copies shifted by a pixel right, left, down and up makes it fit the
character instead (+0.45 points at Omniglot 20-way 1-shot on held-out alphabets, none
at 5-shot, where the support set already varies). The copies are deterministic, so an
adaptation is as reproducible as without them. Only support sets that stay within
``max_images`` after the expansion are augmented, so the copies never make an
adaptation run the body over more than ``max_images`` images.

The artifact's ``config.json`` records the setting under ``task.support_shifts``;
meta-training, evaluation and the service all expand support sets through ``expand``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

COPIES = 5  # the image and its four shifted copies


@dataclass(frozen=True)
class SupportShifts:
    pixels: int = 1  # how far each copy is shifted
    max_images: int = 100  # augment a support set only if COPIES x its size fits in this

    def __post_init__(self) -> None:
        if self.pixels < 1 or self.max_images < 1:
            raise ValueError(f"support_shifts: pixels and max_images must be >= 1, not {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_task(cls, task: dict[str, Any]) -> SupportShifts | None:
        """The setting in an artifact's ``task`` block (None: support sets stay as given)."""
        spec = task.get("support_shifts")
        if spec is None:
            return None
        if len(task.get("input_shape", ())) != 3:
            raise ValueError(f"support_shifts needs (C, H, W) image inputs, not {task}")
        return cls(**spec)

    def applies(self, images: int) -> bool:
        return COPIES * images <= self.max_images

    def expand(self, x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., K, C, H, W), y (..., K) or (..., K, O), w (..., K) -> the same with 5K
        rows: the K images, then their shifts right, left, down, up (paper fills in);
        labels and weights repeat. Support sets with COPIES x K > max_images come back as
        they are."""
        k_dim = w.dim() - 1
        if not self.applies(w.shape[k_dim]):
            return x, y, w
        p = self.pixels
        copies = [x] + [shift(x, dx, dy) for dx, dy in ((p, 0), (-p, 0), (0, p), (0, -p))]
        return (
            torch.cat(copies, dim=k_dim),
            torch.cat([y] * COPIES, dim=k_dim),
            torch.cat([w] * COPIES, dim=k_dim),
        )


def shift(x: Tensor, dx: int, dy: int) -> Tensor:
    """Images (..., H, W) moved ``dx`` pixels right and ``dy`` down; 0 (paper) fills in."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]
