"""Networks. Every net is ``body`` (features) followed by ``head`` (a Linear layer),
so head-only adaptation (ANIL) can run the body once and adapt ``head.*`` alone.

Each net has a spec (``MLPSpec``, ``Conv4Spec``): every hyper-parameter its function
depends on besides its parameters, the ``architecture`` block of an artifact's
config.json. ``resolve`` fills a partial block in from the spec's defaults (configs built
in code); ``parse(..., complete=True)`` refuses a block that lacks a key (configs loaded
from disk: a default that changes later must not change what an old artifact computes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Readout = Literal["pool", "map"]


@dataclass(frozen=True)
class MLPSpec:
    """An ``MLP``: Linear layers with ReLUs between them."""

    kind: ClassVar[str] = "mlp"
    in_features: int = 1  # input width
    hidden: tuple[int, ...] = (40, 40)  # hidden widths, each Linear followed by a ReLU
    out_features: int = 1  # output width
    # (mean, std) per input feature, a fixed first layer (tabular data); None: no scaling
    standardize: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass(frozen=True)
class Conv4Spec:
    """A ``Conv4``: ``blocks`` x [3x3 conv, GroupNorm, ReLU, 2x2 max-pool], then a head."""

    kind: ClassVar[str] = "conv4"
    in_channels: int = 1  # image channels
    channels: int = 64  # conv channels in every block
    blocks: int = 4  # conv blocks
    groups: int = 8  # GroupNorm groups per block
    eps: float = 1e-5  # GroupNorm's epsilon (torch's default, which every artifact so far used)
    image_size: int = 28  # input side (square images)
    out_features: int = 20  # the maximum way
    normalize: bool = True  # unit-length features: head-only adaptation sees cosines
    feature_scale: float = 1.0  # the features' length when normalised
    readout: Readout = "pool"  # "pool": the full last block; "map": its GroupNorm output


@dataclass(frozen=True)
class ResidualSpec:
    """A ``Residual``: a residual MLP block over fixed embeddings (a frozen sentence
    encoder's), unit-normalised and scaled by a learned length, then a head."""

    kind: ClassVar[str] = "residual"
    in_features: int = 384  # embedding width
    hidden: int = 384  # the block's hidden width (0: no block, the embedding itself)
    out_features: int = 160  # the maximum way
    scale: float = 4.0  # the features' initial length (learned)


NetSpec = MLPSpec | Conv4Spec | ResidualSpec
SPECS: dict[str, type[NetSpec]] = {spec.kind: spec for spec in (MLPSpec, Conv4Spec, ResidualSpec)}


class Standardize(nn.Module):
    """Fixed feature scaling learnt from the training data: (N, D) -> (N, D)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
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
        in_features: int = MLPSpec.in_features,
        hidden: Sequence[int] = MLPSpec.hidden,
        out_features: int = MLPSpec.out_features,
        standardize: tuple[Sequence[float], Sequence[float]] | None = MLPSpec.standardize,
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
    transfers better to unseen characters. Both readouts share parameter names. The
    arguments are ``Conv4Spec``'s, which says what each means.
    """

    def __init__(
        self,
        in_channels: int = Conv4Spec.in_channels,
        channels: int = Conv4Spec.channels,
        blocks: int = Conv4Spec.blocks,
        groups: int = Conv4Spec.groups,
        eps: float = Conv4Spec.eps,
        image_size: int = Conv4Spec.image_size,
        out_features: int = Conv4Spec.out_features,
        normalize: bool = Conv4Spec.normalize,
        feature_scale: float = Conv4Spec.feature_scale,
        readout: str = Conv4Spec.readout,
    ) -> None:
        super().__init__()
        if readout not in ("pool", "map"):
            raise ValueError(f"readout must be 'pool' or 'map', not {readout!r}")
        layers: list[nn.Module] = []
        width, side = in_channels, image_size
        for block in range(blocks):
            layers += [
                nn.Conv2d(width, channels, 3, padding=1),
                nn.GroupNorm(groups, channels, eps),
            ]
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


class ResidualBlock(nn.Module):
    """x + up(gelu(down(x))), the up projection zero at initialisation (the identity),
    then unit length times a learned scale: (N, D) -> (N, D)."""

    def __init__(self, width: int, hidden: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(width, hidden) if hidden else None
        self.up = nn.Linear(hidden, width) if hidden else None
        if self.up is not None:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, x: Tensor) -> Tensor:
        if self.down is not None and self.up is not None:
            x = x + self.up(F.gelu(self.down(x)))
        return self.log_scale.exp() * F.normalize(x, dim=-1)


class Residual(nn.Module):
    """The text family's net on sentence embeddings: ``ResidualBlock`` then a Linear head.
    The arguments are ``ResidualSpec``'s."""

    def __init__(
        self,
        in_features: int = ResidualSpec.in_features,
        hidden: int = ResidualSpec.hidden,
        out_features: int = ResidualSpec.out_features,
        scale: float = ResidualSpec.scale,
    ) -> None:
        super().__init__()
        self.body = ResidualBlock(in_features, hidden, scale)
        self.head = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, in_features) -> (N, out_features)
        return self.head(self.body(x))


def _frozen(value: Any) -> Any:
    """JSON lists -> tuples, all the way down (specs are frozen and hashable)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, list | tuple) else value


def parse(
    architecture: Mapping[str, Any], *, complete: bool = False, where: str = "architecture"
) -> NetSpec:
    """The spec of an ``architecture`` block. A key it lacks takes the spec's default, or,
    with ``complete=True`` (a config.json being loaded), is a ValueError naming it
    (``where`` prefixes the name, e.g. "<dir>/config.json: architecture"). A key that no
    net of its kind takes is always a ValueError."""
    if "kind" not in architecture:
        raise ValueError(f"{where}.kind is missing")
    kind = architecture["kind"]
    if kind not in SPECS:
        raise ValueError(
            f"{where}.kind: unknown architecture kind {kind!r}; known: {sorted(SPECS)}"
        )
    spec = SPECS[kind]
    names = [f.name for f in fields(spec)]
    unknown = sorted(set(architecture) - {"kind", *names})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not a {kind} hyper-parameter; known: {names}")
    if complete:
        for name in names:
            if name not in architecture:
                raise ValueError(f"{where}.{name} is missing")
    return spec(**{n: _frozen(architecture[n]) for n in names if n in architecture})


def to_dict(spec: NetSpec) -> dict[str, Any]:
    """The complete ``architecture`` block of a spec, JSON-ready (lists, not tuples)."""
    return {"kind": spec.kind, **{f.name: _jsonable(getattr(spec, f.name)) for f in fields(spec)}}


def resolve(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """A (maybe partial) ``architecture`` block completed: every key its net depends on,
    missing ones at the spec's defaults. What ``ArtifactConfig`` holds and saves."""
    return to_dict(parse(architecture))


def build(architecture: Mapping[str, Any] | NetSpec) -> nn.Module:
    """Build a net from a spec or an ``architecture`` block (partial blocks take defaults)."""
    spec = architecture if isinstance(architecture, NetSpec) else parse(architecture)
    values = {f.name: getattr(spec, f.name) for f in fields(spec)}
    if isinstance(spec, MLPSpec):
        return MLP(**values)
    if isinstance(spec, ResidualSpec):
        return Residual(**values)
    return Conv4(**values)
