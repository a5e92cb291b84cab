"""Calibration of a classifier's probabilities: a temperature, the expected calibration
error and a reliability diagram.

A temperature ``T`` divides the logits of the classes a client uses before the softmax
(``p = softmax(z / T)``): it never changes the predicted class, only how sure the
probabilities say the model is. It is fitted by minimising the negative log-likelihood
of the adapted model's query predictions (``fit_temperature``: a 1-D convex problem in
``1 / T``), on episodes of the training split, and travels in the artifact's weights
(``models.checkpoint``: ``calibration.temperature``), so the artifact's sha256 changes
with it.

The expected calibration error (``ece``) is Guo et al.'s (2017): the queries are binned
by their top probability into 15 equal-width bins, and ECE is the query-weighted mean of
``|accuracy - mean top probability|`` over the bins. ``reliability_png`` draws the bins
(standard library + numpy only: ``models/`` may not import Pillow).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BINS = 15  # equal-width bins over the top probability
BETA_RANGE = (1e-3, 1e3)  # the inverse temperatures searched (T from 0.001 to 1000)

Group = tuple[Tensor, Tensor]  # logits (M, N) over the N classes in use, labels (M,)


# -- temperature ----------------------------------------------------------------------------
def probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Softmax of (M, N) logits over their last axis at a temperature: (M, N)."""
    return torch.softmax(logits.double() / temperature, dim=-1).to(logits.dtype)


def nll(groups: Sequence[Group], temperature: float) -> float:
    """Mean negative log-likelihood of the labels at a temperature."""
    total, count = 0.0, 0
    for logits, labels in groups:
        logp = torch.log_softmax(logits.double() / temperature, dim=-1)
        total -= float(logp.gather(1, labels.view(-1, 1)).sum())
        count += labels.numel()
    return total / max(count, 1)


def _nll_slope(groups: Sequence[Group], beta: float) -> float:
    """d NLL / d beta at beta = 1 / T: sum of E_p[z] - z_label (increasing in beta)."""
    slope = 0.0
    for logits, labels in groups:
        z = logits.double()
        p = torch.softmax(beta * z, dim=-1)
        slope += float((p * z).sum() - z.gather(1, labels.view(-1, 1)).sum())
    return slope


def fit_temperature(groups: Sequence[Group], iterations: int = 100) -> float:
    """The temperature minimising the NLL of ``groups``.

    The NLL is convex in beta = 1 / T (its second derivative is the variance of the
    logits under p), so its slope is increasing: bisection on the slope, in log beta,
    finds the minimum to float precision. Groups may have different numbers of classes.
    """
    lo, hi = (math.log(b) for b in BETA_RANGE)
    if _nll_slope(groups, math.exp(lo)) >= 0:  # the flattest allowed is best
        return 1.0 / math.exp(lo)
    if _nll_slope(groups, math.exp(hi)) <= 0:  # separable: the sharpest allowed is best
        return 1.0 / math.exp(hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if _nll_slope(groups, math.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
    return 1.0 / math.exp(0.5 * (lo + hi))


# -- expected calibration error -------------------------------------------------------------
@dataclass(frozen=True)
class Reliability:
    """Per bin: the queries in it, their mean top probability and their accuracy."""

    counts: list[int]  # (BINS,)
    confidence: list[float]  # (BINS,) mean top probability (NaN for an empty bin)
    accuracy: list[float]  # (BINS,) share of correct predictions (NaN for an empty bin)

    @property
    def ece(self) -> float:
        total = sum(self.counts)
        return sum(
            n / total * abs(a - c)
            for n, a, c in zip(self.counts, self.accuracy, self.confidence, strict=True)
            if n > 0
        )


def reliability(confidence: Tensor, correct: Tensor, bins: int = BINS) -> Reliability:
    """Bin (M,) top probabilities and (M,) correctness into ``bins`` equal-width bins over
    [0, 1]: bin i holds (i / bins, (i + 1) / bins], the first also holds 0."""
    conf = confidence.double().flatten()
    ok = correct.double().flatten()
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)  # (M,)
    counts = torch.bincount(index, minlength=bins)
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, ok)
    n = counts.double()
    nan = torch.full_like(n, math.nan)
    return Reliability(
        counts.tolist(),
        torch.where(n > 0, sums / n.clamp_min(1), nan).tolist(),
        torch.where(n > 0, hits / n.clamp_min(1), nan).tolist(),
    )


