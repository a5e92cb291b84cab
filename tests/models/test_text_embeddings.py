"""The text family's embedding cache on disk (``Embeddings.compute``) keeps half
precision's embeddings apart from float32's: an evaluation with ``--half`` never reads
float32's file, nor float32's the half one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from models.tasks.text import Embeddings


class Stub:
    """An encoder of the pinned weights' sha, in one precision, that counts its texts."""

    sha = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

    def __init__(self, half: bool, value: float) -> None:
        self.half = half
        self.value = value
        self.encoded: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        self.encoded += texts
        return torch.full((len(texts), 3), self.value)


def test_half_and_float32_embeddings_are_cached_apart(tmp_path: Path) -> None:
    texts = ["play jazz", "wake me at six"]

    def compute(encoder: Stub) -> Tensor:
        return Embeddings.compute(encoder, texts, tmp_path).of(texts)  # type: ignore[arg-type]

    full, half, again = Stub(False, 1.0), Stub(True, 2.0), Stub(False, 9.0)
    compute(full)
    assert torch.equal(compute(half), torch.full((2, 3), 2.0))
    assert half.encoded == texts  # float32's file was not read
    assert torch.equal(compute(again), torch.ones(2, 3))
    assert again.encoded == []  # float32's own file answered
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == [
        f"embeddings-{Stub.sha[:16]}-fp16.safetensors",
        f"embeddings-{Stub.sha[:16]}.safetensors",
    ]
