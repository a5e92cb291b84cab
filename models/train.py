"""Meta-training: one loop for every family, single process or ``torchrun`` data-parallel.

``python -m models.train sinusoid --out DIR`` (or ``fastadapt train sinusoid ...``).
Under ``torchrun --nproc-per-node N`` every process samples the same global meta-batch
from the same seeded generator, keeps its own slice of the tasks, and the gradients are
all-reduced (summed over processes, each already divided by the global meta-batch), which
is what DistributedDataParallel does for a module: the result equals one process with
the same global meta-batch and seed, up to float summation order.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from models.checkpoint import ArtifactConfig, MetaModel
from models.maml import LOSSES, InnerLoopConfig, Learner
from models.nets import build as nets_build
from models.params import Params, from_bytes, select, to_bytes
from models.progress import Progress
from models.tasks import Episode

Sampler = Callable[[torch.Generator], Episode]
Validator = Callable[[Params, Params], dict[str, float]]


@dataclass(frozen=True)
class MetaTrainConfig:
    iterations: int = 40_000  # meta-iterations (outer steps)
    meta_batch: int = 25  # tasks per meta-iteration, across all processes
    meta_lr: float = 1e-3  # Adam step size, cosine-annealed down to meta_lr_min
    meta_lr_min: float = 1e-5
    rate_lr: float | None = None  # Adam step size for learned inner rates (None: meta_lr)
    clip: float = 1.0  # max norm of the meta-gradient (learned rates make spikes)
    multi_step_loss: float = 0.0  # MAML++: fraction of training that anneals per-step losses
    first_order_until: float = 0.0  # MAML++: fraction of training run first-order
    seed: int = 0  # seeds the initialisation and the task stream
    validate_every: int = 1000  # iterations between validations (and checkpoints)


@dataclass(frozen=True)
class Selection:
    """Which validation metric picks the weights an artifact ships (training can spike)."""

    metric: str  # a key the validator returns
    maximize: bool = False

    def better(self, score: float, best: float | None) -> bool:
        if math.isnan(score):
            return False
        return best is None or (score > best if self.maximize else score < best)


@dataclass(frozen=True)
class Rank:
    index: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.index == 0


def init_distributed(device: str) -> Rank:
    """Join the ``torchrun`` process group if launched by it (gloo on CPU, NCCL on CUDA)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Rank()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Rank(dist.get_rank(), dist.get_world_size())


def resolve_device(choice: str) -> str:
    if choice == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    return choice


def step_weights(steps: int, progress: float, anneal: float) -> list[float]:
    """MAML++ multi-step loss weights: uniform at first, all on the last step after
    ``anneal`` of training (non-final steps decay linearly to a small floor)."""
    if anneal <= 0.0 or progress >= anneal:
        return [0.0] * (steps - 1) + [1.0]
    floor = 0.03 / steps
    early = max(1.0 / steps * (1.0 - progress / anneal), floor)
    return [early] * (steps - 1) + [1.0 - early * (steps - 1)]


def task_losses(
    learner: Learner,
    params: Params,
    lrs: Params,
    ep: Episode,
    *,
    create_graph: bool,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Query loss after adaptation, one per task: (B,). ``weights`` gives MAML++'s
    multi-step loss (query loss after every inner step, weighted)."""
    if learner.inner.adapt == "head":  # ANIL: the body once for all tasks, outside vmap
        fast, frozen = learner.split(params)

        def body(x: Tensor) -> Tensor:  # (B, N, ...) -> (B, N, F)
            return learner.features(frozen, x.flatten(0, 1)).unflatten(0, x.shape[:2])

        ep = Episode(body(ep.xs), ep.ys, ep.ws, body(ep.xq), ep.yq, ep.wq)
        learner, params = learner.on_features(), fast

    def one(xs: Tensor, ys: Tensor, ws: Tensor, xq: Tensor, yq: Tensor, wq: Tensor) -> Tensor:
        if weights is None or len(weights) <= 1:
            fast = learner.adapt(params, lrs, xs, ys, ws, create_graph=create_graph).fast
            return learner.loss(learner.predict(params, fast, xq), yq, wq)
        trajectory = learner.steps(params, lrs, xs, ys, ws, create_graph=create_graph)
        return sum(
            (
                wt * learner.loss(learner.predict(params, fast, xq), yq, wq)
                for (fast, _), wt in zip(trajectory, weights, strict=True)
                if wt > 0.0
            ),
            torch.zeros((), device=xq.device),
        )

    return torch.func.vmap(one)(ep.xs, ep.ys, ep.ws, ep.xq, ep.yq, ep.wq)


class MetaTrainer:
    """Adam on the meta-initialisation (and learned inner rates), with checkpoints."""

    def __init__(
        self,
        learner: Learner,
        params: Params,
        cfg: MetaTrainConfig,
        sample: Sampler,
        out: Path,
        *,
        device: str = "cpu",
        rank: Rank = Rank(),
        validate: Validator | None = None,
        selection: Selection | None = None,
    ) -> None:
        if cfg.meta_batch % rank.world:
            raise ValueError(f"meta-batch {cfg.meta_batch} does not split over {rank.world}")
        self.learner, self.cfg, self.sample, self.out = learner, cfg, sample, out
        self.device, self.rank, self.validate = device, rank, validate
        self.selection = selection
        self.best_score: float | None = None
        self.best: tuple[Params, Params] | None = None
        self.params = {n: p.detach().to(device).requires_grad_() for n, p in params.items()}
        self.lrs = {n: t.to(device).requires_grad_() for n, t in learner.init_lrs(params).items()}
        groups: list[dict[str, Any]] = [{"params": list(self.params.values())}]
        if self.lrs:
            rate_lr = cfg.meta_lr if cfg.rate_lr is None else cfg.rate_lr
            groups.append({"params": list(self.lrs.values()), "lr": rate_lr})
        self.optimizer = torch.optim.Adam(groups, lr=cfg.meta_lr)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, cfg.iterations, eta_min=cfg.meta_lr_min
        )
        self.tasks = torch.Generator().manual_seed(cfg.seed)
        self.iteration = 0

    # -- one outer step ----------------------------------------------------------------------
    def step(self) -> float:
        cfg, rank = self.cfg, self.rank
        progress = self.iteration / cfg.iterations
        ep = self.sample(self.tasks)  # the global meta-batch, identical on every process
        share = cfg.meta_batch // rank.world
        mine = slice(rank.index * share, (rank.index + 1) * share)
        ep = Episode(*(t[mine] for t in (ep.xs, ep.ys, ep.ws, ep.xq, ep.yq, ep.wq))).to(self.device)
        first_order = self.learner.inner.first_order or progress < cfg.first_order_until
        weights = (
            step_weights(self.learner.inner.steps, progress, cfg.multi_step_loss)
            if cfg.multi_step_loss > 0
            else None
        )
        losses = task_losses(
            self.learner, self.params, self.lrs, ep, create_graph=not first_order, weights=weights
        )
        loss = losses.sum() / cfg.meta_batch
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        leaves = [*self.params.values(), *self.lrs.values()]
        total = loss.detach().clone()
        if rank.world > 1:
            for leaf in leaves:
                assert leaf.grad is not None
                dist.all_reduce(leaf.grad)
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(leaves, cfg.clip)
        self.optimizer.step()
        self.schedule.step()
        self.iteration += 1
        return float(total)

    def run(self, *, resume: bool = False) -> None:
        if resume:
            self.load_state()
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.csv"
        progress = Progress(self.cfg.iterations, start=self.iteration)
        running = math.nan
        while self.iteration < self.cfg.iterations:
            loss = self.step()
            running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
            shown: dict[str, float] = {"meta-loss": running}
            done = self.iteration
            if done % self.cfg.validate_every == 0 or done == self.cfg.iterations:
                if self.validate is not None:
                    shown |= self.validate(*self.detached())
                    self._keep_if_best(shown)
                if self.rank.main:
                    self._log(metrics, {"iteration": done, **shown})
                    self.save_state()
            if self.rank.main:
                progress.update(done, **shown)
        progress.close()

    def _keep_if_best(self, metrics: dict[str, float]) -> None:
        if self.selection is None:
            return
        score = metrics.get(self.selection.metric)
        if score is not None and self.selection.better(score, self.best_score):
            params, lrs = self.detached()
            self.best_score = score
            self.best = (
                {n: t.clone() for n, t in params.items()},
                {n: t.clone() for n, t in lrs.items()},
            )

    def final(self) -> tuple[Params, Params]:
        """The weights to ship: the best validated ones when selecting, else the last."""
        return self.best if self.best is not None else self.detached()

    def detached(self) -> tuple[Params, Params]:
        params = {n: p.detach().cpu() for n, p in self.params.items()}
        return params, {n: t.detach().cpu() for n, t in self.lrs.items()}

    # -- checkpoints (safetensors + JSON; nothing is pickled) ---------------------------------
    def save_state(self) -> None:
        tensors: dict[str, Tensor] = {f"param.{n}": p.detach() for n, p in self.params.items()}
        tensors |= {f"lr.{n}": t.detach() for n, t in self.lrs.items()}
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            tensors |= {f"opt.{index}.{k}": torch.as_tensor(v) for k, v in state.items()}
        tensors["tasks.generator"] = self.tasks.get_state()
        if self.best is not None:
            tensors |= {f"best.param.{n}": t for n, t in self.best[0].items()}
            tensors |= {f"best.lr.{n}": t for n, t in self.best[1].items()}
        meta = {
            "iteration": self.iteration,
            "best_score": self.best_score,
            "param_groups": opt["param_groups"],
            "schedule": self.schedule.state_dict(),
        }
        target = self.out / "checkpoint"
        target.mkdir(parents=True, exist_ok=True)
        (target / "state.safetensors.tmp").write_bytes(to_bytes(tensors))
        (target / "state.json.tmp").write_text(json.dumps(meta))
        os.replace(target / "state.safetensors.tmp", target / "state.safetensors")
        os.replace(target / "state.json.tmp", target / "state.json")

    def load_state(self) -> None:
        source = self.out / "checkpoint"
        if not (source / "state.json").exists():
            return
        tensors = from_bytes((source / "state.safetensors").read_bytes())
        meta = json.loads((source / "state.json").read_text())
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"])
            for n, t in self.lrs.items():
                t.copy_(tensors[f"lr.{n}"])
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.schedule.load_state_dict(meta["schedule"])
        self.tasks.set_state(tensors["tasks.generator"])
        self.iteration = int(meta["iteration"])
        self.best_score = meta.get("best_score")
        if self.best_score is not None:
            self.best = (select(tensors, "best.param"), select(tensors, "best.lr"))

    @staticmethod
    def _log(path: Path, row: dict[str, Any]) -> None:
        fresh = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if fresh:
                writer.writeheader()
            writer.writerow(row)


# -- families ---------------------------------------------------------------------------------
def train_sinusoid(argv: Sequence[str]) -> None:
    from models.evaluate import sinusoid_mse
    from models.nets import MLP
    from models.tasks import sinusoid

    p = argparse.ArgumentParser(prog="fastadapt train sinusoid")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    add_common_arguments(p, MetaTrainConfig())
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument(
        "--learned-lr",
        default="per_layer_per_step",
        choices=["none", "per_param", "per_layer_per_step"],
    )
    p.add_argument("--first-order", action="store_true")
    p.add_argument(
        "--inner-grad-clip",
        type=float,
        default=None,
        help="clip each inner gradient to this norm (bounds a diverging step)",
    )
    p.add_argument("--min-shots", type=int, default=5)
    p.add_argument("--max-shots", type=int, default=20)
    p.add_argument("--queries", type=int, default=20)
    args = p.parse_args(argv)

    cfg = common_config(args)
    device = resolve_device(args.device)
    rank = init_distributed(device)
    torch.manual_seed(cfg.seed)
    net = MLP(1, (40, 40), 1)
    inner = InnerLoopConfig(
        steps=args.inner_steps,
        lr=args.inner_lr,
        first_order=args.first_order,
        learned_lr=args.learned_lr,
        grad_clip=args.inner_grad_clip,
    )
    config = ArtifactConfig(
        name="sinusoid",
        family="sinusoid",
        architecture={"kind": "mlp", "in_features": 1, "hidden": [40, 40], "out_features": 1},
        task={
            "kind": "regression",
            "input_shape": list(sinusoid.INPUT_SHAPE),
            "output": sinusoid.OUTPUT,
            "shots": [args.min_shots, args.max_shots],
        },
        inner=inner,
        training={
            "command": "fastadapt train sinusoid " + shlex.join(argv),
            "config": asdict(cfg),
        },
    )
    learner = Learner(net, LOSSES[config.kind], inner)
    params: Params = dict(net.named_parameters())

    def sample(g: torch.Generator) -> Episode:
        return sinusoid.sample(g, cfg.meta_batch, args.min_shots, args.max_shots, args.queries)

    def validate(params: Params, lrs: Params) -> dict[str, float]:
        probe = MetaModel(config, params, lrs, version="")
        return {"val-mse@5": sinusoid_mse(probe, shots=5, tasks=500, seed=10_000)[0]}

    trainer = MetaTrainer(
        learner,
        params,
        cfg,
        sample,
        args.out,
        device=device,
        rank=rank,
        validate=validate if rank.main else None,
        selection=Selection("val-mse@5"),
    )
    run_and_save(trainer, config, args)


def train_tabular(argv: Sequence[str]) -> None:
    from models.evaluate import tabular_scores
    from models.tasks import tabular

    p = argparse.ArgumentParser(prog="fastadapt train tabular")
    p.add_argument("--data", type=Path, required=True, help="CSV, one row per example")
    p.add_argument("--task-column", required=True)
    p.add_argument("--label-column", required=True)
    p.add_argument("--regression", action="store_true", help="numeric labels (else classes)")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--name", default=None, help="meta-model name (default: the out folder's)")
    add_common_arguments(p, MetaTrainConfig(iterations=5_000, meta_batch=16))
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.05)
    p.add_argument(
        "--learned-lr",
        default="per_layer_per_step",
        choices=["none", "per_param", "per_layer_per_step"],
    )
    p.add_argument("--shots", type=int, nargs=2, default=[2, 10], metavar=("MIN", "MAX"))
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of tasks for validation")
    args = p.parse_args(argv)

    cfg = common_config(args)
    device = resolve_device(args.device)
    rank = init_distributed(device)
    table = tabular.load_csv(
        args.data,
        task_column=args.task_column,
        label_column=args.label_column,
        regression=args.regression,
    )
    train, held_out = table.split(args.held_out, cfg.seed)
    torch.manual_seed(cfg.seed)
    width = len(table.features)
    out_features = 1 if table.regression else table.max_way
    architecture = {
        "kind": "mlp",
        "in_features": width,
        "hidden": args.hidden,
        "out_features": out_features,
        "standardize": train.standardize(),
    }
    net = nets_build(architecture)
    inner = InnerLoopConfig(steps=args.inner_steps, lr=args.inner_lr, learned_lr=args.learned_lr)
    kind = "regression" if table.regression else "classification"
    task: dict[str, Any] = {
        "kind": kind,
        "input_shape": [width],
        "features": list(table.features),
        "task_column": args.task_column,
        "label_column": args.label_column,
        "held_out_tasks": sorted(t.name for t in held_out.tasks),
        "output": "the label" if table.regression else "logits over max_way classes",
    }
    if not table.regression:
        task["max_way"] = table.max_way
    config = ArtifactConfig(
        name=args.name or args.out.name,
        family="tabular",
        architecture=architecture,
        task=task,
        inner=inner,
        training={"command": "fastadapt train tabular " + shlex.join(argv), "config": asdict(cfg)},
    )
    learner = Learner(net, LOSSES[kind], inner)
    params: Params = dict(net.named_parameters())
    shots = (args.shots[0], args.shots[1])

    def sample(g: torch.Generator) -> Episode:
        return tabular.sample(g, train, cfg.meta_batch, shots, args.queries)

    def validate(params: Params, lrs: Params) -> dict[str, float]:
        if not held_out.tasks:
            return {}
        probe = MetaModel(config, params, lrs, version="")
        score = tabular_scores(probe, held_out, shots=shots[1], tasks=100, seed=10_000)
        return {"val-" + score.metric: score.adapted[0]}

    metric = "val-" + ("mse" if table.regression else "accuracy")
    trainer = MetaTrainer(
        learner,
        params,
        cfg,
        sample,
        args.out,
        device=device,
        rank=rank,
        validate=validate if rank.main else None,
        selection=Selection(metric, maximize=not table.regression),
    )
    run_and_save(trainer, config, args)


def run_and_save(trainer: MetaTrainer, config: ArtifactConfig, args: argparse.Namespace) -> None:
    """Train (or resume), then write the artifact from the best validated weights."""
    started = time.perf_counter()
    trainer.run(resume=args.resume)
    if trainer.rank.main:
        params, lrs = trainer.final()
        minutes = (time.perf_counter() - started) / 60
        config.training["minutes"] = round(minutes, 1)
        version = MetaModel(config, params, lrs, version="").save(args.out)
        print(f"wrote {args.out} (version {version[:12]}, {minutes:.1f} min)", file=sys.stderr)
    if dist.is_initialized():  # leave together: a rank exiting with gloo live can abort
        dist.barrier()
        dist.destroy_process_group()


def add_common_arguments(p: argparse.ArgumentParser, defaults: MetaTrainConfig) -> None:
    p.add_argument("--iterations", type=int, default=defaults.iterations)
    p.add_argument("--meta-batch", type=int, default=defaults.meta_batch)
    p.add_argument("--meta-lr", type=float, default=defaults.meta_lr)
    p.add_argument(
        "--rate-lr",
        type=float,
        default=defaults.rate_lr,
        help="meta step size for learned inner rates (default: --meta-lr)",
    )
    p.add_argument("--clip", type=float, default=defaults.clip)
    p.add_argument(
        "--multi-step-loss",
        type=float,
        default=defaults.multi_step_loss,
        help="MAML++: fraction of training that anneals the per-step query losses",
    )
    p.add_argument(
        "--first-order-until",
        type=float,
        default=defaults.first_order_until,
        help="MAML++: fraction of training run first-order before second-order",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--validate-every", type=int, default=defaults.validate_every)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")


def common_config(args: argparse.Namespace) -> MetaTrainConfig:
    torch.set_num_threads(args.threads)
    return MetaTrainConfig(
        iterations=args.iterations,
        meta_batch=args.meta_batch,
        meta_lr=args.meta_lr,
        rate_lr=args.rate_lr,
        clip=args.clip,
        multi_step_loss=args.multi_step_loss,
        first_order_until=args.first_order_until,
        seed=args.seed,
        validate_every=args.validate_every,
    )


def train_omniglot(argv: Sequence[str]) -> None:
    from models import pretrain  # the image recipe: supervised body, then ANIL meta-training

    pretrain.main(list(argv))


FAMILIES: dict[str, Callable[[Sequence[str]], None]] = {
    "sinusoid": train_sinusoid,
    "omniglot": train_omniglot,
    "tabular": train_tabular,
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in FAMILIES:
        print(f"usage: fastadapt train {{{','.join(FAMILIES)}}} --out DIR ...", file=sys.stderr)
        raise SystemExit(2)
    FAMILIES[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
