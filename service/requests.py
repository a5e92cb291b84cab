"""A request becomes a validated, typed object here, once; everything after trusts it.

Types, finiteness and JSON shape are the wire schemas' job (``api/schemas.py``); the
checks here need the meta-model or the configured limits. What comes out is ready for
the engine: the meta-model, inputs in the form the engine takes (rows of numbers stay
Python lists, which the worker converts a batch at a time; arrays and images become one
float32 tensor of the input shape, images decoded and preprocessed here exactly as in
training), the targets (class indices, with the client's labels, for classification),
the inner-loop settings resolved to the meta-model's defaults, and the support set as
JSON to store. A bad request raises a domain error before anything reaches torch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models import tasks
from models.checkpoint import MetaModel
from models.encoder import label_text
from service import images
from service.engine import AdaptJob, Inputs
from service.engine.jobs import Texts
from service.errors import InvalidInput, TooLarge
from service.settings import Settings

Label = int | str  # a client's class label
# a row, an array, a base64 image, or an object keyed by feature name (tabular meta-models)
RawInput = list[float] | list[list[list[float]]] | str | dict[str, float]
RawTarget = float | str  # a number, or a label (an int or a string)
MetaModels = Mapping[str, MetaModel]


@dataclass(frozen=True)
class Adaptation:
    """A validated adaptation: the engine's job, and what the stored version records."""

    model: MetaModel
    job: AdaptJob  # inputs, targets (class indices for classification), steps and lr
    labels: list[Label] | None  # classification: the client's labels, in output order
    support_inputs: str  # JSON, as the client sent them (rows, arrays or images)
    support_targets: str  # JSON, as the client sent them
    support_size: int  # K
    # what was accepted outside the meta-model's trained_for (FASTADAPT_ALLOW_UNTRAINED)
    warnings: tuple[str, ...] = ()
    # the in-scope score below which predictions answer no label (None: the meta-model's)
    out_of_scope_threshold: float | None = None


def adaptation(
    *,
    model: MetaModel,
    settings: Settings,
    inputs: Sequence[RawInput],
    targets: Sequence[RawTarget],
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    out_of_scope_threshold: float | None = None,
    tenant: str = "",
) -> Adaptation:
    """Validate an adaptation of ``model`` (the version resolved by the caller: the
    promoted one of the requested name) to the support set (inputs, targets) of
    ``tenant``'s client."""
    _support_size(inputs, targets, settings)
    steps, lr = _inner(model, inner_steps, inner_lr, settings)
    threshold = out_of_scope(model, out_of_scope_threshold)
    x = model_inputs(model, inputs, field="support.inputs", settings=settings)
    y, labels = _targets(model, targets)
    warnings = untrained(model, y, steps, settings)  # y: class indices for classification
    x, y = _with_label_examples(model, x, y, labels)
    return Adaptation(
        model=model,
        job=AdaptJob(model.version, x, y, steps, lr, model=model, tenant=tenant),
        labels=labels,
        support_inputs=json.dumps(inputs, separators=(",", ":")),
        support_targets=json.dumps(targets, separators=(",", ":")),
        support_size=len(inputs),
        warnings=warnings,
        out_of_scope_threshold=threshold,
    )


def _with_label_examples(
    model: MetaModel, x: Inputs, y: list[float] | list[int], labels: list[Label] | None
) -> tuple[Inputs, list[float] | list[int]]:
    """A text meta-model meta-trained with label examples (``task.label_examples``) reads
    each string label's name (``label_text``: "book_flight" -> "book flight") as one more
    example of its class, after the client's own; integer labels name nothing."""
    if not model.config.task.get("label_examples") or labels is None or not isinstance(x, tuple):
        return x, y
    named = [(i, label_text(label)) for i, label in enumerate(labels) if isinstance(label, str)]
    named = [(i, text) for i, text in named if text]
    return (*x, *(text for _, text in named)), [*y, *(i for i, _ in named)]


def known_meta_model(meta_models: MetaModels, name: str) -> MetaModel:
    if name not in meta_models:
        raise unknown_meta_model(name, meta_models)
    return meta_models[name]


def unknown_meta_model(name: str, known: Iterable[str]) -> InvalidInput:
    names = ", ".join(sorted(known)) or "none registered"
    return InvalidInput("meta_model", f"unknown meta-model {name!r} (known: {names})")


def out_of_scope(
    model: MetaModel, threshold: float | None, *, field: str = "out_of_scope_threshold"
) -> float | None:
    """A threshold of the in-scope score that a request sets (0 to 1: the wire schema
    checks the range): only a meta-model whose predictions have that score (text ones)
    takes one."""
    if threshold is not None and model.in_scope is None:
        raise InvalidInput(
            field,
            f"meta-model {model.name!r} has no in-scope score (its predictions always "
            "answer a label); leave it out",
        )
    return threshold


