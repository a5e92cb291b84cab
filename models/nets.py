"""Networks. Every net is ``body`` (features) followed by ``head`` (a Linear layer),
so head-only adaptation (ANIL) can run the body once and adapt ``head.*`` alone."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU network, e.g. 1-40-40-1 for the sinusoid (Finn et al. 2017)."""

    def __init__(
        self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, in_features) -> (N, out_features)
        return self.head(self.body(x))


NETS: dict[str, type[nn.Module]] = {"mlp": MLP}


def build(architecture: dict[str, Any]) -> nn.Module:
    """Build a net from the ``architecture`` block of an artifact's config.json."""
    spec = dict(architecture)
    kind = spec.pop("kind")
    if kind not in NETS:
        raise ValueError(f"unknown architecture kind {kind!r}; known: {sorted(NETS)}")
    if "hidden" in spec:
        spec["hidden"] = tuple(spec["hidden"])
    return NETS[kind](**spec)
