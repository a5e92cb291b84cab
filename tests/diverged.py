"""An artifact as a diverged meta-training wrote it before issue 20: every weight NaN,
its files written one by one (``MetaModel.save`` refuses such weights now)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import CONFIG_FILE, DIGEST_FILE, LR_PREFIX, WEIGHTS_FILE, MetaModel
from models.params import sha256, to_bytes


def write_diverged(source: Path, out: Path) -> str:
    """The artifact at ``source`` with NaN weights, written under ``out``: its sha256."""
    model = MetaModel.load(source)
    params = {n: torch.full_like(t, float("nan")) for n, t in model.params.items()}
    data = to_bytes({**params, **{LR_PREFIX + n: t for n, t in model.lrs.items()}})
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).write_bytes(data)
    (out / DIGEST_FILE).write_text(sha256(data) + "\n")
    (out / CONFIG_FILE).write_text(model.config.to_json())
    return sha256(data)
