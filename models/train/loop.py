"""The one meta-training loop: stages run in order, with one checkpoint, schedule and log.

A ``Stage`` is one optimisation (its parameters, optimiser, step and validation): MAML
meta-training (``MetaStage``, below) for every family, preceded for image families by the
supervised and prototypical stages of ``models.train.stages``. The ``Trainer`` owns what
they share: the step count over all stages, validation and reporting cadence, the
checkpoint (``models.train.state``: safetensors + JSON) and resume, the progress line and
``metrics.csv`` (``models.progress``).

Under ``torchrun --nproc-per-node N`` every process samples the same global meta-batch
from the same seeded generator, keeps its own slice of the tasks, and the gradients are
all-reduced (summed over processes, each already divided by the global meta-batch), which
is what DistributedDataParallel does for a module: the result equals one process with
the same global meta-batch and seed, up to float summation order.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.maml import Learner, batched_loss, clip_factor
from models.params import Params, select
from models.progress import MetricsLog, Progress
from models.tasks import Episode
from models.train import state as checkpoint
from models.train.schedule import cosine

Sampler = Callable[[torch.Generator], Episode]
Validator = Callable[[Params, Params], dict[str, float]]
METRICS = "metrics.csv"
CPU = torch.device("cpu")


class Stage(Protocol):
    """One optimisation run by the ``Trainer`` for ``steps`` steps."""

    name: str  # names its rows in metrics.csv and its entries in the checkpoint
    steps: int
    report_every: int  # steps between reports: a metrics row and a checkpoint
    validate_every: int  # steps between validations (reports fall on them too)
    validation_keys: tuple[str, ...]  # what validate() returns (NaN in rows before the first)
    generators: dict[str, torch.Generator]  # random streams to checkpoint (shared ones once)
    lr: float  # the learning rate of the last step, for the report

    def step(self, index: int) -> dict[str, float]:
        """One optimisation step, ``index`` counting from 0 within the stage."""
        ...

    def validate(self) -> dict[str, float]: ...

    def notes(self) -> str | None:
        """A line worth printing at a validation (learned rates, a temperature), if any."""
        ...

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None: ...

    def finish(self, out: Path) -> None:
        """After the stage's last step (also when a resumed run starts past it)."""
        ...


@dataclass(frozen=True)
class Rank:
    index: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.index == 0