def ece(confidence: Tensor, correct: Tensor, bins: int = BINS) -> float:
    """The expected calibration error over ``bins`` equal-width bins of top probability."""
    return reliability(confidence, correct, bins).ece


# -- the reliability diagram ----------------------------------------------------------------
# A 3x5 bitmap font for the panels' titles: "#" is ink.
_GLYPHS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"],
    "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"],
    "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"],
    "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"],
    "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"],
    "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."],
    "%": ["#.#", "..#", ".#.", "#..", "#.#"],
    "=": ["...", "###", "...", "###", "..."],
    " ": ["...", "...", "...", "...", "..."],
    "-": ["...", "...", "###", "...", "..."],
    "A": [".#.", "#.#", "###", "#.#", "#.#"],
    "C": ["###", "#..", "#..", "#..", "###"],
    "E": ["###", "#..", "##.", "#..", "###"],
    "H": ["#.#", "#.#", "###", "#.#", "#.#"],
    "I": ["###", ".#.", ".#.", ".#.", "###"],
    "K": ["#.#", "##.", "#..", "##.", "#.#"],
    "L": ["#..", "#..", "#..", "#..", "###"],
    "N": ["##.", "#.#", "#.#", "#.#", "#.#"],
    "O": ["###", "#.#", "#.#", "#.#", "###"],
    "S": [".##", "#..", ".#.", "..#", "##."],
    "T": ["###", ".#.", ".#.", ".#.", ".#."],
    "W": ["#.#", "#.#", "###", "###", "#.#"],
}
WHITE, INK, GRID = (255, 255, 255), (20, 20, 20), (200, 200, 200)
BAR, GAP = (70, 110, 200), (230, 120, 110)


def _text(img: np.ndarray, text: str, x: int, y: int, scale: int = 2) -> None:
    for ch in text.upper():
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for row, line in enumerate(glyph):
            for col, cell in enumerate(line):
                if cell == "#":
                    top, left = y + row * scale, x + col * scale
                    img[top : top + scale, left : left + scale] = INK
        x += 4 * scale


def _panel(rel: Reliability, title: str, size: int) -> np.ndarray:
    """One panel: accuracy bars per bin (blue), the gap to the bin's mean top probability
    (red), the diagonal of perfect calibration, a frame; the title above."""
    pad, head = 10, 24
    img = np.full((size + head + 2 * pad, size + 2 * pad, 3), WHITE, dtype=np.uint8)
    _text(img, title, pad, 6)
    top, left = head + pad, pad

    def y_of(v: float) -> int:  # probability -> row, 1 at the top
        return top + round((1.0 - v) * (size - 1))

    bins = len(rel.counts)
    for i in range(bins):
        x0 = left + (i * size) // bins
        x1 = left + ((i + 1) * size) // bins - 1
        img[top : top + size, x0] = GRID
        if rel.counts[i] == 0:
            continue
        acc, conf = rel.accuracy[i], rel.confidence[i]
        img[y_of(acc) : top + size, x0 + 1 : x1] = BAR
        lo, hi = sorted((y_of(acc), y_of(conf)))
        img[lo : hi + 1, x0 + 1 : x1] = GAP
    for k in range(size):  # the diagonal
        img[y_of(k / (size - 1)), left + k] = INK
    img[top, left : left + size] = INK  # the frame
    img[top + size - 1, left : left + size] = INK
    img[top : top + size, left] = INK
    img[top : top + size, left + size - 1] = INK
    return img


def reliability_png(rows: Sequence[Sequence[tuple[str, Reliability]]], size: int = 240) -> bytes:
    """Reliability diagrams, one panel per (title, bins), in rows: x is the top probability,
    y the accuracy; bars below the diagonal are over-confident, above it under-confident."""
    strips = [
        np.concatenate([_panel(rel, t, size) for t, rel in row], axis=1) for row in rows if row
    ]
    if not strips:
        raise ValueError("no panels to draw")
    width = max(s.shape[1] for s in strips)
    padded = [
        np.concatenate([s, np.full((s.shape[0], width - s.shape[1], 3), 255, np.uint8)], axis=1)
        for s in strips
    ]
    return encode_png(np.concatenate(padded, axis=0))


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, no filter, zlib)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )
