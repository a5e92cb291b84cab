"""The engine's device and the process's torch threads."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(spec: str) -> torch.device:
    """ "auto" -> CUDA when present, else the CPU; otherwise a torch device string."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available")
    return device


def configure_threads(threads: int) -> None:
    """Torch's intra-op threads for the whole process (the worker is its only big user)."""
    torch.set_num_threads(threads)
    # settable once, before the first parallel work; otherwise keep what is there
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)  # the worker never runs ops in parallel
