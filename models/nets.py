"""Networks. Every net is ``body`` (features) followed by ``head`` (a Linear layer),
so head-only adaptation (ANIL) can run the body once and adapt ``head.*`` alone."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Standardize(nn.Module):
    """Fixed feature scaling learnt from the training data: (N, D) -> (N, D)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """Fully connected ReLU network, e.g. 1-40-40-1 for the sinusoid (Finn et al. 2017).

    ``standardize`` = (mean, std) per input feature puts a fixed ``Standardize`` first in
    the body (tabular data), so the artifact takes raw features.
    """

    def __init__(
        self,
        in_features: int = 1,
        hidden: tuple[int, ...] = (40, 40),
        out_features: int = 1,
        standardize: tuple[list[float], list[float]] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [] if standardize is None else [Standardize(*standardize)]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, in_features) -> (N, out_features)
        return self.head(self.body(x))


class L2Normalize(nn.Module):
    """Scale each feature vector to length ``scale``: (N, D) -> (N, D)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=-1)


class Conv4(nn.Module):
    """The few-shot Conv4 (Vinyals et al. 2016; Finn et al. 2017): ``blocks`` x [3x3 conv,
    GroupNorm, ReLU, 2x2 max-pool], flattened, optionally L2-normalised, then a Linear head.

    GroupNorm needs no batch statistics, so one input's output never depends on the other
    inputs of a request. 28x28 inputs and 4 blocks give ``channels`` features with
    ``readout="pool"``; ``readout="map"`` stops the last block after its GroupNorm and
    flattens the (channels, 3, 3) map instead (576 features for 64 channels), which
    transfers better to unseen characters. Both readouts share parameter names.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        blocks: int = 4,
        groups: int = 8,  # GroupNorm groups per block
        image_size: int = 28,
        out_features: int = 20,  # the maximum way
        normalize: bool = True,  # unit-length features: head-only adaptation sees cosines
        feature_scale: float = 1.0,
        readout: str = "pool",  # "pool": the full last block; "map": its GroupNorm output
    ) -> None:
        super().__init__()
        if readout not in ("pool", "map"):
            raise ValueError(f"readout must be 'pool' or 'map', not {readout!r}")
        layers: list[nn.Module] = []
        width, side = in_channels, image_size
        for block in range(blocks):
            layers += [nn.Conv2d(width, channels, 3, padding=1), nn.GroupNorm(groups, channels)]
            width = channels
            if readout == "map" and block == blocks - 1:
                break
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            side //= 2
        layers.append(nn.Flatten())
        if normalize:
            layers.append(L2Normalize(feature_scale))
        self.body = nn.Sequential(*layers)
        self.features = channels * side * side
        self.head = nn.Linear(self.features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C, H, W) -> (N, out_features)
        return self.head(self.body(x))


NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "conv4": Conv4}


def build(architecture: dict[str, Any]) -> nn.Module:
    """Build a net from the ``architecture`` block of an artifact's config.json."""
    spec = dict(architecture)
    kind = spec.pop("kind")
    if kind not in NETS:
        raise ValueError(f"unknown architecture kind {kind!r}; known: {sorted(NETS)}")
    if "hidden" in spec:
        spec["hidden"] = tuple(spec["hidden"])
    return NETS[kind](**spec)
