"""Task families: a registry from a family's name to everything the code needs of it.

A family is one module under ``models/tasks/`` that defines ``FAMILY``: its episode
sampler, input shape, the preprocessing of raw images (image families), its meta-training
recipe (the command-line arguments and defaults of ``fastadapt train <name>`` and the
stages it runs) and its meta-test protocol (``fastadapt eval <name>``). Adding a family is
its module plus one line in ``MODULES``; nothing else spells a family's name.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from models.maml import InnerLoopConfig
    from models.train.loop import MetaTrainConfig

# The registration: one module per family, in the order the commands list them.
MODULES = (
    "models.tasks.sinusoid",
    "models.tasks.omniglot",
    "models.tasks.tabular",
    "models.tasks.text",
)


@dataclass(frozen=True)
class Episode:
    """A meta-batch of tasks; weights of 0 mark padding (support sets of different sizes)."""

    xs: Tensor  # (B, K, ...) support inputs
    ys: Tensor  # (B, K, O) regression targets or (B, K) class indices
    ws: Tensor  # (B, K) support weights
    xq: Tensor  # (B, Q, ...) query inputs
    yq: Tensor  # (B, Q, O) or (B, Q)
    wq: Tensor  # (B, Q) query weights
    classes: Tensor | None = None  # (B, N) the split's class behind each label, if any

    def to(self, device: torch.device | str) -> Episode:
        xs, ys, ws, xq, yq, wq = (
            t.to(device) for t in (self.xs, self.ys, self.ws, self.xq, self.yq, self.wq)
        )
        return Episode(xs, ys, ws, xq, yq, wq, self.classes)


@dataclass(frozen=True)
class Family:
    """What the trainer, the evaluator and the service need of one task family."""

    name: str  # the family's name in artifacts (``config.json``'s "family") and commands
    summary: str  # one line, listed by ``fastadapt train --help`` and ``eval --help``
    input_shape: tuple[int, ...] | None  # None: the data decides (a CSV's feature columns)
    sample: Callable[..., Episode]  # the episode sampler (its arguments are the family's)
    preprocess: Callable[[np.ndarray], Tensor] | None  # raw image -> model input, or None
    meta_defaults: MetaTrainConfig  # defaults of the flags every family takes
    inner_defaults: InnerLoopConfig  # ... and of the inner-loop flags
    add_train_arguments: Callable[[argparse.ArgumentParser], None]  # the family's own flags
    train: Callable[[argparse.Namespace, Sequence[str]], None]  # runs the recipe
    add_eval_arguments: Callable[[argparse.ArgumentParser], None]
    evaluate: Callable[[argparse.Namespace], None]  # prints the meta-test tables


@functools.cache
def families() -> Mapping[str, Family]:
    """Every registered family by name, their modules imported once (the service looks a
    family up on every adaptation and prediction)."""
    found: dict[str, Family] = {}
    for module in MODULES:
        family: Family = importlib.import_module(module).FAMILY
        found[family.name] = family
    return MappingProxyType(found)


def family(name: str) -> Family:
    known = families()
    if name not in known:
        raise KeyError(f"{name!r} is not a task family; families: {', '.join(known)}")
    return known[name]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except required ones (they have none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def command_parser(
    prog: str,
    description: str,
    add_arguments: Callable[[Family, argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    """``prog <family> [options]``: one sub-command per family, each with its own
    ``--help`` that shows every option's default."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="family", metavar="FAMILY", required=True)
    for fam in families().values():
        sub = commands.add_parser(
            fam.name, help=fam.summary, description=fam.summary, formatter_class=HelpFormatter
        )
        add_arguments(fam, sub)
    return parser


def parse_command(
    prog: str,
    description: str,
    argv: Sequence[str],
    add_arguments: Callable[[Family, argparse.ArgumentParser], None],
) -> tuple[Family, argparse.Namespace]:
    """The family and options of ``prog <family> [options]``; an unknown family is a usage
    error (exit 2) that names it and lists the families."""
    parser = command_parser(prog, description, add_arguments)
    known = families()
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        parser.print_usage(sys.stderr)
        parser.exit(2, f"{prog}: {argv[0]!r} is not a family; families: {', '.join(known)}\n")
    args = parser.parse_args(argv)
    return known[args.family], args
