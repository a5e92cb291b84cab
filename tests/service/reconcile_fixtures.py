"""Staleness the realistic way: an artifact saved again under the same name with other
weights (v2), so that clients adapted from v1 are on an older meta-model version."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from models.checkpoint import MetaModel


def perturbed_copy(source: Path, target: Path, *, seed: int = 7, scale: float = 0.05) -> str:
    """Copy the artifact directory ``source`` to ``target`` with its weights perturbed
    (same name and config); the new version's sha256."""
    model = MetaModel.load(source)
    generator = torch.Generator().manual_seed(seed)
    params = {
        name: tensor + scale * torch.randn(tensor.shape, generator=generator)
        for name, tensor in model.params.items()
    }
    if target.exists():
        shutil.rmtree(target)
    changed = MetaModel(model.config, params, model.lrs, version="")
    return changed.save(target)


def models_dir_with(root: Path, artifacts: dict[str, Path]) -> Path:
    """A models directory holding ``artifacts`` (name -> artifact directory), copied."""
    root.mkdir(parents=True, exist_ok=True)
    for name, path in artifacts.items():
        shutil.copytree(path, root / name)
    return root
