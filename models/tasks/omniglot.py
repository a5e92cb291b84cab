"""The Omniglot family: N-way K-shot classification of handwritten characters.

Data: the background zips in ``../shared/data/omniglot/``, whichever of ``ZIPS`` are
there: the full background set (30 alphabets, 964 characters) and its two small subsets
(8 alphabets; every file found in more than one zip must be byte-identical and is loaded
once). Whole alphabets are held out, so held-out characters come from scripts never
trained on: ``HELD_OUT`` (6 alphabets, by a seeded rule fixed before any result) when the
data holds the full set, else ``SMALL_HELD_OUT`` (the two smallest of the 8). Training
classes are (character, rotation by 0/90/180/270 degrees); held-out classes are the
unrotated characters.

``preprocess`` is the one function that turns a grayscale image of any size into the
model's input: training calls it on the decoded PNGs, the service on uploads.

The recipe (``fastadapt train omniglot``) runs the image stages of
``models.train.stages`` on a Conv4: supervised pre-training of the body (``--epochs``),
optionally prototypical fine-tuning (``--proto-episodes``; ``--init DIR`` starts the body
from an artifact's instead of stage 1), then ANIL meta-training (``--iterations``). The
meta-test (``fastadapt eval omniglot``) adapts to N-way K-shot tasks of the held-out
alphabets through ``MetaModel.adapt`` + ``predict``, exactly as the service serves them:
within-alphabet 20-way 1-shot episodes built like Lake et al.'s runs, and N-way K-shot
episodes across the held-out alphabets, each with a 95% interval and the expected
calibration error, and writes a reliability diagram (``models.calibration``). The artifact's
softmax temperature is fitted on the training split's episodes (unrotated characters).
"""

from __future__ import annotations

import argparse
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import calibration, nets
from models.augment import SupportShifts
from models.checkpoint import ArtifactConfig, MetaModel, TrainedFor
from models.evaluate import load_artifact, mean_ci95
from models.maml import LOSSES, InnerLoopConfig, LearnedLr, Learner
from models.params import Params
from models.tasks import Episode, Family
from models.tasks.png import decode_gray
from models.train import options
from models.train.loop import MetaTrainConfig, Stage, Trainer
from models.train.stages import (
    AnilStage,
    EpisodeShape,
    PrototypicalConfig,
    PrototypicalStage,
    SupervisedConfig,
    SupervisedStage,
    body_parameters,
)

NAME = "omniglot"
SIZE = 28
INPUT_SHAPE = (1, SIZE, SIZE)
MAX_WAY = 20  # head outputs: one artifact serves any N in 2..MAX_WAY
MAX_SHOT = 10
# Read whichever are present; the small two are byte-for-byte subsets of the first.
ZIPS = ("images_background.zip", "images_background_small1.zip", "images_background_small2.zip")
DRAWERS = 20  # drawings per character, one per drawer; index i is drawer i + 1 (file "_NN")
# The held-out alphabets of the full background set, chosen before any result by the rule
# HELD_OUT_RULE (tests re-derive it): every alphabet holds a within-alphabet 20-way run.
HELD_OUT_RULE = "random.Random(13).sample(sorted(alphabets with at least 20 characters), 6), sorted"
HELD_OUT = (
    "Balinese",
    "Burmese_(Myanmar)",
    "Cyrillic",
    "Malay_(Jawi_-_Arabic)",
    "Mkhedruli_(Georgian)",
    "Sanskrit",
)
# With only the two small zips (8 alphabets): the two with the fewest characters (39 of
# 242), so training keeps the most (the shipped artifact's split).
SMALL_HELD_OUT = ("Early_Aramaic", "Tagalog")
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

    images: Tensor  # (C, 20, 1, 28, 28): drawing i of each character is drawer i + 1's
    alphabets: tuple[str, ...]  # (C,) alphabet of each character
    characters: tuple[str, ...]  # (C,) "alphabet/characterNN"
    raw_files: int  # PNG files read across the zips, duplicates included

    def indices(self, alphabets: tuple[str, ...] | list[str], keep: bool = True) -> list[int]:
        chosen = set(alphabets)
        return [i for i, a in enumerate(self.alphabets) if (a in chosen) == keep]


def present_zips(root: str | Path) -> list[Path]:
    """The zips of ``ZIPS`` found under ``root`` (at least one)."""
    found = [Path(root) / name for name in ZIPS if (Path(root) / name).exists()]
    if not found:
        raise FileNotFoundError(f"{root}: none of {', '.join(ZIPS)}")
    return found


