"""Meta-training recipe for the Omniglot family: pre-train the body, then ANIL.

Stage 1 (``epochs``): the Conv4 body learns to classify every training character x
rotation (812 classes) with a cosine classifier, label smoothing, small random affine
warps and a cosine-annealed learning rate. The classifier is thrown away afterwards.

Optional stage 1b (``proto_episodes``): the served body (its configured readout) is
fine-tuned as a prototypical network (Snell et al. 2017) on 20..60-way 1..5-shot
episodes of the training classes, with the same augmentation: a query's logits are a
learned scale times the dot products of its unit features with the class means of the
support features. A zero-initialised head's first inner step is such a prototype
classifier (up to a term common to all classes), so these features suit the ANIL inner
loop. ``--init DIR`` starts
the body from an existing artifact's body instead of stage 1 (then ``--epochs 0``).

Stage 2 (``iterations``): ANIL meta-training through the served inner loop
(``models.maml.Learner``, head-only, second order): the head starts at zero (so no class
is favoured before it has examples), the per-step inner rates are learned (MAML++ style)
and the body is fine-tuned on N-way K-shot episodes with N in 2..20 and K in 1..5.

The result is a ``MetaModel`` artifact. Progress goes to stderr, metrics to
``OUT/metrics.csv``, checkpoints to ``OUT/checkpoint.pt`` (``--resume`` continues one).

    python -m models.pretrain --data ../shared/data/omniglot --out models/artifacts/omniglot
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from models import nets
from models.augment import SupportShifts
from models.checkpoint import ArtifactConfig, MetaModel
from models.evaluate_omniglot import accuracies
from models.maml import LOSSES, InnerLoopConfig, Learner
from models.params import Params
from models.progress import Progress
from models.tasks import omniglot

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
FIELDS = ["stage", "step", "loss", "train_acc", "val_acc", "lr", "elapsed_s"]


@dataclass(frozen=True)
class RecipeConfig:
    channels: int = 64  # Conv4 width
    readout: str = "map"  # the served body's features: see nets.Conv4 (stage 1 uses "pool")
    # stage 1: supervised pre-training of the body
    epochs: int = 40  # passes over the training characters x rotations
    batch: int = 128
    lr: float = 2e-3  # Adam, cosine-annealed to 0
    label_smoothing: float = 0.1
    cosine_scale: float = 16.0  # fixed temperature of the cosine classifier
    shift: float = 0.1  # affine augmentation: translation (fraction of half-width)
    zoom: float = 0.1  # ... zoom 1 +- zoom
    rotate: float = 0.17  # ... rotation +- radians (about 10 degrees)
    # stage 1b: prototypical-network fine-tuning of the served body (0 episodes: skipped)
    proto_episodes: int = 0
    proto_lr: float = 5e-4  # Adam, cosine-annealed to 0
    proto_min_way: int = 20
    proto_max_way: int = 60
    proto_queries: int = 5  # query images per class
    proto_scale: float = 10.0  # initial temperature (learned)
    init: str | None = None  # start the body from this artifact's body (skip stage 1)
    # stage 2: ANIL meta-training
    iterations: int = 400  # meta-iterations
    meta_batch: int = 4  # tasks per meta-iteration
    meta_lr: float = 2e-4  # Adam on the body, cosine-annealed
    rate_lr: float = 0.1  # Adam on the learned inner rates
    max_train_shot: int = 5
    queries: int = 5  # query images per class in training episodes
    inner_steps: int = 10
    inner_lr: float = 5.0  # initial inner step size (unit features; 20+ diverges early on)
    support_shifts: int = 0  # > 0: support sets gain copies shifted this many pixels
    support_max_images: int = 100  # ... when they stay within this many images (augment.py)
    # validation: 20-way 1-shot on the held-out alphabets through the served path
    val_tasks: int = 100
    val_every: int = 5  # epochs in stage 1; x 20 iterations in stage 2


def inner_config(cfg: RecipeConfig, learned: bool) -> InnerLoopConfig:
    return InnerLoopConfig(
        steps=cfg.inner_steps,
        lr=cfg.inner_lr,
        first_order=False,
        adapt="head",
        learned_lr="per_layer_per_step" if learned else "none",
    )


def architecture(cfg: RecipeConfig, readout: str | None = None) -> dict[str, Any]:
    return {
        "kind": "conv4",
        "channels": cfg.channels,
        "out_features": omniglot.MAX_WAY,
        "readout": cfg.readout if readout is None else readout,
    }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def meta_model(
    cfg: RecipeConfig,
    body: Params,
    lrs: Params,
    learned: bool,
    task: dict[str, Any],
    training: dict[str, Any],
) -> MetaModel:
    """The artifact: the body, a zero head (no class favoured), the inner rates."""
    net = cast(nets.Conv4, nets.build(architecture(cfg)))  # the served net
    params = {n: p.detach().clone() for n, p in body.items()}
    params["head.weight"] = torch.zeros_like(net.head.weight)
    params["head.bias"] = torch.zeros_like(net.head.bias)
    config = ArtifactConfig(
        name="omniglot",
        family="omniglot",
        architecture=architecture(cfg),
        task=task,
        inner=inner_config(cfg, learned),
        training=training,
    )
    device = next(iter(body.values())).device
    return MetaModel(config, {n: p.to(device) for n, p in params.items()}, lrs, "")


# -- the recipe -------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: RecipeConfig, args: argparse.Namespace, argv: list[str]) -> None:
        self.cfg = cfg
        self.args = args
        self.out = Path(args.out)
        self.device = pick_device(args.device)
        data = omniglot.load(args.data)
        self.train, self.val = omniglot.split(data)
        self.task = {
            "kind": "classification",
            "input_shape": list(omniglot.INPUT_SHAPE),
            "max_way": omniglot.MAX_WAY,
            "max_shot": omniglot.MAX_SHOT,
            "output": omniglot.OUTPUT,
            "preprocess": omniglot.PREPROCESS,
            "split": omniglot.split_record(data),
        }
        self.shifts = None
        if cfg.support_shifts > 0:
            self.shifts = SupportShifts(cfg.support_shifts, cfg.support_max_images)
            self.task["support_shifts"] = self.shifts.to_dict()
        self.training = {
            "command": "python -m models.pretrain "
            + shlex.join(a for a in argv if a != "--resume"),
            "seed": args.seed,
            "recipe": asdict(cfg),
        }
        torch.manual_seed(args.seed)
        self.g = torch.Generator().manual_seed(args.seed)
        # stage 1 trains the body through the pooled readout; the served net (same body
        # modules, the configured readout) is what stage 2 meta-trains and the artifact holds
        self.net = cast(nets.Conv4, nets.build(architecture(cfg, "pool")).to(self.device))
        with torch.no_grad():
            self.net.head.weight.zero_()
            self.net.head.bias.zero_()
        self.net.head.requires_grad_(False)
        n_classes = self.train.classes
        self.classifier = torch.nn.Parameter(
            torch.randn(n_classes, self.net.features, device=self.device)
        )
        body_params = [p for n, p in self.net.named_parameters() if n.startswith("body.")]
        self.opt1 = torch.optim.Adam([*body_params, self.classifier], lr=cfg.lr)
        if cfg.init is not None:
            self.init_body(cfg.init)
        self.log_scale = torch.nn.Parameter(
            torch.tensor(math.log(cfg.proto_scale), device=self.device)
        )
        self.opt_p = torch.optim.Adam([*body_params, self.log_scale], lr=cfg.proto_lr)
        self.served = cast(nets.Conv4, nets.build(architecture(cfg)).to(self.device))
        for i, module in enumerate(self.served.body):
            if isinstance(module, torch.nn.Conv2d | torch.nn.GroupNorm):
                self.served.body[i] = self.net.body[i]  # shared: one set of body weights
        with torch.no_grad():  # the head starts every adaptation at zero, as served
            self.served.head.weight.zero_()
            self.served.head.bias.zero_()
        self.served.head.requires_grad_(False)
        self.learner = Learner(self.served, LOSSES["classification"], inner_config(cfg, True))
        params = {n: p.detach() for n, p in self.served.named_parameters()}
        self.lrs = {
            n: t.clone().requires_grad_(True) for n, t in self.learner.init_lrs(params).items()
        }
        self.opt2 = torch.optim.Adam(
            [
                {"params": body_params, "lr": cfg.meta_lr},
                {"params": list(self.lrs.values()), "lr": cfg.rate_lr},
            ]
        )
        self.images = self.train.images.reshape(-1, *omniglot.INPUT_SHAPE)  # (C*20, 1, 28, 28)
        self.labels = torch.arange(self.train.classes).repeat_interleave(self.train.images.shape[1])
        self.steps_per_epoch = self.images.shape[0] // cfg.batch
        self.stage1 = cfg.epochs * self.steps_per_epoch
        self.stage1b = self.stage1 + cfg.proto_episodes
        self.total = self.stage1b + cfg.iterations
        self.done = 0
        self.t0 = time.perf_counter()
        self.elapsed_before = 0.0

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "net": self.net.state_dict(),
            "classifier": self.classifier.detach(),
            "log_scale": self.log_scale.detach(),
            "lrs": {n: t.detach() for n, t in self.lrs.items()},
            "opt1": self.opt1.state_dict(),
            "opt_p": self.opt_p.state_dict(),
            "opt2": self.opt2.state_dict(),
            "generator": self.g.get_state(),
            "elapsed_s": self.elapsed(),
        }

    def save_checkpoint(self) -> None:
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(self.out / CHECKPOINT)

    def load_checkpoint(self) -> None:
        state = torch.load(self.out / CHECKPOINT, map_location=self.device, weights_only=True)
        self.done = int(state["done"])
        self.net.load_state_dict(state["net"])
        with torch.no_grad():
            self.classifier.copy_(state["classifier"])
            self.log_scale.copy_(state["log_scale"])
            if self.done > self.stage1b:  # stage 2 had started
                for n, t in self.lrs.items():
                    t.copy_(state["lrs"][n])
                self.opt2.load_state_dict(state["opt2"])
        self.opt1.load_state_dict(state["opt1"])
        self.opt_p.load_state_dict(state["opt_p"])
        self.g.set_state(state["generator"])
        self.elapsed_before = float(state["elapsed_s"])

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def log(self, **row: Any) -> None:
        path = self.out / METRICS
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({**row, "elapsed_s": f"{self.elapsed():.1f}"})

    # -- helpers -------------------------------------------------------------------------
    def init_body(self, directory: str) -> None:
        """Copy an artifact's body into the net (same architecture required)."""
        source = MetaModel.load(directory)
        expected = nets.resolve(architecture(self.cfg))  # as complete as a loaded config's
        if source.config.architecture != expected:
            raise ValueError(
                f"{directory}: architecture {source.config.architecture} != {expected}"
            )
        body = {n: t for n, t in source.params.items() if n.startswith("body.")}
        own = {n for n, _ in self.net.named_parameters() if n.startswith("body.")}
        if set(body) != own:
            raise ValueError(f"{directory}: body parameters {sorted(body)} != {sorted(own)}")
        with torch.no_grad():
            for n, p in self.net.named_parameters():
                if n in body:
                    p.copy_(body[n].to(self.device))
        self.training["init"] = {  # with how the init was trained: the full provenance
            "artifact": directory,
            "sha256": source.version,
            "training": source.config.training,
        }

    def model(self, learned: bool) -> MetaModel:
        body: Params = {n: p for n, p in self.net.named_parameters() if n.startswith("body.")}
        lrs = {n: t.detach() for n, t in self.lrs.items()} if learned else {}
        training = {**self.training, "elapsed_s": round(self.elapsed(), 1)}
        return meta_model(self.cfg, body, lrs, learned, self.task, training)

    def validate(self, learned: bool) -> float:
        model = self.model(learned)
        accs = accuracies(model, self.val, 20, 1, self.cfg.val_tasks, 5, seed=12345)
        return float(accs.mean())

    def augment(self, x: Tensor) -> Tensor:
        c = self.cfg
        return omniglot.augment(self.g, x.to(self.device), c.shift, c.zoom, c.rotate)

    # -- stage 1 -------------------------------------------------------------------------
    def pretrain_step(self, x: Tensor, y: Tensor, lr: float) -> tuple[float, float]:
        for group in self.opt1.param_groups:
            group["lr"] = lr
        feats = F.normalize(self.net.body(x), dim=-1)  # (B, D)
        logits = self.cfg.cosine_scale * feats @ F.normalize(self.classifier, dim=-1).T  # (B, C)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        self.opt1.zero_grad(set_to_none=True)
        loss.backward()
        self.opt1.step()
        return float(loss.detach()), float((logits.argmax(-1) == y).float().mean())

    # -- stage 1b ------------------------------------------------------------------------
    def proto_step(self, lr: float) -> tuple[float, float]:
        c = self.cfg
        for group in self.opt_p.param_groups:
            group["lr"] = lr
        way = int(torch.randint(c.proto_min_way, c.proto_max_way + 1, (1,), generator=self.g))
        shot = int(torch.randint(1, c.max_train_shot + 1, (1,), generator=self.g))
        ep = omniglot.sample(self.g, self.train, 1, way, shot, c.proto_queries)
        x = self.augment(torch.cat([ep.xs[0], ep.xq[0]]))  # (N*K + N*Q, 1, 28, 28)
        yq = ep.yq[0].to(self.device)  # (N*Q,)
        feats = self.served.body(x)  # (N*K + N*Q, D), unit length
        support, query = feats[: way * shot], feats[way * shot :]
        protos = support.reshape(way, shot, -1).mean(1)  # (N, D): labels are class-major
        logits = self.log_scale.exp() * query @ protos.T  # (N*Q, N)
        loss = F.cross_entropy(logits, yq)
        self.opt_p.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_p.step()
        return float(loss.detach()), float((logits.argmax(-1) == yq).float().mean())

    # -- stage 2 -------------------------------------------------------------------------
    def meta_step(self, lr: float) -> tuple[float, float]:
        c = self.cfg
        self.opt2.param_groups[0]["lr"] = lr
        way = int(torch.randint(2, omniglot.MAX_WAY + 1, (1,), generator=self.g))
        shot = int(torch.randint(1, c.max_train_shot + 1, (1,), generator=self.g))
        ep = omniglot.sample(self.g, self.train, c.meta_batch, way, shot, c.queries)
        xs = self.augment(ep.xs.flatten(0, 1)).reshape(ep.xs.shape)
        xq = self.augment(ep.xq.flatten(0, 1)).reshape(ep.xq.shape)
        ys, ws, yq = (t.to(self.device) for t in (ep.ys, ep.ws, ep.yq))
        if self.shifts is not None:  # as served: MetaModel.adapt expands the same way
            xs, ys, ws = self.shifts.expand(xs, ys, ws)
        params: Params = dict(self.served.named_parameters())
        fast = self.learner.adapt_batch(params, self.lrs, xs, ys, ws, create_graph=True).fast
        logits = self.learner.predict_batch(params, fast, xq)  # (B, Q, 20)
        loss = F.cross_entropy(logits.flatten(0, 1), yq.flatten())
        self.opt2.zero_grad(set_to_none=True)
        loss.backward()
        self.opt2.step()
        with torch.no_grad():
            for t in self.lrs.values():
                t.clamp_(min=0.0)
        acc = (logits[..., :way].argmax(-1) == yq).float().mean()
        return float(loss.detach()), float(acc)

    def run(self) -> MetaModel:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.args.resume and (self.out / CHECKPOINT).exists():
            self.load_checkpoint()
        progress = Progress(self.total, start=self.done)
        stage1 = self.stage1
        val = float("nan")
        images = self.images.to(self.device)
        labels = self.labels.to(self.device)
        while self.done < stage1:
            epoch = self.done // self.steps_per_epoch
            order = torch.randperm(images.shape[0], generator=self.g)
            start = self.done - epoch * self.steps_per_epoch  # resume inside an epoch: no
            loss_sum = acc_sum = 0.0
            for i in range(start, self.steps_per_epoch):
                idx = order[i * c.batch : (i + 1) * c.batch].to(self.device)
                lr = 0.5 * c.lr * (1 + math.cos(math.pi * self.done / stage1))
                loss, acc = self.pretrain_step(self.augment(images[idx]), labels[idx], lr)
                loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
                self.done += 1
                progress.update(self.done, loss=loss, acc=acc, val_acc=val)
            n = self.steps_per_epoch - start
            last = epoch + 1 == c.epochs
            if (epoch + 1) % c.val_every == 0 or last:
                val = self.validate(learned=False)
            self.log(
                stage=1,
                step=self.done,
                loss=f"{loss_sum / n:.4f}",
                train_acc=f"{acc_sum / n:.4f}",
                val_acc=f"{val:.4f}",
                lr=f"{lr:.5f}",
            )
            self.save_checkpoint()
        if c.epochs > 0 and not (self.out / "stage1" / "config.json").exists():
            self.model(learned=False).save(self.out / "stage1")  # the pre-trained body alone
        window: list[tuple[float, float]] = []
        while self.done < self.stage1b:
            episode = self.done - stage1
            lr = 0.5 * c.proto_lr * (1 + math.cos(math.pi * episode / c.proto_episodes))
            window.append(self.proto_step(lr))
            self.done += 1
            progress.update(self.done, loss=window[-1][0], acc=window[-1][1], val_acc=val)
            if (episode + 1) % (40 * c.val_every) == 0 or self.done == self.stage1b:
                val = self.validate(learned=False)
                print(f"\nproto scale {self.log_scale.exp().item():.2f}", file=sys.stderr)
                self.log(
                    stage="1b",
                    step=self.done,
                    loss=f"{sum(w[0] for w in window) / len(window):.4f}",
                    train_acc=f"{sum(w[1] for w in window) / len(window):.4f}",
                    val_acc=f"{val:.4f}",
                    lr=f"{lr:.6f}",
                )
                window = []
                self.save_checkpoint()
        if c.proto_episodes > 0 and not (self.out / "stage1b" / "config.json").exists():
            self.model(learned=False).save(self.out / "stage1b")  # the prototype-tuned body
        window = []
        if c.meta_lr == 0:  # stage 2 learns the inner rates alone: no gradients for the body
            self.net.body.requires_grad_(False)
        while self.done < self.total:
            it = self.done - self.stage1b
            lr = 0.5 * c.meta_lr * (1 + math.cos(math.pi * it / max(c.iterations, 1)))
            window.append(self.meta_step(lr))
            self.done += 1
            progress.update(self.done, meta_loss=window[-1][0], acc=window[-1][1], val_acc=val)
            if (it + 1) % (20 * c.val_every) == 0 or self.done == self.total:
                val = self.validate(learned=True)
                rates = {n: [round(v, 2) for v in t.tolist()] for n, t in self.lrs.items()}
                print(f"\ninner rates {rates}", file=sys.stderr)
                self.log(
                    stage=2,
                    step=self.done,
                    loss=f"{sum(w[0] for w in window) / len(window):.4f}",
                    train_acc=f"{sum(w[1] for w in window) / len(window):.4f}",
                    val_acc=f"{val:.4f}",
                    lr=f"{lr:.6f}",
                )
                window = []
                self.save_checkpoint()
        progress.close()
        return self.model(learned=c.iterations > 0)