def init_distributed(device: torch.device) -> Rank:
    """Join the ``torchrun`` process group if launched by it (gloo on CPU, NCCL on CUDA)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Rank()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Rank(dist.get_rank(), dist.get_world_size())


def leave_distributed() -> None:
    """Leave together: a rank exiting with gloo live can abort the others."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Diverged(Exception):
    """A step met a non-finite loss or gradient: training stops there, the weights not
    stepped on it and no checkpoint written after the last report's (``checkpoint``)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what  # e.g. "the meta-loss is nan"
        self.stage = ""  # filled in by the Trainer
        self.step = 0  # the step over all stages, counting from 1
        self.checkpoint: int | None = None  # the step of the checkpoint kept (None: none)

    def __str__(self) -> str:
        return f"{self.stage} step {self.step}: {self.what}" if self.step else self.what


class Trainer:
    """Runs its stages in order; reports, validates and checkpoints on their cadence."""

    def __init__(
        self,
        stages: Sequence[Stage],
        out: Path,
        *,
        rank: Rank = Rank(),
        modules: dict[str, nn.Module] | None = None,
    ) -> None:
        self.stages, self.out, self.rank = list(stages), out, rank
        self.modules = modules or {}  # nets the stages share, checkpointed once
        self.total = sum(s.steps for s in self.stages)
        self.done = 0  # steps over all stages
        self.val: dict[str, float] = {}  # the latest validation, shown until the next
        self.window: list[dict[str, float]] = []  # step metrics since the last report
        self.t0 = time.perf_counter()
        self.elapsed_before = 0.0
        self.saved_at: int | None = None  # the step of the checkpoint on disk, if any

    def current(self) -> tuple[Stage, int]:
        """The stage the next step belongs to, and that step's index within it."""
        start = 0
        for stage in self.stages:
            if self.done < start + stage.steps:
                return stage, self.done - start
            start += stage.steps
        raise IndexError("every stage has run")

    def step(self) -> dict[str, float]:
        """One step; ``Diverged`` at a non-finite loss or gradient (a stage raises it
        before stepping on a bad gradient; a non-finite step metric is checked here)."""
        stage, index = self.current()
        try:
            metrics = stage.step(index)
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                raise Diverged(f"the {bad[0]} is {metrics[bad[0]]}")
        except Diverged as exc:
            exc.stage, exc.step, exc.checkpoint = stage.name, self.done + 1, self.saved_at
            raise
        self.done += 1
        return metrics

    def run(self, *, resume: bool = False, budget_s: float | None = None) -> bool:
        """Run every stage to its end (True), or until the next report would fall past
        ``budget_s`` seconds of this run (False: the last report's checkpoint is where
        ``resume`` continues, so a stopped run resumes exactly as if never stopped)."""
        if resume:
            self.load_state()
        started = last = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        progress = Progress(self.total, start=self.done)
        log = MetricsLog(self.out / METRICS)
        shown: dict[str, float] = {}  # running means of the step metrics
        start = 0
        for stage in self.stages:
            end = start + stage.steps
            for key in stage.validation_keys:
                self.val.setdefault(key, math.nan)
            while self.done < end:
                try:
                    metrics = self.step()
                except Diverged:
                    progress.close()  # what is said next starts a line of its own
                    raise
                self.window.append(metrics)
                shown = {
                    k: v if math.isnan(shown.get(k, math.nan)) else 0.98 * shown[k] + 0.02 * v
                    for k, v in metrics.items()
                }
                index = self.done - start
                if index % stage.report_every == 0 or self.done == end:
                    self.report(stage, index, log, progress)
                    now = time.perf_counter()
                    overrun = budget_s is not None and 2 * now - last - started > budget_s
                    if overrun and self.done < self.total:  # another interval would overrun
                        progress.close()
                        return False
                    last = now
                if self.rank.main:
                    progress.update(self.done, **shown, **self.val)
            stage.finish(self.out)
            start = end
        progress.close()
        return True

    def report(self, stage: Stage, index: int, log: MetricsLog, progress: Progress) -> None:
        if index % stage.validate_every == 0 or index == stage.steps:
            self.val = {**self.val, **stage.validate()}
            note = stage.notes()
            if note and self.rank.main:
                progress.note(note)
        means = {k: sum(m[k] for m in self.window) / len(self.window) for k in self.window[0]}
        self.window = []
        if self.rank.main:
            row: dict[str, float | int | str] = {"stage": stage.name, "step": self.done}
            row |= {**means, **self.val}
            log.write({**row, "lr": stage.lr, "elapsed_s": round(self.elapsed(), 1)})
            self.save_state()

    def elapsed(self) -> float:
        """Seconds of training, summed over resumed runs."""
        return self.elapsed_before + time.perf_counter() - self.t0

    # -- checkpoints ---------------------------------------------------------------------------
    def save_state(self) -> None:
        tensors: dict[str, Tensor] = {}
        stages: dict[str, Any] = {}
        generators: dict[str, torch.Generator] = {}
        for stage in self.stages:
            mine, meta = stage.state()
            tensors |= {f"{stage.name}.{k}": v for k, v in mine.items()}
            stages[stage.name] = meta
            generators |= stage.generators
        tensors |= {f"generator.{k}": g.get_state() for k, g in generators.items()}
        for name, module in self.modules.items():
            tensors |= {f"module.{name}.{k}": v.detach() for k, v in module.state_dict().items()}
        meta = {"done": self.done, "elapsed_s": self.elapsed(), "val": self.val, "stages": stages}
        checkpoint.save(self.out, tensors, meta)
        self.saved_at = self.done

    def load_state(self) -> None:
        found = checkpoint.load(self.out)
        if found is None:
            return
        tensors, meta = found
        for name, module in self.modules.items():
            module.load_state_dict(select(tensors, f"module.{name}"))
        for stage in self.stages:
            stage.load(select(tensors, stage.name), meta["stages"][stage.name])
            for key, g in stage.generators.items():
                g.set_state(tensors[f"generator.{key}"])
        self.done = self.saved_at = int(meta["done"])
        self.elapsed_before = float(meta["elapsed_s"])
        self.val = dict(meta["val"])


