"""Request inputs and targets -> what the engine takes, with a domain error on the way.

Inputs come as rows of D numbers, arrays of the meta-model's input shape, or (for image
meta-models) base64 PNG/JPEG images, decoded and preprocessed exactly as in training.
Classification targets are the client's own labels (strings or integers); they become
output indices in order of first appearance, and the labels are kept with the version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from models.checkpoint import MetaModel
from models.tasks import image_preprocess
from service import images
from service.errors import InvalidInput
from service.settings import Settings

Label = int | str
RawInput = list[float] | list[list[list[float]]] | str


def rows(
    model: MetaModel, inputs: Sequence[RawInput], *, field: str, settings: Settings
) -> list[list[float]]:
    """Every input as prod(input_shape) floats: (N, D)."""
    shape = list(model.config.input_shape)
    width = math.prod(shape)
    preprocess = image_preprocess(model.config.family)
    out: list[list[float]] = []
    for i, item in enumerate(inputs):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            if preprocess is None:
                raise InvalidInput(where, f"meta-model {model.name!r} takes numbers, not images")
            gray = images.decode(item, field=where, max_pixels=settings.max_image_pixels)
            out.append(preprocess(gray).reshape(-1).tolist())
        elif item and isinstance(item[0], list):
            try:
                array = np.asarray(item, dtype=np.float32)
            except ValueError:
                raise InvalidInput(where, f"a ragged array; expected shape {shape}") from None
            if list(array.shape) != shape:
                raise InvalidInput(where, f"expected shape {shape}, got {list(array.shape)}")
            out.append(array.reshape(-1).tolist())
        elif len(item) != width:
            raise InvalidInput(
                where, f"expected {width} value(s) per input (input shape {shape}), got {len(item)}"
            )
        else:
            out.append(item)  # type: ignore[arg-type]  # a flat row of numbers
    return out


def targets(
    model: MetaModel, values: Sequence[float | str], *, field: str = "support.targets"
) -> tuple[list[float], list[Label] | None]:
    """Regression: the numbers. Classification: output indices (ints) and the labels."""
    if model.config.kind == "regression":
        for i, v in enumerate(values):
            if isinstance(v, str):
                raise InvalidInput(
                    f"{field}[{i}]",
                    f"meta-model {model.name!r} is a regressor: targets are numbers",
                )
        return [float(v) for v in values], None
    index: dict[Label, int] = {}
    for i, v in enumerate(values):
        if isinstance(v, float):
            raise InvalidInput(f"{field}[{i}]", f"a class label is a string or an integer, not {v}")
        index.setdefault(v, len(index))
    labels = list(index)
    if len({str(label) for label in labels}) != len(labels):
        raise InvalidInput(field, 'labels that read the same as text (e.g. 1 and "1") clash')
    max_way = int(model.config.task.get("max_way", 0))
    if len(labels) > max_way:
        raise InvalidInput(
            field,
            f"{len(labels)} distinct labels, but meta-model {model.name!r} tells apart "
            f"at most {max_way}",
        )
    return [index[v] for v in values], labels  # type: ignore[index]  # ints: class indices
