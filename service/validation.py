"""Checks that turn a bad request into a domain error before anything reaches torch.

Types, finiteness and JSON shape are the wire schemas' job; these checks need the
meta-model or the configured limits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized

from models.checkpoint import MetaModel
from service.errors import InvalidInput, TooLarge
from service.settings import Settings


def meta_model(meta_models: Mapping[str, MetaModel], name: str) -> MetaModel:
    if name not in meta_models:
        known = ", ".join(sorted(meta_models)) or "none loaded"
        raise InvalidInput("meta_model", f"unknown meta-model {name!r} (known: {known})")
    return meta_models[name]


def support(inputs: Sized, targets: Sized, settings: Settings) -> None:
    if not len(inputs):
        raise InvalidInput("support.inputs", "the support set is empty")
    if len(inputs) > settings.max_support:
        raise TooLarge(
            f"support.inputs: {len(inputs)} points exceed the limit of {settings.max_support}"
        )
    if len(targets) != len(inputs):
        raise InvalidInput(
            "support.targets", f"{len(targets)} targets for {len(inputs)} inputs; one each"
        )


def batch(inputs: Sized, settings: Settings, field: str) -> None:
    if not inputs:
        raise InvalidInput(field, "no inputs to predict")
    if len(inputs) > settings.max_predict_batch:
        raise TooLarge(
            f"{field}: {len(inputs)} inputs exceed the limit of {settings.max_predict_batch}"
        )


def inner(model: MetaModel, steps: int | None, lr: float | None, settings: Settings) -> None:
    lo, hi = settings.min_inner_steps, settings.max_inner_steps
    if steps is not None and not lo <= steps <= hi:
        raise InvalidInput("inner_steps", f"must be between {lo} and {hi}, got {steps}")
    if lr is None:
        return
    learned = model.config.inner.learned_lr
    if learned != "none":
        raise InvalidInput(
            "inner_lr",
            f"meta-model {model.name!r} learns its inner learning rates ({learned}); "
            "they cannot be overridden",
        )
    if not 0 < lr <= settings.max_inner_lr:
        raise InvalidInput("inner_lr", f"must be > 0 and <= {settings.max_inner_lr:g}, got {lr}")


def all_finite(values: list[list[float]]) -> bool:
    return all(math.isfinite(v) for row in values for v in row)
