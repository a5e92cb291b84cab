"""Meta-model versions for registry tests: a copy of an artifact with perturbed weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from models.checkpoint import MetaModel


def perturbed(source: Path, out: Path, *, delta: float = 0.05) -> MetaModel:
    """A copy of the artifact at ``source`` (same name and config) with every weight moved
    by ``delta``: a new version, saved under ``out`` (a new sha)."""
    model = MetaModel.load(source)
    params = {n: t + delta for n, t in model.params.items()}
    copy = MetaModel(model.config, params, model.lrs, version="")
    if out.exists():
        shutil.rmtree(out)
    copy.save(out)
    return MetaModel.load(out)


def same_bits(a: list[float], b: list[float]) -> bool:
    """Equal as float32 bit patterns (no tolerance)."""
    return bool(torch.equal(torch.tensor(a).view(torch.int32), torch.tensor(b).view(torch.int32)))