def prediction_size(inputs: Sized, settings: Settings, field: str) -> None:
    """The checks a prediction's inputs pass before its client version is looked up."""
    if not inputs:
        raise InvalidInput(field, "no inputs to predict")
    if len(inputs) > settings.max_predict_batch:
        raise TooLarge(
            f"{field}: {len(inputs)} inputs exceed the limit of {settings.max_predict_batch}"
        )


def model_inputs(
    model: MetaModel, inputs: Sequence[RawInput], *, field: str, settings: Settings
) -> Inputs:
    """Inputs as the engine takes them: (N, D) rows when every input is a row of D =
    prod(input_shape) numbers, else an (N, *input_shape) float32 tensor."""
    if model.config.task.get("input") == "text":
        return texts(inputs, field=field, settings=settings)
    shape = list(model.config.input_shape)
    width = math.prod(shape)
    preprocess = tasks.family(model.config.family).preprocess  # None: not an image family
    items: list[list[float] | Tensor] = []
    tensors = False
    for i, item in enumerate(inputs):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            if preprocess is None:
                raise InvalidInput(where, f"meta-model {model.name!r} takes numbers, not images")
            gray = images.decode(item, field=where, max_pixels=settings.max_image_pixels)
            items.append(preprocess(gray).reshape(shape))  # once, as in training
            tensors = True
        elif isinstance(item, dict):
            items.append(_by_name(model, item, where))
        elif item and isinstance(item[0], list):
            try:
                with np.errstate(over="ignore"):  # beyond float32's range: refused below
                    array = np.asarray(item, dtype=np.float32)
            except ValueError:
                raise InvalidInput(where, f"a ragged array; expected shape {shape}") from None
            if list(array.shape) != shape:
                raise InvalidInput(where, f"expected shape {shape}, got {list(array.shape)}")
            if not np.isfinite(array).all():  # finite as JSON, beyond float32's range
                raise InvalidInput(where, "NaN or infinity")
            items.append(torch.from_numpy(array))
            tensors = True
        elif len(item) != width:
            raise InvalidInput(
                where, f"expected {width} value(s) per input (input shape {shape}), got {len(item)}"
            )
        else:
            items.append(item)  # type: ignore[arg-type]  # a flat row of numbers
    if not tensors:
        return items  # type: ignore[return-value]  # rows: the worker converts a batch at once
    return torch.stack(
        [x if isinstance(x, Tensor) else torch.tensor(x).reshape(shape) for x in items]
    )  # (N, *input_shape)


def texts(inputs: Sequence[RawInput], *, field: str, settings: Settings) -> Texts:
    """A text meta-model's inputs: non-empty strings of at most ``max_text_chars``
    characters that UTF-8 can carry (the encoder truncates what passes its token limit)."""
    out: list[str] = []
    limit = settings.max_text_chars
    for i, item in enumerate(inputs):
        where = f"{field}[{i}]"
        if not isinstance(item, str):
            raise InvalidInput(where, "a text meta-model takes strings (one text per input)")
        if not item.strip():
            raise InvalidInput(where, "an empty or whitespace-only text")
        if len(item) > limit:
            raise InvalidInput(
                where, f"{len(item)} characters; texts are limited to {limit} (max_text_chars)"
            )
        if not _encodable(item):
            raise InvalidInput(where, "not Unicode text (a lone surrogate escape)")
        out.append(item)
    return tuple(out)


def _by_name(model: MetaModel, item: Mapping[str, float], where: str) -> list[float]:
    """An input given as ``{feature: value}``: the row in the meta-model's feature order."""
    features: list[str] | None = model.config.task.get("features")
    if not features:
        width = math.prod(model.config.input_shape)
        raise InvalidInput(
            where, f"meta-model {model.name!r} names no features: send {width} number(s) per input"
        )
    unknown = [name for name in item if name not in features]
    if unknown:
        raise InvalidInput(
            f"{where}.{unknown[0]}",
            f"not a feature of meta-model {model.name!r} (features: {', '.join(features)})",
        )
    missing = [name for name in features if name not in item]
    if missing:
        raise InvalidInput(f"{where}.{missing[0]}", "missing; every feature needs a value")
    return [item[name] for name in features]


