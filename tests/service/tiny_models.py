"""Tiny seeded meta-models built in memory (no artifact files), for the engine and the
request validation tests."""

from __future__ import annotations

from typing import Any

import torch

from models import nets
from models.checkpoint import ArtifactConfig, MetaModel
from models.maml import InnerLoopConfig, LearnedLr, Learner, cross_entropy_loss, mse_loss


def meta_model(
    name: str,
    *,
    learned_lr: LearnedLr = "none",
    classes: int = 0,
    in_features: int = 1,
    seed: int = 0,
    grad_clip: float | None = None,
) -> MetaModel:
    """An untrained MLP meta-model: a 1-40-40-1 regressor, or a classifier of ``classes``."""
    torch.manual_seed(seed)
    out = classes or 1
    architecture: dict[str, Any] = {
        "kind": "mlp",
        "in_features": in_features,
        "hidden": [40, 40],
        "out_features": out,
    }
    kind = "classification" if classes else "regression"
    task: dict[str, Any] = {"kind": kind, "input_shape": [in_features], "output": "test"}
    if classes:
        task["max_way"] = classes
    config = ArtifactConfig(
        name=name,
        family="sinusoid",
        architecture=architecture,
        task=task,
        inner=InnerLoopConfig(steps=5, lr=0.01, learned_lr=learned_lr, grad_clip=grad_clip),
    )
    net = nets.build(architecture)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = cross_entropy_loss if classes else mse_loss
    lrs = Learner(net, loss, config.inner).init_lrs(params)
    lrs = {n: t * (0.5 + torch.rand_like(t)) for n, t in lrs.items()}  # as if learned
    return MetaModel(config, params, lrs, version=f"test-{name}")


def conv_meta_model(name: str, support_shifts: dict[str, int] | None = None) -> MetaModel:
    """A tiny untrained Conv4 classifier of 8x8 images, adapting its head (ANIL); with
    ``support_shifts``, meta-trained (as it were) on support sets grown by shifted copies."""
    torch.manual_seed(4)
    architecture: dict[str, Any] = {
        "kind": "conv4",
        "channels": 4,
        "blocks": 2,
        "groups": 2,
        "image_size": 8,
        "out_features": 3,
    }
    config = ArtifactConfig(
        name=name,
        family="omniglot",
        architecture=architecture,
        task={"kind": "classification", "input_shape": [1, 8, 8], "output": "test", "max_way": 3},
        inner=InnerLoopConfig(steps=3, lr=0.5, adapt="head"),
    )
    if support_shifts is not None:
        config.task["support_shifts"] = support_shifts
    net = nets.build(architecture)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    return MetaModel(config, params, {}, version=f"test-{name}")


def tiny_meta_models() -> dict[str, MetaModel]:
    return {
        "sinusoid": meta_model("sinusoid"),
        "sinusoid-metasgd": meta_model("sinusoid-metasgd", learned_lr="per_param", seed=1),
        "sinusoid-clipped": meta_model(  # like the shipped artifact: MAML++ rates and a clip
            "sinusoid-clipped", learned_lr="per_layer_per_step", grad_clip=1.0, seed=3
        ),
        "classes": meta_model("classes", classes=3, in_features=4, seed=2),
        "images": conv_meta_model("images"),
        "images-shifted": conv_meta_model("images-shifted", {"pixels": 1, "max_images": 20}),
    }
