"""The Omniglot family: N-way K-shot classification of handwritten characters.

Data: the two background zips in ``../shared/data/omniglot/`` (8 distinct alphabets;
Greek and Latin are in both zips byte for byte and are loaded once). Whole alphabets are
held out (``HELD_OUT``), so held-out characters come from scripts never trained on.
Training classes are (character, rotation by 0/90/180/270 degrees); held-out classes
are the unrotated characters.

``preprocess`` is the one function that turns a grayscale image of any size into the
model's input: training calls it on the decoded PNGs, the service on uploads.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.tasks import Episode
from models.tasks.png import decode_gray

SIZE = 28
INPUT_SHAPE = (1, SIZE, SIZE)
MAX_WAY = 20  # head outputs: one artifact serves any N in 2..MAX_WAY
MAX_SHOT = 10
ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
# The two alphabets with the fewest characters (39 of 242), so training keeps the most.
HELD_OUT = ("Early_Aramaic", "Tagalog")
OUTPUT = "logits over max_way classes; class i is the i-th label of the support set"

PREPROCESS: dict[str, Any] = {
    "function": "models.tasks.omniglot.preprocess",
    "input": "grayscale array (H, W) of any size, uint8 0..255 or float 0..1, white paper",
    "pad_to_square": "centred, with the background value (white)",
    "resize": f"{SIZE}x{SIZE}, torch area interpolation (antialiased)",
    "value": "ink = 1 - gray / 255, so strokes are 1 and paper is 0",
}


# -- preprocessing ------------------------------------------------------------------------
def preprocess(image: Tensor | np.ndarray) -> Tensor:
    """Grayscale image(s) of any size -> model input.

    image: (H, W) or (B, H, W), uint8 in 0..255 or float in 0..1, dark strokes on white.
    Returns float32 (1, 28, 28) or (B, 1, 28, 28) with ink = 1, paper = 0.
    """
    x = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image)
    single = x.dim() == 2
    if x.dim() not in (2, 3):
        raise ValueError(f"expected a (H, W) or (B, H, W) grayscale image, got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float().clamp(0.0, 1.0)
    ink = 1.0 - x  # (B?, H, W)
    if single:
        ink = ink.unsqueeze(0)
    h, w = ink.shape[-2:]
    if h != w:  # pad to a square with paper (0 ink), centred
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        ink = F.pad(ink, (left, side - w - left, top, side - h - top))
    out = F.interpolate(ink.unsqueeze(1), size=(SIZE, SIZE), mode="area")  # (B, 1, 28, 28)
    return out[0] if single else out


# -- loading ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Omniglot:
    """All characters: ``images`` (C, 20, 1, 28, 28) float, one alphabet name per character."""

    images: Tensor  # (C, 20, 1, 28, 28)
    alphabets: tuple[str, ...]  # (C,) alphabet of each character
    characters: tuple[str, ...]  # (C,) "alphabet/characterNN"
    raw_files: int  # PNG files read across both zips, duplicates included

    def indices(self, alphabets: tuple[str, ...] | list[str], keep: bool = True) -> list[int]:
        chosen = set(alphabets)
        return [i for i, a in enumerate(self.alphabets) if (a in chosen) == keep]


def read_pngs(root: str | Path) -> tuple[dict[str, dict[str, list[bytes]]], int]:
    """{alphabet: {character: [png bytes sorted by file name]}}, de-duplicated, and the raw
    number of PNG files. A character found in both zips must be byte-identical."""
    out: dict[str, dict[str, dict[str, bytes]]] = {}
    raw = 0
    for name in ZIPS:
        with zipfile.ZipFile(Path(root) / name) as zf:
            for entry in sorted(zf.namelist()):
                parts = entry.split("/")
                if len(parts) != 4 or not parts[3].endswith(".png"):
                    continue
                raw += 1
                _, alphabet, character, fname = parts
                data = zf.read(entry)
                files = out.setdefault(alphabet, {}).setdefault(character, {})
                if fname in files and files[fname] != data:
                    raise ValueError(f"{alphabet}/{character}/{fname} differs between the zips")
                files[fname] = data
    result = {
        a: {c: [files[f] for f in sorted(files)] for c, files in sorted(chars.items())}
        for a, chars in sorted(out.items())
    }
    return result, raw


def load(root: str | Path) -> Omniglot:
    """Decode and preprocess every distinct image (a few seconds)."""
    pngs, raw = read_pngs(root)
    images: list[Tensor] = []
    alphabets: list[str] = []
    characters: list[str] = []
    for alphabet, chars in pngs.items():
        for character, files in chars.items():
            if len(files) != 20:
                raise ValueError(f"{alphabet}/{character}: {len(files)} drawings, expected 20")
            gray = np.stack([decode_gray(d) for d in files])  # (20, 105, 105) uint8
            images.append(preprocess(gray))  # (20, 1, 28, 28)
            alphabets.append(alphabet)
            characters.append(f"{alphabet}/{character}")
    return Omniglot(torch.stack(images), tuple(alphabets), tuple(characters), raw)


@dataclass(frozen=True)
class Split:
    """Classes to sample from: ``images`` (C, 20, 1, 28, 28), names for the record."""

    images: Tensor
    names: tuple[str, ...]

    @property
    def classes(self) -> int:
        return int(self.images.shape[0])


def rotations(images: Tensor) -> Tensor:
    """(C, 20, 1, 28, 28) -> (4C, 20, 1, 28, 28): each character rotated by k * 90 degrees."""
    return torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])


def split(data: Omniglot, held_out: tuple[str, ...] = HELD_OUT) -> tuple[Split, Split]:
    """(train, test): train = characters of the other alphabets x 4 rotations,
    test = the held-out alphabets' characters, unrotated."""
    train_idx = data.indices(held_out, keep=False)
    test_idx = data.indices(held_out, keep=True)
    train_names = tuple(f"{data.characters[i]}@{90 * k}" for k in range(4) for i in train_idx)
    train = Split(rotations(data.images[train_idx]), train_names)
    test = Split(data.images[test_idx], tuple(data.characters[i] for i in test_idx))
    return train, test