# -- MAML meta-training ------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaTrainConfig:
    iterations: int = 40_000  # meta-iterations (outer steps)
    meta_batch: int = 25  # tasks per meta-iteration, across all processes
    meta_lr: float = 1e-3  # Adam step size, cosine-annealed down to meta_lr_min
    meta_lr_min: float = 1e-5
    rate_lr: float | None = None  # Adam step size for learned inner rates (None: meta_lr)
    clip: float | None = 1.0  # max norm of the meta-gradient (learned rates make spikes)
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
        if not create_graph and weights is None and isinstance(learner.net.head, nn.Linear):
            return first_order_linear_head(learner, params, lrs, ep)

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


def first_order_linear_head(learner: Learner, head: Params, lrs: Params, ep: Episode) -> Tensor:
    """``task_losses`` for first-order MAML of a linear head on features (ANIL), batched
    by hand: the inner loop runs without autograd (its gradients are detached in
    first-order MAML anyway), as the batched loss's analytic output gradient times the
    features, and the adapted head is rebuilt as start - sum(rate_s * g_s), so the
    meta-gradient reaches the start (and through Proto-MAML's class means, the body) and
    the learned rates exactly as through ``Learner.adapt``'s loop, at a fraction of its
    cost. ``tests/models/test_train.py`` checks both give the same losses and gradients."""
    loss = batched_loss(learner.loss)
    inner = learner.inner
    steps = inner.steps

    def start(h: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        fast = learner.start(head, h, y, w)
        return fast["head.weight"], fast["head.bias"]

    weight, bias = torch.func.vmap(start)(ep.xs, ep.ys, ep.ws)  # (B, O, D), (B, O)
    h = ep.xs.detach()  # (B, K, D)
    out_grad = loss.output_grad(ep.ys, ep.ws, weight.shape[1])
    w_now, b_now = weight.detach(), bias.detach()
    for step in range(steps):
        rw = learner.step_lr(lrs, "head.weight", step, None)  # differentiable: learned rates
        rb = learner.step_lr(lrs, "head.bias", step, None)
        with torch.no_grad():
            g = out_grad(torch.baddbmm(b_now[:, None, :], h, w_now.transpose(1, 2)))  # (B, K, O)
            gw, gb = g.transpose(1, 2) @ h, g.sum(1)  # (B, O, D), (B, O)
            if inner.grad_clip is not None:
                scale = clip_factor([(gw * gw).sum((1, 2)), (gb * gb).sum(1)], inner.grad_clip)
                gw, gb = gw * scale[:, None, None], gb * scale[:, None]
            w_now = w_now - rw * gw
            b_now = b_now - rb * gb
        weight = weight - rw * gw  # the same step, differentiable in the rate and the start
        bias = bias - rb * gb
    logits = torch.baddbmm(bias[:, None, :], ep.xq, weight.transpose(1, 2))  # (B, Q, O)
    return loss.loss(logits, ep.yq, ep.wq)


class MetaStage:
    """MAML meta-training: Adam on the meta-initialisation (and learned inner rates),
    tasks vmapped, data-parallel under torchrun, the best validated weights kept."""

    name = "maml"
    validation_keys: tuple[str, ...] = ()

    def __init__(
        self,
        learner: Learner,
        params: Params,
        cfg: MetaTrainConfig,
        sample: Sampler,
        *,
        device: torch.device = CPU,
        rank: Rank = Rank(),
        validate: Validator | None = None,
        selection: Selection | None = None,
    ) -> None:
        if cfg.meta_batch % rank.world:
            raise ValueError(f"meta-batch {cfg.meta_batch} does not split over {rank.world}")
        self.learner, self.cfg, self.sample = learner, cfg, sample
        self.device, self.rank, self.validator = device, rank, validate
        self.selection = selection
        self.steps = cfg.iterations
        self.report_every = self.validate_every = cfg.validate_every
        self.best_score: float | None = None
        self.best: tuple[Params, Params] | None = None
        self.params = {n: p.detach().to(device).requires_grad_() for n, p in params.items()}
        self.lrs = {n: t.to(device).requires_grad_() for n, t in learner.init_lrs(params).items()}
        groups: list[dict[str, Any]] = [{"params": list(self.params.values())}]
        self.base_lrs = [cfg.meta_lr]
        if self.lrs:
            rate_lr = cfg.meta_lr if cfg.rate_lr is None else cfg.rate_lr
            groups.append({"params": list(self.lrs.values()), "lr": rate_lr})
            self.base_lrs.append(rate_lr)
        self.optimizer = torch.optim.Adam(groups, lr=cfg.meta_lr)
        self.tasks = torch.Generator().manual_seed(cfg.seed)
        self.generators = {"tasks": self.tasks}
        self.lr = cfg.meta_lr

    def step(self, index: int) -> dict[str, float]:
        cfg, rank = self.cfg, self.rank
        progress = index / cfg.iterations
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
        # Stop before stepping on a non-finite loss or gradient (a finite loss can still
        # overflow backwards): the weights stay as the last step left them (one sync).
        norm = torch.nn.utils.get_total_norm(
            [leaf.grad for leaf in leaves if leaf.grad is not None]
        )
        if not bool(torch.isfinite(total) & torch.isfinite(norm)):
            if not torch.isfinite(total):
                raise Diverged(f"the meta-loss is {float(total)}")
            raise Diverged(f"the meta-gradient is not finite (meta-loss {float(total):.4g})")
        if cfg.clip is not None:
            torch.nn.utils.clip_grads_with_norm_(leaves, cfg.clip, norm)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = cosine(base, index, cfg.iterations, cfg.meta_lr_min)
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        return {"meta-loss": float(total)}

    def validate(self) -> dict[str, float]:
        if self.validator is None:
            return {}
        metrics = self.validator(*self.detached())
        score = metrics.get(self.selection.metric) if self.selection else None
        if self.selection and score is not None and self.selection.better(score, self.best_score):
            params, lrs = self.detached()
            self.best_score = score
            self.best = (
                {n: t.clone() for n, t in params.items()},
                {n: t.clone() for n, t in lrs.items()},
            )
        return metrics

    def notes(self) -> str | None:
        return None

    def finish(self, out: Path) -> None:
        pass

    def final(self) -> tuple[Params, Params]:
        """The weights to ship: the best validated ones when selecting, else the last."""
        return self.best if self.best is not None else self.detached()

    def detached(self) -> tuple[Params, Params]:
        params = {n: p.detach().cpu() for n, p in self.params.items()}
        return params, {n: t.detach().cpu() for n, t in self.lrs.items()}

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {f"param.{n}": p.detach() for n, p in self.params.items()}
        tensors |= {f"lr.{n}": t.detach() for n, t in self.lrs.items()}
        moments, groups = checkpoint.optimizer_state(self.optimizer, "opt")
        tensors |= moments
        if self.best is not None:
            tensors |= {f"best.param.{n}": t for n, t in self.best[0].items()}
            tensors |= {f"best.lr.{n}": t for n, t in self.best[1].items()}
        return tensors, {"best_score": self.best_score, "param_groups": groups}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"])
            for n, t in self.lrs.items():
                t.copy_(tensors[f"lr.{n}"])
        checkpoint.load_optimizer(self.optimizer, tensors, meta["param_groups"], "opt")
        self.best_score = meta["best_score"]
        if self.best_score is not None:
            self.best = (select(tensors, "best.param"), select(tensors, "best.lr"))
