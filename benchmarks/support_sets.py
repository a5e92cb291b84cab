"""Sinusoid support sets for the benchmarks, as the clients in benchmarks/wrk send them.

Kept apart from ``benchmarks.clients`` (which stores clients in a database) so the
in-process benchmark runs with torch alone, e.g. on a GPU machine without the server's
packages."""

from __future__ import annotations

import torch

from models.tasks import sinusoid as sinusoids

SHOTS, STEPS = 10, 10  # as benchmarks/wrk/adapt.lua
Support = tuple[list[list[float]], list[float]]


def supports(count: int, seed: int = 0) -> list[Support]:
    """``count`` 10-point support sets of random sinusoids (Finn et al.'s ranges)."""
    ep = sinusoids.sample(torch.Generator().manual_seed(seed), count, SHOTS, SHOTS, 1)
    return [(ep.xs[i].tolist(), ep.ys[i].flatten().tolist()) for i in range(count)]
