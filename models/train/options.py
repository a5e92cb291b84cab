"""The flags every family's ``fastadapt train`` takes, and the configs they make.

Each family gives the defaults (``Family.meta_defaults``, ``Family.inner_defaults``); the
flags and their meaning are the same for all. ``--multi-step-loss`` is added by the
families whose meta-training stage is ``MetaStage`` (MAML++'s per-step losses).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

import torch

from models.checkpoint import ArtifactConfig, MetaModel
from models.device import resolve_device
from models.maml import Adapt, InnerLoopConfig, LearnedLr
from models.params import Params
from models.tasks import Family
from models.train.loop import Diverged, MetaStage, MetaTrainConfig, Trainer, leave_distributed

DIVERGED_CLIP = 10.0  # the inner-gradient clip a diverged run is advised to try first


def optional_float(text: str) -> float | None:
    """A float, or "none" for off."""
    return None if text.lower() == "none" else float(text)


def add_common_arguments(p: argparse.ArgumentParser, family: Family) -> None:
    meta, inner = family.meta_defaults, family.inner_defaults
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--seed", type=int, default=meta.seed, help="seeds weights and task stream")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument(
        "--iterations", type=int, default=meta.iterations, help="meta-iterations (outer steps)"
    )
    p.add_argument(
        "--meta-batch", type=int, default=meta.meta_batch, help="tasks per meta-iteration"
    )
    p.add_argument("--meta-lr", type=float, default=meta.meta_lr, help="Adam step size")
    p.add_argument(
        "--meta-lr-min", type=float, default=meta.meta_lr_min, help="cosine annealing's floor"
    )
    p.add_argument(
        "--rate-lr",
        type=optional_float,
        default=meta.rate_lr,
        help="Adam step size for learned inner rates (none: --meta-lr's)",
    )
    p.add_argument(
        "--clip",
        type=optional_float,
        default=meta.clip,
        help="max norm of the meta-gradient (none: off)",
    )
    p.add_argument(
        "--first-order-until",
        type=float,
        default=meta.first_order_until,
        help="MAML++: fraction of training run first-order before second-order",
    )
    p.add_argument(
        "--validate-every",
        type=int,
        default=meta.validate_every,
        help="meta-iterations between validations (and checkpoints)",
    )
    p.add_argument(
        "--inner-steps", type=int, default=inner.steps, help="inner gradient steps per task"
    )
    p.add_argument(
        "--inner-lr", type=float, default=inner.lr, help="inner step size (initial, if learned)"
    )
    p.add_argument(
        "--learned-lr",
        default=inner.learned_lr,
        choices=get_args(LearnedLr),
        help="learned inner rates: none, Meta-SGD's per_param, MAML++'s per_layer_per_step",
    )
    p.add_argument(
        "--first-order",
        action="store_true",
        default=inner.first_order,
        help="drop the meta-gradient's second-order terms (FOMAML)",
    )
    p.add_argument(
        "--inner-grad-clip",
        type=optional_float,
        default=inner.grad_clip,
        help="clip each inner gradient to this norm, bounding a diverging step (none: off)",
    )


def add_multi_step_loss(p: argparse.ArgumentParser, defaults: MetaTrainConfig) -> None:
    p.add_argument(
        "--multi-step-loss",
        type=float,
        default=defaults.multi_step_loss,
        help="MAML++: fraction of training that anneals the per-step query losses",
    )


def meta_config(args: argparse.Namespace) -> MetaTrainConfig:
    """The common flags as a config (and the process's torch threads set)."""
    torch.set_num_threads(args.threads)
    return MetaTrainConfig(
        iterations=args.iterations,
        meta_batch=args.meta_batch,
        meta_lr=args.meta_lr,
        meta_lr_min=args.meta_lr_min,
        rate_lr=args.rate_lr,
        clip=args.clip,
        multi_step_loss=getattr(args, "multi_step_loss", 0.0),
        first_order_until=args.first_order_until,
        seed=args.seed,
        validate_every=args.validate_every,
    )


def inner_config(args: argparse.Namespace, adapt: Adapt = "all") -> InnerLoopConfig:
    return InnerLoopConfig(
        steps=args.inner_steps,
        lr=args.inner_lr,
        first_order=args.first_order,
        adapt=adapt,
        learned_lr=args.learned_lr,
        grad_clip=args.inner_grad_clip,
    )


def device(args: argparse.Namespace) -> torch.device:
    return resolve_device(args.device)


def command(family: Family, argv: Sequence[str]) -> str:
    """The command that trained an artifact, for its record (``--resume`` left out)."""
    return f"fastadapt train {family.name} " + shlex.join(a for a in argv if a != "--resume")


def run_and_save(
    trainer: Trainer,
    artifact: Callable[[], tuple[ArtifactConfig, Params, Params]],
    out: Path,
    *,
    resume: bool,
    budget_minutes: float | None = None,
    finalize: Callable[[MetaModel], MetaModel] | None = None,
) -> bool:
    """Train (or resume), then write the artifact ``artifact()`` describes from the
    trained weights, passed through ``finalize`` (a calibration) if given (the main
    process only). With ``budget_minutes``, stop at the last checkpoint that fits in it
    and write nothing (False): ``--resume`` continues."""
    started = time.perf_counter()
    budget = None if budget_minutes is None else 60 * budget_minutes
    try:
        finished = trainer.run(resume=resume, budget_s=budget)
    except Diverged as exc:
        if trainer.rank.main:
            print(diverged(exc, trainer, out), file=sys.stderr)
        leave_distributed()
        raise SystemExit(1) from None
    if not finished:
        print(
            f"stopped within the budget of {budget_minutes} min at step {trainer.done} of "
            f"{trainer.total} (checkpoint saved): continue with --resume",
            file=sys.stderr,
        )
    elif trainer.rank.main:
        config, params, lrs = artifact()
        config.training["elapsed_s"] = round(trainer.elapsed(), 1)  # over resumed runs too
        model = MetaModel(config, params, lrs, version="")
        version = (model if finalize is None else finalize(model)).save(out)
        minutes = (time.perf_counter() - started) / 60
        print(f"wrote {out} (version {version[:12]}, {minutes:.1f} min)", file=sys.stderr)
    leave_distributed()
    return finished


def diverged(exc: Diverged, trainer: Trainer, out: Path) -> str:
    """What a run that met a non-finite loss says: where, what is kept, what to change."""
    kept = (
        f"the checkpoint of step {exc.checkpoint} is kept (--resume continues from it)"
        if exc.checkpoint is not None
        else "no checkpoint was saved before it (one is saved every --validate-every steps)"
    )
    stage = next((s for s in trainer.stages if s.name == exc.stage), None)
    if isinstance(stage, MetaStage):
        inner, clip = stage.learner.inner, stage.learner.inner.grad_clip
        hints = [
            f"--inner-grad-clip {DIVERGED_CLIP:g} (now {'none' if clip is None else f'{clip:g}'})"
            if clip is None or clip > DIVERGED_CLIP
            else f"a smaller --inner-grad-clip (now {clip:g})",
            f"a lower --inner-lr (now {inner.lr:g})",
            f"a lower --meta-lr (now {stage.cfg.meta_lr:g})",
        ]
    else:
        hints = [f"a lower learning rate for the {exc.stage} stage (see --help)"]
    where = f" (its {exc.stage} stage)" if len(trainer.stages) > 1 else ""
    return (
        f"meta-training diverged at step {exc.step} of {trainer.total}{where}: {exc.what}.\n"
        f"It stopped there and wrote no artifact to {out}; {kept}.\n"
        f"Train again with smaller steps: {', or '.join(hints)}."
    )
