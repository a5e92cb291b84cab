"""The process's torch threads (the device itself is resolved by ``models.device``)."""

from __future__ import annotations

import contextlib

import torch


def configure_threads(threads: int) -> None:
    """Torch's intra-op threads for the whole process (the worker is its only big user)."""
    torch.set_num_threads(threads)
    # settable once, before the first parallel work; otherwise keep what is there
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)  # the worker never runs ops in parallel