def untrained(
    model: MetaModel, targets: Sequence[float] | Sequence[int], steps: int, settings: Settings
) -> tuple[str, ...]:
    """The ways this adaptation leaves what the meta-model was meta-trained for (its
    ``trained_for``): a 422 naming the first, or, with ``allow_untrained``, each as a
    warning. Regression counts support points; classification, each label's examples."""
    trained = model.config.trained_for
    if trained is None:  # an artifact saved before trained_for existed: nothing to check
        return ()
    problems: list[tuple[str, str]] = []
    lo, hi = trained.support
    if model.config.kind == "regression":
        if not lo <= len(targets) <= hi:
            problems.append(
                (
                    "support.inputs",
                    f"{len(targets)} point{'' if len(targets) == 1 else 's'}; meta-model "
                    f"{model.name!r} was meta-trained for {lo} to {hi} (trained_for.support)",
                )
            )
    else:
        counts = Counter(targets)  # class index -> examples, in order of first appearance
        for index, count in counts.items():
            if not lo <= count <= hi:  # named by its first example: labels are not quoted
                first = list(targets).index(index)
                problems.append(
                    (
                        f"support.targets[{first}]",
                        f"its class has {count} example(s); "
                        f"meta-model {model.name!r} was meta-trained for {lo} to {hi} per class "
                        "(trained_for.support)",
                    )
                )
                break
    lo, hi = trained.inner_steps
    if not lo <= steps <= hi:
        trained_steps = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
        why = ""
        if model.config.inner.learned_lr == "per_layer_per_step":
            why = (
                ", the steps its rates were learned for (more would reuse the last rate, "
                "fewer replay a prefix never trained to stand alone)"
            )
        problems.append(
            (
                "inner_steps",
                f"{steps}; meta-model {model.name!r} was meta-trained for "
                f"{trained_steps} inner steps{why} (trained_for.inner_steps)",
            )
        )
    if problems and not settings.allow_untrained:
        raise InvalidInput(*problems[0])
    return tuple(f"{field}: {message}" for field, message in problems)


def _support_size(inputs: Sized, targets: Sized, settings: Settings) -> None:
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


def _inner(
    model: MetaModel, steps: int | None, lr: float | None, settings: Settings
) -> tuple[int, float | None]:
    """(steps, lr) of the adaptation: the request's, else the meta-model's defaults; lr
    None means the meta-model's learned rates."""
    inner = model.config.inner
    lo, hi = settings.min_inner_steps, settings.max_inner_steps
    if steps is not None and not lo <= steps <= hi:
        raise InvalidInput("inner_steps", f"must be between {lo} and {hi}, got {steps}")
    steps = inner.steps if steps is None else steps
    if lr is None:
        return steps, None if inner.learned_lr != "none" else inner.lr
    if inner.learned_lr != "none":
        raise InvalidInput(
            "inner_lr",
            f"meta-model {model.name!r} meta-learned its inner step sizes ({inner.learned_lr}) "
            "with its initialisation and adapts with them; they cannot be overridden, as one "
            "fixed rate would run an inner loop it was never trained for. Leave inner_lr out",
        )
    if not 0 < lr <= settings.max_inner_lr:
        raise InvalidInput("inner_lr", f"must be > 0 and <= {settings.max_inner_lr:g}, got {lr}")
    return steps, lr


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(value: float | int, field: str) -> float:
    """A regression target as the float32 the engine computes with: an integer of any size
    arrives from JSON as it was written (a 400-digit one does not fit a float)."""
    if not -FLOAT32_MAX <= value <= FLOAT32_MAX:  # exact for ints: no float conversion
        raise InvalidInput(field, "a number beyond float32's range (about ±3.4e38)")
    return float(value)


def _encodable(text: str) -> bool:
    """Whether ``text`` has a UTF-8 form: JSON's ``"\\ud800"`` parses to a lone surrogate,
    which no response (nor PostgreSQL) can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _targets(
    model: MetaModel, values: Sequence[RawTarget], *, field: str = "support.targets"
) -> tuple[list[float] | list[int], list[Label] | None]:
    """Regression: the numbers. Classification: output indices, in order of each label's
    first appearance, and the labels."""
    if model.config.kind == "regression":
        numbers: list[float] = []
        for i, v in enumerate(values):
            if isinstance(v, str):
                raise InvalidInput(
                    f"{field}[{i}]",
                    f"meta-model {model.name!r} is a regressor: targets are numbers",
                )
            numbers.append(_number(v, f"{field}[{i}]"))
        return numbers, None
    index: dict[Label, int] = {}
    for i, v in enumerate(values):
        if isinstance(v, float):
            raise InvalidInput(
                f"{field}[{i}]", "a class label is a string or an integer, not a float"
            )
        if isinstance(v, str) and not _encodable(v):
            raise InvalidInput(f"{field}[{i}]", "not Unicode text (a lone surrogate escape)")
        index.setdefault(v, len(index))
    labels = list(index)
    if len({str(label) for label in labels}) != len(labels):
        raise InvalidInput(field, 'labels that read the same as text (e.g. 1 and "1") clash')
    if len(labels) < 2:  # it would answer that label, with probability 1, to anything
        raise InvalidInput(
            field,
            f"a single label; meta-model {model.name!r} is a classifier and needs examples "
            "of at least 2 classes to tell apart",
        )
    max_way = int(model.config.task.get("max_way", 0))
    if len(labels) > max_way:
        raise InvalidInput(
            field,
            f"{len(labels)} distinct labels, but meta-model {model.name!r} tells apart "
            f"at most {max_way}",
        )
    return [index[v] for v in values], labels  # type: ignore[index]  # ints: class indices
