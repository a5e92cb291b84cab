"""Parameters are data: a flat ``dict[str, Tensor]`` that travels and rests as safetensors."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

Params = dict[str, Tensor]


def to_bytes(params: Params) -> bytes:
    """Serialise parameters (moved to CPU, made contiguous) as safetensors bytes."""
    return _st_save({name: t.detach().to("cpu").contiguous() for name, t in params.items()})


def from_bytes(data: bytes) -> Params:
    """Parse safetensors bytes; never executes code, unlike pickle/torch.load."""
    return dict(_st_load(data))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nbytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def select(params: Params, prefix: str) -> Params:
    """The entries under ``prefix.``, with the prefix stripped (for a sub-module's call)."""
    cut = len(prefix) + 1
    return {name[cut:]: t for name, t in params.items() if name.startswith(prefix + ".")}


def detached(params: Params) -> Params:
    return {name: t.detach() for name, t in params.items()}


def to(params: Params, device: torch.device | str) -> Params:
    return {name: t.to(device) for name, t in params.items()}
