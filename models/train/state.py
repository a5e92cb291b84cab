"""The one training checkpoint format: ``OUT/checkpoint/state.safetensors`` + ``state.json``.

Tensors (weights, optimiser moments, generator states) go to safetensors, everything else
(step counts, optimiser hyper-parameters, scores) to JSON; nothing is pickled, so a
checkpoint from anywhere can be loaded without running its code. Both files are written
to temporary names and renamed, the JSON last: a crash leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.params import from_bytes, to_bytes

DIRECTORY = "checkpoint"
TENSORS = "state.safetensors"
META = "state.json"


def save(out: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    target = out / DIRECTORY
    target.mkdir(parents=True, exist_ok=True)
    (target / (TENSORS + ".tmp")).write_bytes(to_bytes(tensors))
    (target / (META + ".tmp")).write_text(json.dumps(meta))
    os.replace(target / (TENSORS + ".tmp"), target / TENSORS)
    os.replace(target / (META + ".tmp"), target / META)


def load(out: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The checkpoint under ``out``, or None when there is none yet."""
    source = out / DIRECTORY
    if not (source / META).exists():
        return None
    return from_bytes((source / TENSORS).read_bytes()), json.loads((source / META).read_text())


def optimizer_state(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """An optimiser's moments as ``{prefix}.{index}.{name}`` tensors, and its param groups."""
    state = optimizer.state_dict()
    tensors = {
        f"{prefix}.{index}.{key}": torch.as_tensor(value).detach()
        for index, entries in state["state"].items()
        for key, value in entries.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, Tensor],
    groups: list[dict[str, Any]],
    prefix: str,
) -> None:
    """The inverse of ``optimizer_state`` (the optimiser moves moments to its params' device)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
