"""One device resolver for training, evaluation and the service's engine."""

from __future__ import annotations

import os

import torch


def resolve_device(spec: str) -> torch.device:
    """``"auto"``: this process's CUDA device when CUDA is present, else the CPU.

    Under ``torchrun`` each process owns the GPU its ``LOCAL_RANK`` names, so "auto" and a
    bare "cuda" resolve to ``cuda:LOCAL_RANK`` (``cuda:0`` outside torchrun). An explicit
    "cuda..." without CUDA is refused here, before any work is done, rather than failing on
    the first tensor that moves.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available")
    if device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
