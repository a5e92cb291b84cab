"""Task families: each module samples meta-training episodes and describes its inputs."""

from __future__ import annotations

from dataclasses import dataclass

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

    def to(self, device: str) -> Episode:
        return Episode(
            *(t.to(device) for t in (self.xs, self.ys, self.ws, self.xq, self.yq, self.wq))
        )