def read_pngs(root: str | Path) -> tuple[dict[str, dict[str, list[bytes]]], int]:
    """{alphabet: {character: [png bytes sorted by file name]}}, de-duplicated, and the raw
    number of PNG files. A file found in more than one zip must be byte-identical."""
    out: dict[str, dict[str, dict[str, bytes]]] = {}
    raw = 0
    for path in present_zips(root):
        with zipfile.ZipFile(path) as zf:
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
            if len(files) != DRAWERS:
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
    names: tuple[str, ...]  # "alphabet/characterNN", with "@90" etc. for a rotation

    @property
    def classes(self) -> int:
        return int(self.images.shape[0])

    def by_alphabet(self, least: int = 1) -> dict[str, list[int]]:
        """Class indices of each alphabet holding at least ``least`` classes."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault(name.split("/")[0], []).append(i)
        return {a: idx for a, idx in sorted(groups.items()) if len(idx) >= least}


def rotations(images: Tensor) -> Tensor:
    """(C, 20, 1, 28, 28) -> (4C, 20, 1, 28, 28): each character rotated by k * 90 degrees."""
    return torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])


def default_held_out(data: Omniglot) -> tuple[str, ...]:
    """``HELD_OUT`` when the data holds all of them (the full set), else ``SMALL_HELD_OUT``."""
    return HELD_OUT if set(HELD_OUT) <= set(data.alphabets) else SMALL_HELD_OUT


def check_held_out(data: Omniglot, held_out: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(held_out) - set(data.alphabets))
    if unknown or not held_out:
        raise ValueError(f"held-out alphabets {unknown or '(none)'} are not in the data")
    return tuple(sorted(held_out))


def split(data: Omniglot, held_out: Sequence[str] | None = None) -> tuple[Split, Split]:
    """(train, test): train = characters of the other alphabets x 4 rotations,
    test = the held-out alphabets' characters, unrotated."""
    held_out = check_held_out(data, default_held_out(data) if held_out is None else held_out)
    train_idx = data.indices(held_out, keep=False)
    test_idx = data.indices(held_out, keep=True)
    train_names = tuple(f"{data.characters[i]}@{90 * k}" for k in range(4) for i in train_idx)
    train = Split(rotations(data.images[train_idx]), train_names)
    test = Split(data.images[test_idx], tuple(data.characters[i] for i in test_idx))
    return train, test


def upright_train(data: Omniglot, held_out: Sequence[str]) -> Split:
    """The training alphabets' characters, unrotated: what the temperature is fitted on."""
    idx = data.indices(tuple(held_out), keep=False)
    return Split(data.images[idx], tuple(data.characters[i] for i in idx))