def parse(argv: list[str]) -> tuple[RecipeConfig, argparse.Namespace]:
    base = RecipeConfig()
    p = argparse.ArgumentParser(prog="fastadapt train omniglot", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder with the Omniglot background zips")
    p.add_argument("--out", required=True, help="artifact directory (checkpoints and logs too)")
    p.add_argument("--epochs", type=int, default=base.epochs, help="stage 1 epochs")
    p.add_argument(
        "--iterations", type=int, default=base.iterations, help="stage 2 meta-iterations"
    )
    p.add_argument(
        "--proto-episodes",
        type=int,
        default=base.proto_episodes,
        help="stage 1b: prototypical-network episodes (0: skip)",
    )
    p.add_argument("--proto-lr", type=float, default=base.proto_lr)
    p.add_argument("--proto-min-way", type=int, default=base.proto_min_way)
    p.add_argument("--proto-max-way", type=int, default=base.proto_max_way)
    p.add_argument("--meta-lr", type=float, default=base.meta_lr, help="stage 2 body lr")
    p.add_argument("--init", help="start the body from this artifact's body (use --epochs 0)")
    p.add_argument("--channels", type=int, default=base.channels)
    p.add_argument("--readout", choices=["pool", "map"], default=base.readout)
    p.add_argument("--shift", type=float, default=base.shift, help="augmentation: translation")
    p.add_argument("--zoom", type=float, default=base.zoom, help="augmentation: zoom 1 +- this")
    p.add_argument("--rotate", type=float, default=base.rotate, help="augmentation: radians")
    p.add_argument("--inner-lr", type=float, default=base.inner_lr)
    p.add_argument("--inner-steps", type=int, default=base.inner_steps)
    p.add_argument("--val-tasks", type=int, default=base.val_tasks)
    p.add_argument(
        "--support-shifts",
        type=int,
        default=base.support_shifts,
        metavar="PIXELS",
        help="stage 2 and serving: add support copies shifted this far (0: off; augment.py)",
    )
    p.add_argument("--support-max-images", type=int, default=base.support_max_images)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    args = p.parse_args(argv)
    cfg = replace(
        base,
        epochs=args.epochs,
        iterations=args.iterations,
        proto_episodes=args.proto_episodes,
        proto_lr=args.proto_lr,
        proto_min_way=args.proto_min_way,
        proto_max_way=args.proto_max_way,
        meta_lr=args.meta_lr,
        init=args.init,
        channels=args.channels,
        readout=args.readout,
        shift=args.shift,
        zoom=args.zoom,
        rotate=args.rotate,
        inner_lr=args.inner_lr,
        inner_steps=args.inner_steps,
        val_tasks=args.val_tasks,
        support_shifts=args.support_shifts,
        support_max_images=args.support_max_images,
    )
    return cfg, args


def main(argv: list[str]) -> None:
    cfg, args = parse(argv)
    torch.set_num_threads(args.threads)
    trainer = Trainer(cfg, args, argv)
    model = trainer.run()
    digest = model.save(args.out)
    print(f"saved {args.out} (sha256 {digest[:12]}), {trainer.elapsed():.0f} s of training")


if __name__ == "__main__":
    main(sys.argv[1:])
