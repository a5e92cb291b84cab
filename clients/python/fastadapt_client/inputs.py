"""Inputs as the wire takes them: rows or arrays of numbers, texts (text meta-models) as
they are, and images as base64.

An image is its file's bytes (PNG or JPEG) or a path to the file; the server decodes and
preprocesses it exactly as in training, so the client sends the file unchanged.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from fastadapt_client.models import WireInput

# A row of D numbers, or a nested (C, H, W) array; numpy arrays are fine (``.tolist()``);
# or, for a text meta-model, a text (``inputs=["book a flight", ...]``).
NumericInput: TypeAlias = Sequence[float] | Sequence[Sequence[Sequence[float]]] | str | Any
# The bytes of a PNG/JPEG file, or the path of one (a str is always a path, never base64).
ImageInput: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str]


def wire_inputs(
    inputs: Sequence[NumericInput] | Any | None,
    images: Sequence[ImageInput] | None,
    *,
    field: str,
) -> list[WireInput]:
    """Exactly one of ``inputs`` (numbers, or texts) and ``images``, as a JSON-ready list."""
    if (inputs is None) == (images is None):
        raise ValueError(f"{field}: give exactly one of inputs= (numbers or texts) and images=")
    if images is not None:
        if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike):
            raise TypeError(f"{field}: images= is a sequence of images, not one image")
        return [encode_image(image) for image in images]
    rows = _as_list(inputs)
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise TypeError(f"{field}: inputs= is a sequence of rows or arrays of numbers, or of texts")
    return [_as_list(row) for row in rows]


def _as_list(value: Any) -> Any:
    """A numpy array (or anything with ``tolist``) as nested lists; anything else as is."""
    return value.tolist() if hasattr(value, "tolist") else value


def encode_image(image: ImageInput) -> str:
    """Base64 of the image file's bytes."""
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    else:
        raise TypeError(f"an image is bytes or a file path, not {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


def wire_targets(targets: Sequence[float | int | str] | Any) -> list[float | int | str]:
    """Numbers for regression, labels (strings or integers) for classification."""
    values = _as_list(targets)
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError("targets= is a sequence of numbers or labels")
    return list(values)
