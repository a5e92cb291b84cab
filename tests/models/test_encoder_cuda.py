"""The sentence encoder on CUDA against the CPU, and in half precision against float32.

Skipped without CUDA; ``scripts/gpu_check.sh`` runs them on a lent GPU, where only torch,
transformers and the encoder's package may be installed: so they take no conftest
fixture (the script runs them with ``--noconftest``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.encoder import EncoderSpec, shared

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# short and long, plain and messy, and one past the 256-token limit (truncated alike)
TEXTS = [
    "hi",
    "book me a flight to Lisbon tomorrow morning",
    "What's the balance on my savings account?",
    "um can u turn off the kitchen lights thx",
    "I lost my credit card on the bus yesterday and I need it frozen right away, please",
    "¿Dónde está mi pedido? Lo pedí hace dos semanas.",
    "set a timer for 10 minutes",
    "play some jazz in the living room",
    "the package with the winter boots arrived broken and I would like a refund " * 3,
    "word " * 400,
]


def test_float32_embeddings_on_cuda_equal_the_cpus() -> None:
    spec = EncoderSpec()
    cpu = shared(spec, "cpu").encode(TEXTS)  # (N, 384)
    gpu = shared(spec, "cuda").encode(TEXTS)  # (N, 384), float32, back on the CPU
    assert gpu.dtype == torch.float32 and gpu.device.type == "cpu"
    # float32 on both sides: only the order of the sums differs
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)


def test_half_precision_embeddings_stay_within_cosine_0_999_of_float32() -> None:
    spec = EncoderSpec()
    full = shared(spec, "cuda").encode(TEXTS)
    half_encoder = shared(spec, "cuda", half=True)
    assert half_encoder.half
    half = half_encoder.encode(TEXTS)  # pooled in half, returned as float32
    assert half.dtype == torch.float32
    cosine = F.cosine_similarity(half, full, dim=-1)  # (N,)
    assert float(cosine.min()) > 0.999, cosine.tolist()
