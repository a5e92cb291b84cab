"""Meta-training: ``fastadapt train <family>`` (or ``python -m models.train <family>``).

``loop`` is the one training loop (stages, checkpoint, progress, MAML's ``MetaStage``),
``stages`` the supervised and prototypical stages image families run before it,
``options`` the flags every family takes, ``schedule`` and ``state`` the learning-rate
schedule and the checkpoint format every stage shares.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.tasks import Family


PROG = "fastadapt train"
DESCRIPTION = "Meta-train a meta-model of a task family."


def arguments(family: Family, p: argparse.ArgumentParser) -> None:
    """The flags every family takes, then the family's own."""
    from models.train.options import add_common_arguments

    add_common_arguments(p, family)
    family.add_train_arguments(p)


def main(argv: Sequence[str] | None = None) -> None:
    from models.tasks import parse_command

    argv = list(sys.argv[1:] if argv is None else argv)
    family, args = parse_command(PROG, DESCRIPTION, argv, arguments)
    family.train(args, argv[1:])
