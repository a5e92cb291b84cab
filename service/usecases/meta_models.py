"""The loaded meta-models, described for clients."""

from __future__ import annotations

from dataclasses import dataclass

from models import tasks
from models.checkpoint import MetaModel
from service.errors import NotFound
from service.requests import MetaModels


@dataclass(frozen=True)
class MetaModelInfo:
    name: str
    version: str  # sha256 of the weights
    family: str
    task_kind: str
    input_shape: list[int]
    output: str
    inner_steps: int  # default adaptation
    inner_lr: float | None  # None: learned rates
    first_order: bool
    adapt: str
    learned_lr: str
    max_way: int | None  # classification: the most labels one client may use
    accepts_images: bool  # inputs may be base64 PNG/JPEG
    features: list[str] | None  # tabular: the feature names, in row order
    trained_support: list[int] | None  # [min, max] meta-trained for (None: not declared)
    trained_inner_steps: list[int] | None


def describe(model: MetaModel) -> MetaModelInfo:
    config, inner, trained = model.config, model.config.inner, model.config.trained_for
    return MetaModelInfo(
        name=model.name,
        version=model.version,
        family=config.family,
        task_kind=config.kind,
        input_shape=list(config.input_shape),
        output=str(config.task.get("output", "")),
        inner_steps=inner.steps,
        inner_lr=None if inner.learned_lr != "none" else inner.lr,
        first_order=inner.first_order,
        adapt=inner.adapt,
        learned_lr=inner.learned_lr,
        max_way=config.task.get("max_way"),
        accepts_images=tasks.family(config.family).preprocess is not None,
        features=list(config.task["features"]) if config.task.get("features") else None,
        trained_support=list(trained.support) if trained else None,
        trained_inner_steps=list(trained.inner_steps) if trained else None,
    )


def list_all(meta_models: MetaModels) -> list[MetaModelInfo]:
    return [describe(meta_models[name]) for name in sorted(meta_models)]


def get(meta_models: MetaModels, name: str) -> MetaModelInfo:
    if name not in meta_models:
        raise NotFound(f"unknown meta-model {name!r}")
    return describe(meta_models[name])