def split_record(data: Omniglot, held_out: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``split`` block of the artifact's task config."""
    held_out = check_held_out(data, default_held_out(data) if held_out is None else held_out)
    train = sorted(set(data.alphabets) - set(held_out))
    rule = HELD_OUT_RULE if tuple(held_out) == HELD_OUT else "given"
    if tuple(held_out) == SMALL_HELD_OUT:
        rule = "the two alphabets of the small zips with the fewest characters"
    return {
        "held_out_alphabets": sorted(held_out),
        "held_out_rule": rule,
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


def sample_within(
    g: torch.Generator, split: Split, tasks: int, way: int, shot: int, queries: int
) -> Episode:
    """``tasks`` within-alphabet N-way K-shot tasks, built like Lake et al.'s one-shot runs.

    Each task draws one alphabet (uniformly among those with at least ``way`` characters),
    ``way`` of its characters, and drawers: the support drawings of every class come from
    the same ``shot`` drawers, the queries from ``queries`` other drawers (one drawer each,
    shared by every class), so no query is drawn by a support drawer. Lake's runs are
    ``way=20, shot=1, queries=1``. Shapes and labels as ``sample``.
    """
    eligible = list(split.by_alphabet(least=way).values())
    if not eligible:
        raise ValueError(f"no alphabet of the split has {way} characters")
    drawings = split.images.shape[1]
    if shot + queries > drawings:
        raise ValueError(f"shot + queries = {shot + queries} > {drawings} drawers")
    xs, xq, drawn = [], [], []
    for _ in range(tasks):
        members = eligible[int(torch.randint(len(eligible), (1,), generator=g))]
        pick = torch.randperm(len(members), generator=g)[:way]
        classes = torch.tensor(members)[pick]  # (N,)
        drawers = torch.randperm(drawings, generator=g)[: shot + queries]  # (K+Q,)
        picked = split.images[classes.unsqueeze(1), drawers.unsqueeze(0)]  # (N, K+Q, ...)
        drawn.append(classes)
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


# -- meta-training ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipeConfig:
    channels: int = 64  # Conv4 width
    readout: str = "map"  # the served body's features: see nets.Conv4 (stage 1 uses "pool")
    shift: float = 0.1  # affine augmentation: translation (fraction of half-width)
    zoom: float = 0.1  # ... zoom 1 +- zoom
    rotate: float = 0.17  # ... rotation +- radians (about 10 degrees)
    # stage 1: supervised pre-training of the body
    epochs: int = 40  # passes over the training characters x rotations
    batch: int = 128
    lr: float = 2e-3  # Adam, cosine-annealed to 0
    label_smoothing: float = 0.1
    cosine_scale: float = 16.0  # fixed temperature of the cosine classifier
    validate_every_epochs: int = 5
    # stage 1b: prototypical-network fine-tuning of the served body (0 episodes: skipped)
    proto_episodes: int = 0
    proto_lr: float = 5e-4  # Adam, cosine-annealed to 0
    proto_min_way: int = 20
    proto_max_way: int = 60
    proto_queries: int = 5  # query images per class
    proto_scale: float = 10.0  # initial temperature (learned)
    proto_validate_every: int = 200  # episodes
    init: str | None = None  # start the body from this artifact's body (skip stage 1)
    # stage 2: ANIL meta-training
    iterations: int = 400  # meta-iterations
    meta_batch: int = 4  # tasks per meta-iteration
    meta_lr: float = 2e-4  # Adam on the body, cosine-annealed to meta_lr_min
    meta_lr_min: float = 0.0
    rate_lr: float | None = 0.1  # Adam on the learned inner rates (not annealed)
    clip: float | None = None  # max norm of the meta-gradient (None: off)
    first_order_until: float = 0.0  # fraction of stage 2 run first-order
    validate_every: int = 100  # meta-iterations
    max_train_shot: int = 5
    queries: int = 5  # query images per class in training episodes
    inner_steps: int = 10
    inner_lr: float = 5.0  # initial inner step size (unit features; 20+ diverges early on)
    learned_lr: LearnedLr = "per_layer_per_step"
    first_order: bool = False
    inner_grad_clip: float | None = None
    support_shifts: int = 0  # > 0: support sets gain copies shifted this many pixels
    support_max_images: int = 100  # ... when they stay within this many images (augment.py)
    # validation: 20-way 1-shot on the held-out alphabets through the served path
    val_tasks: int = 100
    held_out: tuple[str, ...] | None = None  # None: HELD_OUT on the full set, else SMALL_HELD_OUT
    # calibration: the artifact's softmax temperature, fitted on the training split
    calibration_tasks: int = 100  # episodes per protocol of CALIBRATION_PROTOCOLS (0: none)


RECIPE = RecipeConfig()


def architecture(cfg: RecipeConfig, readout: str | None = None) -> dict[str, Any]:
    return {
        "kind": "conv4",
        "channels": cfg.channels,
        "out_features": MAX_WAY,
        "readout": cfg.readout if readout is None else readout,
    }


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    r = RECIPE
    p.add_argument("--data", required=True, help="folder with the Omniglot background zips")
    p.add_argument("--epochs", type=int, default=r.epochs, help="stage 1 epochs (0: skip)")
    p.add_argument(
        "--validate-every-epochs", type=int, default=r.validate_every_epochs, help="stage 1"
    )
    p.add_argument(
        "--proto-episodes",
        type=int,
        default=r.proto_episodes,
        help="stage 1b: prototypical-network episodes (0: skip)",
    )
    p.add_argument("--proto-lr", type=float, default=r.proto_lr, help="stage 1b Adam step size")
    p.add_argument("--proto-min-way", type=int, default=r.proto_min_way, help="stage 1b")
    p.add_argument("--proto-max-way", type=int, default=r.proto_max_way, help="stage 1b")
    p.add_argument(
        "--proto-validate-every", type=int, default=r.proto_validate_every, help="stage 1b"
    )
    p.add_argument("--init", help="start the body from this artifact's body (use --epochs 0)")
    p.add_argument("--channels", type=int, default=r.channels, help="Conv4 width")
    p.add_argument(
        "--readout", choices=["pool", "map"], default=r.readout, help="served body's features"
    )
    p.add_argument("--shift", type=float, default=r.shift, help="augmentation: translation")
    p.add_argument("--zoom", type=float, default=r.zoom, help="augmentation: zoom 1 +- this")
    p.add_argument("--rotate", type=float, default=r.rotate, help="augmentation: radians")
    p.add_argument("--val-tasks", type=int, default=r.val_tasks, help="20-way 1-shot tasks")
    p.add_argument(
        "--held-out",
        type=alphabet_list,
        default=r.held_out,
        metavar="A,B,...",
        help="alphabets never trained on (default: the full set's 6 by a fixed rule, or the "
        "small zips' 2)",
    )
    p.add_argument(
        "--calibration-tasks",
        type=int,
        default=r.calibration_tasks,
        help="fit the softmax temperature on this many training-split episodes per "
        "protocol (5/20-way, 1/5-shot) once trained (0: none)",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        help="stop at the last checkpoint that fits in this many minutes (exit 75); "
        "--resume continues",
    )
    p.add_argument(
        "--support-shifts",
        type=int,
        default=r.support_shifts,
        metavar="PIXELS",
        help="stage 2 and serving: add support copies shifted this far (0: off; augment.py)",
    )
    p.add_argument(
        "--support-max-images",
        type=int,
        default=r.support_max_images,
        help="... only for support sets that stay within this many images",
    )


def alphabet_list(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def recipe(args: argparse.Namespace) -> RecipeConfig:
    given = {f.name: getattr(args, f.name) for f in fields(RecipeConfig) if hasattr(args, f.name)}
    return RecipeConfig(**given)


class Recipe:
    """The stages on one Conv4 body, and the artifact they produce."""

    def __init__(self, cfg: RecipeConfig, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.cfg = cfg
        meta = options.meta_config(args)  # (sets the torch threads too)
        device = options.device(args)
        data = load(args.data)
        held = check_held_out(data, cfg.held_out or default_held_out(data))
        self.train, self.val = split(data, held)
        self.upright = upright_train(data, held)  # what the temperature is fitted on
        self.seed = args.seed
        self.task: dict[str, Any] = {
            "kind": "classification",
            "input_shape": list(INPUT_SHAPE),
            "max_way": MAX_WAY,
            "max_shot": MAX_SHOT,
            "output": OUTPUT,
            "preprocess": PREPROCESS,
            "split": split_record(data, held),
        }
        shifts = None
        if cfg.support_shifts > 0:
            shifts = SupportShifts(cfg.support_shifts, cfg.support_max_images)
            self.task["support_shifts"] = shifts.to_dict()
        self.training: dict[str, Any] = {
            "command": options.command(FAMILY, argv),
            "seed": args.seed,
            "recipe": asdict(cfg),
        }
        torch.manual_seed(args.seed)
        g = torch.Generator().manual_seed(args.seed)

        def warp(x: Tensor) -> Tensor:
            return augment(g, x.to(device), cfg.shift, cfg.zoom, cfg.rotate)

        def episodes(tasks: int, way: int, shot: int, queries: int) -> Episode:
            return sample(g, self.train, tasks, way, shot, queries)

        # stage 1 trains the body through the pooled readout; the served net (same body
        # modules, the configured readout) is what stage 2 meta-trains and the artifact holds
        self.net = cast(nets.Conv4, nets.build(architecture(cfg, "pool")).to(device))
        with torch.no_grad():
            self.net.head.weight.zero_()
            self.net.head.bias.zero_()
        self.net.head.requires_grad_(False)
        body = body_parameters(self.net)
        images = self.train.images.reshape(-1, *INPUT_SHAPE)  # (C*20, 1, 28, 28)
        labels = torch.arange(self.train.classes).repeat_interleave(self.train.images.shape[1])
        supervised = SupervisedStage(
            self.net.body,
            self.net.features,
            body,
            images,
            labels,
            SupervisedConfig(
                cfg.epochs,
                cfg.batch,
                cfg.lr,
                cfg.label_smoothing,
                cfg.cosine_scale,
                cfg.validate_every_epochs,
            ),
            augment=warp,
            g=g,
            device=device,
            validate=lambda: self.validate(learned=False),
            snapshot=lambda: self.model(learned=False),
        )
        if cfg.init is not None:
            self.init_body(cfg.init)
        self.served = cast(nets.Conv4, nets.build(architecture(cfg)).to(device))
        for i, module in enumerate(self.served.body):
            if isinstance(module, torch.nn.Conv2d | torch.nn.GroupNorm):
                self.served.body[i] = self.net.body[i]  # shared: one set of body weights
        with torch.no_grad():  # the head starts every adaptation at zero, as served
            self.served.head.weight.zero_()
            self.served.head.bias.zero_()
        self.served.head.requires_grad_(False)
        prototypical = PrototypicalStage(
            self.served.body,
            body,
            PrototypicalConfig(
                cfg.proto_episodes,
                cfg.proto_lr,
                cfg.proto_min_way,
                cfg.proto_max_way,
                cfg.max_train_shot,
                cfg.proto_queries,
                cfg.proto_scale,
                cfg.proto_validate_every,
            ),
            episodes=episodes,
            augment=warp,
            g=g,
            device=device,
            validate=lambda: self.validate(learned=False),
            snapshot=lambda: self.model(learned=False),
        )
        self.inner = options.inner_config(args, adapt="head")
        learner = Learner(self.served, LOSSES["classification"], self.inner)
        self.anil = AnilStage(
            self.served,
            body,
            learner,
            meta,
            EpisodeShape(MAX_WAY, cfg.max_train_shot, cfg.queries),
            episodes=episodes,
            augment=warp,
            shifts=shifts,
            g=g,
            device=device,
            validate=lambda: self.validate(learned=True),
        )
        stages: list[Stage] = [supervised, prototypical, self.anil]
        self.trainer = Trainer(stages, Path(args.out), modules={"net": self.net})

    def config(self, learned: bool) -> ArtifactConfig:
        inner = self.inner if learned else replace_learned(self.inner)
        training = {**self.training, "elapsed_s": round(self.trainer.elapsed(), 1)}
        # support: the K the artifact serves (task.max_shot; stage 2 draws 1..max_train_shot)
        trained_for = TrainedFor.of(inner, support=(1, MAX_SHOT))
        return ArtifactConfig(
            NAME, NAME, architecture(self.cfg), self.task, inner, training, trained_for
        )

    def artifact(self, learned: bool) -> tuple[ArtifactConfig, Params, Params]:
        """The body, a zero head (no class favoured) and the inner rates, if learned."""
        params = {n: p.detach().clone() for n, p in self.served.named_parameters()}
        lrs = self.anil.learned_lrs() if learned else {}
        return self.config(learned), params, lrs

    def model(self, learned: bool) -> MetaModel:
        return MetaModel(*self.artifact(learned), version="")

    def validate(self, learned: bool) -> float:
        model = self.model(learned)
        accs = accuracies(model, self.val, 20, 1, self.cfg.val_tasks, 5, seed=12345)
        return float(accs.mean())

    def calibrate(self, model: MetaModel) -> MetaModel:
        """The trained artifact with its temperature fitted on the training split."""
        if self.cfg.calibration_tasks <= 0:
            return model
        fitted, record = fit_calibration(
            model, self.upright, self.cfg.calibration_tasks, self.seed + 1000
        )
        return calibrated(model, fitted, record)

    def init_body(self, directory: str) -> None:
        """Copy an artifact's body into the net (same architecture required)."""
        source = MetaModel.load(directory)
        want = ArtifactConfig(NAME, NAME, architecture(self.cfg), {}, InnerLoopConfig())
        if source.config.architecture != want.architecture:
            raise ValueError(
                f"{directory}: architecture {source.config.architecture} != {want.architecture}"
            )
        body = {n: t for n, t in source.params.items() if n.startswith("body.")}
        own = {n for n, _ in self.net.named_parameters() if n.startswith("body.")}
        if set(body) != own:
            raise ValueError(f"{directory}: body parameters {sorted(body)} != {sorted(own)}")
        with torch.no_grad():
            for n, p in self.net.named_parameters():
                if n in body:
                    p.copy_(body[n].to(p.device))
        self.training["init"] = {  # with how the init was trained: the full provenance
            "artifact": directory,
            "sha256": source.version,
            "training": source.config.training,
        }


def replace_learned(inner: InnerLoopConfig) -> InnerLoopConfig:
    """The inner loop of a snapshot taken before any rate was learned."""
    return InnerLoopConfig(**{**inner.to_dict(), "learned_lr": "none"})


def train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    run = Recipe(recipe(args), args, argv)
    learned = run.cfg.iterations > 0
    finished = options.run_and_save(
        run.trainer,
        lambda: run.artifact(learned),
        Path(args.out),
        resume=args.resume,
        budget_minutes=args.budget_minutes,
        finalize=run.calibrate,
    )
    if not finished:
        raise SystemExit(STOPPED)


# -- meta-test --------------------------------------------------------------------------------
DEFAULT_PROTOCOLS = ((5, 1), (5, 5), (20, 1), (20, 5))
STOPPED = 75  # train's exit status when --budget-minutes stopped it (EX_TEMPFAIL)
CALIBRATION_PROTOCOLS = ((5, 1), (5, 5), (20, 1), (20, 5))  # what a temperature is fitted on
Sampler = Callable[[torch.Generator, Split, int, int, int, int], Episode]


class MetaTest(NamedTuple):
    """A protocol's results: per task, per query, and the errors by character pair."""

    accs: Tensor  # (tasks,) query accuracy of each task
    errors: Counter[tuple[str, str]]  # (true, predicted) character -> errors
    logits: Tensor  # (tasks * N * Q, N) the query logits over the task's own labels
    labels: Tensor  # (tasks * N * Q,)
    unused_mass: float  # mean softmax mass of the 20 outputs on the labels a task leaves out

    def confidence(self, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """(top probability, correct) per query, the probabilities at ``temperature``."""
        probs = calibration.probabilities(self.logits, temperature)
        return probs.max(-1).values, probs.argmax(-1) == self.labels


def accuracies(
    model: MetaModel, split: Split, way: int, shot: int, tasks: int, queries: int, seed: int
) -> Tensor:
    """Per-task query accuracies (tasks,) through ``MetaModel.adapt`` + ``predict``."""
    return meta_test(model, split, way, shot, tasks, queries, seed).accs


def meta_test(
    model: MetaModel,
    split: Split,
    way: int,
    shot: int,
    tasks: int,
    queries: int,
    seed: int,
    sampler: Sampler = sample,
) -> MetaTest:
    """``tasks`` fresh tasks from ``sampler`` (``sample``: across the split's alphabets;
    ``sample_within``: one alphabet per task), adapted and predicted as the service does;
    the logits kept are the task's own labels' (the service's softmax is over those)."""
    g = torch.Generator().manual_seed(seed)
    device = str(next(iter(model.params.values())).device)
    accs, kept, mass = [], [], []
    errors: Counter[tuple[str, str]] = Counter()
    for _ in range(tasks):
        ep = sampler(g, split, 1, way, shot, queries)
        assert ep.classes is not None  # the samplers record each label's class
        classes = ep.classes[0].tolist()  # (N,)
        ep = ep.to(device)
        fast = model.adapt(ep.xs[0], ep.ys[0]).fast  # support (N*K, 1, 28, 28), labels (N*K,)
        every = model.predict(fast, ep.xq[0])  # (N*Q, max_way)
        mass.append(1 - torch.softmax(every.double(), -1)[:, :way].sum(-1).mean())
        logits = every[:, :way]  # (N*Q, N): the task's own labels
        predicted = logits.argmax(-1)
        accs.append((predicted == ep.yq[0]).float().mean())
        kept.append(logits.cpu())
        wrong = (predicted != ep.yq[0]).nonzero().flatten().tolist()
        for t, p in zip(ep.yq[0][wrong].tolist(), predicted[wrong].tolist(), strict=True):
            errors[split.names[classes[t]], split.names[classes[p]]] += 1
    labels = torch.arange(way).repeat_interleave(queries).repeat(tasks)
    unused = float(torch.stack(mass).mean())
    return MetaTest(torch.stack(accs).cpu(), errors, torch.cat(kept), labels, unused)


def fit_calibration(
    model: MetaModel, train: Split, tasks: int, seed: int, queries: int = 5
) -> tuple[float, dict[str, Any]]:
    """The softmax temperature minimising the NLL of the adapted model's query predictions
    (over each task's own labels, as served) on ``tasks`` episodes of each of
    ``CALIBRATION_PROTOCOLS`` from ``train`` (the training alphabets, unrotated), and the
    record of how it was fitted (for ``config.json``)."""
    groups = []
    for i, (way, shot) in enumerate(CALIBRATION_PROTOCOLS):
        result = meta_test(model, train, way, shot, tasks, queries, seed + i)
        groups.append((result.logits, result.labels))
    temperature = calibration.fit_temperature(groups)
    record = {
        "temperature": round(temperature, 6),
        "fitted_on": "the training alphabets' characters, unrotated",
        "protocols": [f"{w}-way {k}-shot" for w, k in CALIBRATION_PROTOCOLS],
        "tasks_per_protocol": tasks,
        "queries_per_class": queries,
        "seed": seed,
        "nll_at_1": round(calibration.nll(groups, 1.0), 6),
        "nll_fitted": round(calibration.nll(groups, temperature), 6),
        "ece_at_1": round(_pooled_ece(groups, 1.0), 6),
        "ece_fitted": round(_pooled_ece(groups, temperature), 6),
        "weights_key": "calibration.temperature",
    }
    return temperature, record


def _pooled_ece(groups: Sequence[tuple[Tensor, Tensor]], temperature: float) -> float:
    tops, hits = [], []
    for logits, labels in groups:
        probs = calibration.probabilities(logits, temperature)
        tops.append(probs.max(-1).values)
        hits.append(probs.argmax(-1) == labels)
    return calibration.ece(torch.cat(tops), torch.cat(hits))


def calibrated(model: MetaModel, temperature: float, record: dict[str, Any]) -> MetaModel:
    """A copy of ``model`` carrying ``temperature`` (its weights file, so its sha, change)."""
    config = replace(model.config, task={**model.config.task, "calibration": record})
    return MetaModel(config, model.params, model.lrs, "", temperature)


def confusion_table(errors: Counter[tuple[str, str]], queries: int, top: int) -> str:
    """The ``top`` (true, predicted) character pairs by errors, as a markdown table."""
    total = sum(errors.values())
    lines = [
        f"{total} errors in {queries} queries; the {top} most frequent confusions:",
        "| true | predicted | errors | share of errors |",
        "|---|---|---:|---:|",
    ]
    for (true, predicted), n in errors.most_common(top):
        lines.append(f"| {true} | {predicted} | {n} | {100 * n / max(total, 1):.1f}% |")
    return "\n".join(lines)


def eval_held_out(model: MetaModel, data: Omniglot, choice: str) -> tuple[str, ...]:
    """``--held-out``: "artifact" (the alphabets its config records), "full" (``HELD_OUT``)
    or a comma-separated list of alphabets."""
    if choice == "artifact":
        return tuple(model.config.task["split"]["held_out_alphabets"])
    if choice == "full":
        return HELD_OUT
    return check_held_out(data, [a.strip() for a in choice.split(",") if a.strip()])


def held_out_split(model: MetaModel, data: Omniglot) -> Split:
    held = tuple(model.config.task["split"]["held_out_alphabets"])
    return split(data, held)[1]


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", default="models/artifacts/omniglot", help="artifact directory")
    p.add_argument("--data", default="../shared/data/omniglot", help="the Omniglot zips' folder")
    p.add_argument(
        "--held-out",
        default="artifact",
        help="alphabets to test on: 'artifact' (its config's), 'full' (the full set's "
        f"{len(HELD_OUT)}) or A,B,...; the rest is the training split",
    )
    p.add_argument(
        "--way", type=int, choices=range(2, MAX_WAY + 1), metavar="N", help="N (default: 5, 20)"
    )
    p.add_argument(
        "--shot", type=int, choices=range(1, MAX_SHOT + 1), metavar="K", help="K (default: 1, 5)"
    )
    p.add_argument(
        "--within",
        type=int,
        default=20,
        metavar="N",
        help="first row: within-alphabet N-way 1-shot episodes, like Lake's runs (0: none)",
    )
    p.add_argument("--queries", type=int, default=10, help="query drawings per class")
    p.add_argument(
        "--confusions",
        type=int,
        default=0,
        metavar="TOP",
        help="after the table, each row's TOP character pairs the model confuses most",
    )
    p.add_argument(
        "--fit-temperature",
        type=int,
        default=0,
        metavar="TASKS",
        help="fit a temperature on TASKS episodes per protocol of the training split and "
        "report the ECE at it too (0: the artifact's temperature only)",
    )
    p.add_argument(
        "--save-calibrated",
        metavar="DIR",
        help="with --fit-temperature: write the artifact with the fitted temperature to DIR",
    )
    p.add_argument(
        "--diagram",
        default="runs/omniglot-reliability.png",
        help="the reliability diagram (PNG) to write, one panel per row ('': none)",
    )


def evaluate(args: argparse.Namespace) -> None:
    model = load_artifact(args)
    data = load(args.data)
    alphabets = eval_held_out(model, data, args.held_out)
    held = split(data, alphabets)[1]
    protocols: tuple[tuple[int, int], ...] = DEFAULT_PROTOCOLS
    if args.way is not None or args.shot is not None:
        ways = (args.way,) if args.way else (5, 20)
        shots = (args.shot,) if args.shot else (1, 5)
        protocols = tuple((w, k) for w in ways for k in shots)
    rows: list[tuple[str, Sampler, int, int]] = []
    if args.within > 0:
        rows.append(("within", sample_within, args.within, 1))
    rows += [("across", sample, w, k) for w, k in protocols]
    trained = set(model.config.task["split"]["train_alphabets"])
    seen = sorted(trained & set(alphabets))
    inner = model.config.inner
    print(
        f"Omniglot meta-test: artifact {args.artifact} (sha256 {model.version[:12]}), "
        f"held-out alphabets {', '.join(alphabets)} ({held.classes} characters)"
        + (f"; the artifact TRAINED on {', '.join(seen)}" if seen else "")
        + f"\nadaptation: adapt={inner.adapt} steps={inner.steps} learned_lr={inner.learned_lr} "
        f"support_shifts={model.config.task.get('support_shifts')}; "
        f"{args.tasks} tasks per row, {args.queries} queries per class, seed {args.seed}; "
        f"temperature {model.temperature:.4g}"
        + ("" if model.calibration is not None else " (none fitted)")
    )
    fitted: float | None = None
    if args.fit_temperature > 0:
        t0 = time.perf_counter()
        upright = upright_train(data, alphabets)
        fitted, record = fit_calibration(model, upright, args.fit_temperature, args.seed + 1000)
        print(
            f"temperature fitted on the training split ({upright.classes} characters, "
            f"{args.fit_temperature} tasks x {len(CALIBRATION_PROTOCOLS)} protocols): "
            f"{fitted:.4f}; NLL {record['nll_at_1']:.4f} at 1 -> {record['nll_fitted']:.4f}, "
            f"ECE there {record['ece_at_1']:.4f} -> {record['ece_fitted']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        if args.save_calibrated:
            version = calibrated(model, fitted, record).save(args.save_calibrated)
            print(f"wrote {args.save_calibrated} (sha256 {version[:12]})")
    fit_head = " ECE at fitted T |" if fitted is not None else ""
    print(
        "\n| episodes | way | shot | accuracy | 95% CI | mean top p | ECE |"
        + fit_head
        + " unused mass | s/task |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if fitted else "") + "---:|---:|")
    confused: list[tuple[str, int, int, Counter[tuple[str, str]]]] = []
    panels: list[list[tuple[str, calibration.Reliability]]] = [[], []]
    for kind, sampler, way, shot in rows:
        t0 = time.perf_counter()
        result = meta_test(model, held, way, shot, args.tasks, args.queries, args.seed, sampler)
        per_task = (time.perf_counter() - t0) / args.tasks
        mean, ci = mean_ci95(result.accs)
        top, correct = result.confidence(model.temperature)
        rel = calibration.reliability(top, correct)
        label = f"{'IN ' if kind == 'within' else ''}{way}W{shot}S"
        panels[0].append((f"{label} T={model.temperature:.2f} ECE={rel.ece:.3f}", rel))
        cells = (
            f"| {kind} | {way} | {shot} | {100 * mean:.2f}% | ± {100 * ci:.2f}% "
            f"| {float(top.mean()):.3f} | {rel.ece:.4f} |"
        )
        if fitted is not None:
            fit_rel = calibration.reliability(*result.confidence(fitted))
            panels[1].append((f"{label} T={fitted:.2f} ECE={fit_rel.ece:.3f}", fit_rel))
            cells += f" {fit_rel.ece:.4f} |"
        print(cells + f" {result.unused_mass:.4f} | {per_task:.3f} |")
        confused.append((kind, way, shot, result.errors))
        sys.stdout.flush()
    if args.diagram:
        out = Path(args.diagram)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(calibration.reliability_png([row for row in panels if row]))
        print(f"\nreliability diagram: {out}")
    for kind, way, shot, errors in confused if args.confusions > 0 else []:
        queries = args.tasks * way * args.queries
        print(
            f"\n{kind} {way}-way {shot}-shot: " + confusion_table(errors, queries, args.confusions)
        )


FAMILY = Family(
    name=NAME,
    summary="N-way K-shot classification of handwritten characters (images)",
    input_shape=INPUT_SHAPE,
    sample=sample,
    preprocess=preprocess,
    meta_defaults=MetaTrainConfig(
        iterations=RECIPE.iterations,
        meta_batch=RECIPE.meta_batch,
        meta_lr=RECIPE.meta_lr,
        meta_lr_min=RECIPE.meta_lr_min,
        rate_lr=RECIPE.rate_lr,
        clip=RECIPE.clip,
        first_order_until=RECIPE.first_order_until,
        validate_every=RECIPE.validate_every,
    ),
    inner_defaults=InnerLoopConfig(
        steps=RECIPE.inner_steps,
        lr=RECIPE.inner_lr,
        first_order=RECIPE.first_order,
        adapt="head",
        learned_lr=RECIPE.learned_lr,
        grad_clip=RECIPE.inner_grad_clip,
    ),
    add_train_arguments=add_train_arguments,
    train=train,
    add_eval_arguments=add_eval_arguments,
    evaluate=evaluate,
)