def split_record(data: Omniglot, held_out: tuple[str, ...] = HELD_OUT) -> dict[str, Any]:
    """The ``split`` block of the artifact's task config."""
    train = sorted(set(data.alphabets) - set(held_out))
    return {
        "held_out_alphabets": sorted(held_out),
        "train_alphabets": train,
        "train_characters": len(data.indices(held_out, keep=False)),
        "held_out_characters": len(data.indices(held_out, keep=True)),
        "train_rotations": [0, 90, 180, 270],
    }


# -- episodes -----------------------------------------------------------------------------
def sample(
    g: torch.Generator, split: Split, tasks: int, way: int, shot: int, queries: int
) -> Episode:
    """``tasks`` N-way K-shot tasks with ``queries`` query images per class.

    Labels 0..way-1 are assigned to randomly drawn classes; xs (B, N*K, 1, 28, 28),
    ys (B, N*K), xq (B, N*Q, 1, 28, 28), yq (B, N*Q); all weights are 1; classes (B, N)
    holds the split's index of each label's class.
    """
    if not 1 <= way <= split.classes:
        raise ValueError(f"way {way} outside 1..{split.classes}")
    drawings = split.images.shape[1]
    if shot + queries > drawings:
        raise ValueError(f"shot + queries = {shot + queries} > {drawings} drawings per class")
    xs, xq, drawn = [], [], []
    for _ in range(tasks):
        classes = torch.randperm(split.classes, generator=g)[:way]  # (N,)
        drawn.append(classes)
        order = torch.argsort(torch.rand(way, drawings, generator=g), dim=1)
        picked = split.images[classes.unsqueeze(1), order[:, : shot + queries]]  # (N, K+Q, ...)
        xs.append(picked[:, :shot].reshape(way * shot, *INPUT_SHAPE))
        xq.append(picked[:, shot:].reshape(way * queries, *INPUT_SHAPE))
    labels = torch.arange(way)
    ys = labels.repeat_interleave(shot).expand(tasks, -1)
    yq = labels.repeat_interleave(queries).expand(tasks, -1)
    return Episode(
        xs=torch.stack(xs),
        ys=ys.contiguous(),
        ws=torch.ones(tasks, way * shot),
        xq=torch.stack(xq),
        yq=yq.contiguous(),
        wq=torch.ones(tasks, way * queries),
        classes=torch.stack(drawn),
    )


def augment(g: torch.Generator, x: Tensor, shift: float, scale: float, rotate: float) -> Tensor:
    """Small random affine warps of a batch (B, 1, 28, 28) for training: translation up to
    ``shift`` (fraction of the half-width), zoom in 1 +- ``scale``, rotation +- ``rotate``
    radians. Ink outside the frame is 0 (paper). The warps are drawn from ``g`` (a CPU
    generator, so a seed gives the same warps on any device) and applied on ``x``'s device."""
    b = x.shape[0]
    u = (torch.rand(b, 4, generator=g) * 2 - 1).to(x.device)  # (B, 4) in [-1, 1]
    zoom = 1.0 + scale * u[:, 0]
    angle = rotate * u[:, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift * u[:, 2]], 1), torch.stack([sin, cos, shift * u[:, 3]], 1)],
        1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
