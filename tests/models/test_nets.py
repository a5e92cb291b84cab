"""Net specs: every hyper-parameter a net's function depends on, explicit and complete."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models import nets
from models.checkpoint import LR_PREFIX, TEMPERATURE_KEY
from models.params import sha256

ARTIFACTS = Path(__file__).resolve().parents[2] / "models" / "artifacts"
SHIPPED = ["omniglot", "sinusoid"]


@pytest.mark.parametrize("spec", [nets.MLPSpec, nets.Conv4Spec])
def test_resolve_fills_every_key_of_the_spec(spec: type[nets.NetSpec]) -> None:
    full = nets.resolve({"kind": spec.kind})
    assert set(full) == {"kind", *(f.name for f in fields(spec))}
    assert nets.resolve(full) == full  # complete already: unchanged
    assert json.loads(json.dumps(full)) == full  # JSON-ready
    assert nets.parse(full, complete=True) == spec()


def test_resolve_keeps_what_it_is_given() -> None:
    partial: dict[str, Any] = {"kind": "mlp", "in_features": 3, "hidden": [16]}
    partial["standardize"] = ([1.0, 2.0, 3.0], [1.0, 1.0, 2.0])
    full = nets.resolve(partial)
    assert full["hidden"] == [16] and full["in_features"] == 3 and full["out_features"] == 1
    assert full["standardize"] == [[1.0, 2.0, 3.0], [1.0, 1.0, 2.0]]
    a, b = nets.build(partial), nets.build(full)
    x = torch.randn(4, 3)
    torch.testing.assert_close(a.body[0](x), b.body[0](x))  # the same fixed scaling


def test_a_complete_block_must_name_every_key() -> None:
    full = nets.resolve({"kind": "conv4"})
    for key in full:
        partial = {k: v for k, v in full.items() if k != key}
        with pytest.raises(ValueError, match=f"^arch.{key} is missing$"):
            nets.parse(partial, complete=True, where="arch")


def test_unknown_keys_and_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match=r"architecture\.width: not a mlp hyper-parameter"):
        nets.resolve({"kind": "mlp", "width": 3})
    with pytest.raises(ValueError, match="unknown architecture kind 'resnet'"):
        nets.build({"kind": "resnet"})


def test_group_norm_eps_is_a_real_parameter_defaulting_to_torchs() -> None:
    def eps_of(net: nn.Module) -> set[float]:
        return {m.eps for m in net.modules() if isinstance(m, nn.GroupNorm)}

    assert eps_of(nets.build({"kind": "conv4"})) == {nn.GroupNorm(2, 4).eps}
    small = {"kind": "conv4", "channels": 4, "groups": 2, "blocks": 2, "image_size": 8}
    assert eps_of(nets.build({**small, "eps": 1e-3})) == {1e-3}
    x = torch.rand(2, 1, 8, 8)
    torch.manual_seed(0)
    a = nets.build({**small, "normalize": False})
    torch.manual_seed(0)
    b = nets.build({**small, "normalize": False, "eps": 1.0})
    assert not torch.allclose(a(x), b(x))  # eps changes the function: it must be recorded


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_net_builds_from_its_config_alone(name: str) -> None:
    """The config.json's architecture block, with no code default filling a gap, builds a
    net whose parameters are exactly the shipped weights' (strict load)."""
    directory = ARTIFACTS / name
    architecture = json.loads((directory / "config.json").read_text())["architecture"]
    spec = nets.parse(architecture, complete=True)
    net = nets.build(spec)
    weights = directory / "weights.safetensors"
    assert sha256(weights.read_bytes()) == (directory / "weights.sha256").read_text().strip()
    tensors = load_file(weights)
    params = {
        n: t for n, t in tensors.items() if not n.startswith(LR_PREFIX) and n != TEMPERATURE_KEY
    }  # the net's own: not the inner rates, nor the softmax temperature
    net.load_state_dict(params, strict=True)
