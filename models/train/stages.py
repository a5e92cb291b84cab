"""The stages an image family runs before and as its meta-training, on the one loop.

1. ``SupervisedStage``: the body learns to classify every training class with a cosine
   classifier, label smoothing and random affine warps; the classifier is thrown away.
2. ``PrototypicalStage``: the served body (its configured readout) is fine-tuned as a
   prototypical network (Snell et al. 2017) on many-way episodes: a query's logits are a
   learned scale times the dot products of its unit features with the class means of the
   support features. A zero-initialised head's first inner step is such a prototype
   classifier (up to a term common to all classes), so these features suit ANIL.
3. ``AnilStage``: ANIL meta-training through the served inner loop (head-only, from a zero
   head so no class is favoured before it has examples), the per-step inner rates learned
   (MAML++ style) and the body fine-tuned on N-way K-shot episodes.

The stages share one body (the modules of ``body``), one random stream and the
``Trainer``'s checkpoint, schedule, progress and metrics. The family supplies the data:
a batch of labelled images, an episode sampler and the augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.augment import SupportShifts
from models.checkpoint import CONFIG_FILE, MetaModel
from models.maml import Learner
from models.params import Params
from models.tasks import Episode
from models.train import state as checkpoint
from models.train.loop import MetaTrainConfig
from models.train.schedule import cosine

Augment = Callable[[Tensor], Tensor]  # (B, C, H, W) -> (B, C, H, W), random warps
Episodes = Callable[[int, int, int, int], Episode]  # (tasks, way, shot, queries) -> Episode
Snapshot = Callable[[], MetaModel]  # the artifact as it stands (head zero, no learned rates)
Validate = Callable[[], float]  # held-out accuracy of the artifact as it stands


@dataclass(frozen=True)
class SupervisedConfig:
    epochs: int = 40  # passes over the training images (0: skip the stage)
    batch: int = 128
    lr: float = 2e-3  # Adam, cosine-annealed to 0
    label_smoothing: float = 0.1
    cosine_scale: float = 16.0  # fixed temperature of the cosine classifier
    validate_every: int = 5  # epochs between validations (a report every epoch)


@dataclass(frozen=True)
class PrototypicalConfig:
    episodes: int = 0  # one episode per step (0: skip the stage)
    lr: float = 5e-4  # Adam, cosine-annealed to 0
    min_way: int = 20
    max_way: int = 60
    max_shot: int = 5
    queries: int = 5  # query images per class
    scale: float = 10.0  # initial temperature (learned)
    validate_every: int = 200  # episodes between validations (and reports)


def body_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in net.named_parameters() if n.startswith("body.")]


class _BodyStage:
    """What the two body stages share: the body's optimiser with one extra parameter of
    their own (a classifier, a temperature), checkpointed with its moments, a held-out
    validation, and the body kept as an artifact beside the run when done."""

    name: str
    artifact: str  # the folder under the run's output that keeps the stage's body
    extra: str  # the attribute holding the stage's own parameter (its checkpoint name too)
    validation_keys: tuple[str, ...] = ("val_acc",)
    optimizer: torch.optim.Optimizer
    steps: int
    validator: Validate
    snapshot: Snapshot

    def validate(self) -> dict[str, float]:
        return {"val_acc": self.validator()}

    def notes(self) -> str | None:
        return None

    def finish(self, out: Path) -> None:
        if self.steps > 0 and not (out / self.artifact / CONFIG_FILE).exists():
            self.snapshot().save(out / self.artifact)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        moments, groups = checkpoint.optimizer_state(self.optimizer, "opt")
        own: nn.Parameter = getattr(self, self.extra)
        return {self.extra: own.detach(), **moments}, {"param_groups": groups}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            getattr(self, self.extra).copy_(tensors[self.extra])
        checkpoint.load_optimizer(self.optimizer, tensors, meta["param_groups"], "opt")


class SupervisedStage(_BodyStage):
    name = "supervised"
    artifact = "stage1"  # the pre-trained body alone
    extra = "classifier"

    def __init__(
        self,
        body: nn.Module,  # the body with a pooled readout: (B, C, H, W) -> (B, F)
        features: int,
        body_params: list[nn.Parameter],  # the body's parameters, shared by every stage
        images: Tensor,  # (N, C, H, W) every training image
        labels: Tensor,  # (N,) its class
        cfg: SupervisedConfig,
        *,
        augment: Augment,
        g: torch.Generator,
        device: torch.device,
        validate: Validate,
        snapshot: Snapshot,
    ) -> None:
        self.body, self.cfg, self.augment, self.g = body, cfg, augment, g
        self.validator, self.snapshot = validate, snapshot
        classes = int(labels.max()) + 1 if labels.numel() else 0
        self.classifier = nn.Parameter(torch.randn(classes, features, device=device))
        self.optimizer = torch.optim.Adam([*body_params, self.classifier], lr=cfg.lr)
        self.images, self.labels = images.to(device), labels.to(device)
        self.per_epoch = images.shape[0] // cfg.batch
        self.steps = cfg.epochs * self.per_epoch
        self.report_every = max(self.per_epoch, 1)
        self.validate_every = max(cfg.validate_every * self.per_epoch, 1)
        self.generators = {"episodes": g}
        self.order: Tensor | None = None
        self.lr = cfg.lr

    def step(self, index: int) -> dict[str, float]:
        c = self.cfg
        if index % self.per_epoch == 0 or self.order is None:  # a new epoch
            self.order = torch.randperm(self.images.shape[0], generator=self.g)
        i = index % self.per_epoch
        idx = self.order[i * c.batch : (i + 1) * c.batch].to(self.images.device)
        x, y = self.augment(self.images[idx]), self.labels[idx]
        self.lr = cosine(c.lr, index, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        feats = F.normalize(self.body(x), dim=-1)  # (B, D)
        logits = c.cosine_scale * feats @ F.normalize(self.classifier, dim=-1).T  # (B, C)
        loss = F.cross_entropy(logits, y, label_smoothing=c.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        acc = float((logits.argmax(-1) == y).float().mean())
        return {"loss": float(loss.detach()), "train_acc": acc}


class PrototypicalStage(_BodyStage):
    name = "prototypical"
    artifact = "stage1b"  # the prototype-tuned body
    extra = "log_scale"

    def __init__(
        self,
        body: nn.Module,  # the served body: (B, C, H, W) -> (B, D) unit features
        body_params: list[nn.Parameter],
        cfg: PrototypicalConfig,
        *,
        episodes: Episodes,
        augment: Augment,
        g: torch.Generator,
        device: torch.device,
        validate: Validate,
        snapshot: Snapshot,
    ) -> None:
        self.body, self.cfg, self.episodes, self.augment, self.g = body, cfg, episodes, augment, g
        self.validator, self.snapshot, self.device = validate, snapshot, device
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.scale), device=device))
        self.optimizer = torch.optim.Adam([*body_params, self.log_scale], lr=cfg.lr)
        self.steps = cfg.episodes
        self.report_every = self.validate_every = cfg.validate_every
        self.generators = {"episodes": g}
        self.lr = cfg.lr

    def step(self, index: int) -> dict[str, float]:
        c = self.cfg
        self.lr = cosine(c.lr, index, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        way = int(torch.randint(c.min_way, c.max_way + 1, (1,), generator=self.g))
        shot = int(torch.randint(1, c.max_shot + 1, (1,), generator=self.g))
        ep = self.episodes(1, way, shot, c.queries)
        x = self.augment(torch.cat([ep.xs[0], ep.xq[0]]))  # (N*K + N*Q, C, H, W)
        yq = ep.yq[0].to(self.device)  # (N*Q,)
        feats = self.body(x)  # (N*K + N*Q, D), unit length
        support, query = feats[: way * shot], feats[way * shot :]
        protos = support.reshape(way, shot, -1).mean(1)  # (N, D): labels are class-major
        logits = self.log_scale.exp() * query @ protos.T  # (N*Q, N)
        loss = F.cross_entropy(logits, yq)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        acc = float((logits.argmax(-1) == yq).float().mean())
        return {"loss": float(loss.detach()), "train_acc": acc}

    def notes(self) -> str | None:
        return f"proto scale {self.log_scale.exp().item():.2f}"


@dataclass(frozen=True)
class EpisodeShape:
    """The N-way K-shot episodes ANIL trains on: N in 2..max_way, K in 1..max_shot."""

    max_way: int
    max_shot: int
    queries: int  # query images per class


class AnilStage:
    """Meta-training of the served net through its inner loop (``Learner.adapt_batch``),
    the body and the learned inner rates by Adam (only the body's rate annealed)."""

    name = "anil"
    validation_keys: tuple[str, ...] = ("val_acc",)

    def __init__(
        self,
        served: nn.Module,  # the net the artifact holds: body (shared) + zero head
        body_params: list[nn.Parameter],
        learner: Learner,
        cfg: MetaTrainConfig,
        shape: EpisodeShape,
        *,
        episodes: Episodes,
        augment: Augment,
        shifts: SupportShifts | None,
        g: torch.Generator,
        device: torch.device,
        validate: Validate,
    ) -> None:
        self.served, self.learner, self.cfg, self.shape = served, learner, cfg, shape
        self.episodes, self.augment, self.shifts, self.g = episodes, augment, shifts, g
        self.validator, self.device = validate, device
        params = {n: p.detach() for n, p in served.named_parameters()}
        self.lrs = {n: t.clone().requires_grad_(True) for n, t in learner.init_lrs(params).items()}
        self.body = body_params
        groups: list[dict[str, Any]] = [{"params": self.body, "lr": cfg.meta_lr}]
        if self.lrs:
            rate_lr = cfg.meta_lr if cfg.rate_lr is None else cfg.rate_lr
            groups.append({"params": list(self.lrs.values()), "lr": rate_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.steps = cfg.iterations
        self.report_every = self.validate_every = cfg.validate_every
        self.generators = {"episodes": g}
        self.lr = cfg.meta_lr

    def step(self, index: int) -> dict[str, float]:
        c, s = self.cfg, self.shape
        if c.meta_lr == 0:  # the inner rates alone learn: no gradients for the body
            for p in self.body:
                p.requires_grad_(False)
        self.lr = cosine(c.meta_lr, index, self.steps, c.meta_lr_min)
        self.optimizer.param_groups[0]["lr"] = self.lr
        way = int(torch.randint(2, s.max_way + 1, (1,), generator=self.g))
        shot = int(torch.randint(1, s.max_shot + 1, (1,), generator=self.g))
        ep = self.episodes(c.meta_batch, way, shot, s.queries)
        xs = self.augment(ep.xs.flatten(0, 1)).reshape(ep.xs.shape)
        xq = self.augment(ep.xq.flatten(0, 1)).reshape(ep.xq.shape)
        ys, ws, yq = (t.to(self.device) for t in (ep.ys, ep.ws, ep.yq))
        if self.shifts is not None:  # as served: MetaModel.adapt expands the same way
            xs, ys, ws = self.shifts.expand(xs, ys, ws)
        params: Params = dict(self.served.named_parameters())
        first_order = self.learner.inner.first_order or index / self.steps < c.first_order_until
        adapted = self.learner.adapt_batch(
            params, self.lrs, xs, ys, ws, create_graph=not first_order
        )
        logits = self.learner.predict_batch(params, adapted.fast, xq)  # (B, Q, max_way)
        loss = F.cross_entropy(logits.flatten(0, 1), yq.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.clip is not None:
            leaves = [p for p in [*self.body, *self.lrs.values()] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(leaves, c.clip)
        self.optimizer.step()
        with torch.no_grad():
            for t in self.lrs.values():
                t.clamp_(min=0.0)
        acc = (logits[..., :way].argmax(-1) == yq).float().mean()
        return {"loss": float(loss.detach()), "train_acc": float(acc)}

    def validate(self) -> dict[str, float]:
        return {"val_acc": self.validator()}

    def notes(self) -> str | None:
        rates = {n: [round(v, 2) for v in t.tolist()] for n, t in self.lrs.items()}
        return f"inner rates {rates}"

    def finish(self, out: Path) -> None:
        pass

    def learned_lrs(self) -> Params:
        return {n: t.detach() for n, t in self.lrs.items()}

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        moments, groups = checkpoint.optimizer_state(self.optimizer, "opt")
        tensors = {f"lr.{n}": t.detach() for n, t in self.lrs.items()}
        return {**tensors, **moments}, {"param_groups": groups}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, t in self.lrs.items():
                t.copy_(tensors[f"lr.{n}"])
        checkpoint.load_optimizer(self.optimizer, tensors, meta["param_groups"], "opt")
