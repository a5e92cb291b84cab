"""Parameters are data: a flat ``dict[str, Tensor]`` that travels and rests as safetensors."""

from __future__ import annotations

import hashlib
import json
import math

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

Params = dict[str, Tensor]


def to_bytes(params: Params) -> bytes:
    """Serialise parameters (moved to CPU, made contiguous) as safetensors bytes."""
    return _st_save({name: t.detach().to("cpu").contiguous() for name, t in params.items()})


def from_bytes(data: bytes) -> Params:
    """Parse safetensors bytes; never executes code, unlike pickle/torch.load."""
    return dict(_st_load(data))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def non_finite(params: Params) -> list[str]:
    """The names of the tensors holding a NaN or an infinity, sorted."""
    return sorted(n for n, t in params.items() if t.is_floating_point() and not t.isfinite().all())


def nbytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def select(params: Params, prefix: str) -> Params:
    """The entries under ``prefix.``, with the prefix stripped (for a sub-module's call)."""
    cut = len(prefix) + 1
    return {name[cut:]: t for name, t in params.items() if name.startswith(prefix + ".")}


def detached(params: Params) -> Params:
    return {name: t.detach() for name, t in params.items()}


def to(params: Params, device: torch.device | str) -> Params:
    return {name: t.to(device) for name, t in params.items()}


class BytesPacker:
    """Stacked fast params -> one safetensors blob per client, in one copy; and back, to
    one flat (P,) tensor per client.

    Every client of a meta-model has the same names, shapes and dtypes, hence the same
    safetensors header; the packer takes it from ``to_bytes`` once and appends each
    client's raw little-endian data in the header's order. Byte-identical to ``to_bytes``.
    That data section, read back as one tensor, is the client's params flattened: the
    form the engine caches (one tensor, not a dict of them: a seventh of the objects for
    the garbage collector to scan, one allocation on the device).
    """

    def __init__(self, example: Params) -> None:
        blob = to_bytes(example)
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])
        header.pop("__metadata__", None)
        self.prefix = blob[: 8 + size]
        self.order = sorted(header, key=lambda n: header[n]["data_offsets"][0])
        self.shapes = {n: tuple(example[n].shape) for n in self.order}
        self.dtypes = {n: example[n].dtype for n in self.order}
        dtypes = set(self.dtypes.values())
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None  # flat form: one dtype only
        self.numel = sum(example[n].numel() for n in self.order)  # P
        self.nbytes = len(blob) - len(self.prefix)

    def unpack(self, blob: bytes) -> Tensor:
        """One client's safetensors -> its params flattened (P,) in this packer's order.
        Raises ValueError for params of other names, shapes or dtypes."""
        if self.dtype is None:
            raise ValueError("flat params need a single dtype")
        if len(blob) == len(self.prefix) + self.nbytes and blob.startswith(self.prefix):
            data = bytearray(memoryview(blob)[len(self.prefix) :])  # a writable copy
            return torch.frombuffer(data, dtype=self.dtype)
        params = from_bytes(blob)  # the same params under another header layout
        if {n: (tuple(t.shape), t.dtype) for n, t in params.items()} != {
            n: (self.shapes[n], self.dtypes[n]) for n in self.order
        }:
            raise ValueError("the params' names, shapes or dtypes differ")
        return torch.cat([params[n].reshape(-1) for n in self.order])

    def unflatten(self, flat: Tensor) -> Params:
        """(B, P) flat params -> (B, ...) per entry (views where the layout allows)."""
        out: Params = {}
        start = 0
        for name in self.order:
            size = math.prod(self.shapes[name])
            out[name] = flat[:, start : start + size].reshape(len(flat), *self.shapes[name])
            start += size
        return out

    def pack(self, fast: Params) -> list[bytes]:
        # fast: (B, ...) per entry -> B safetensors blobs
        size = fast[self.order[0]].shape[0]
        for name in self.order:
            if tuple(fast[name].shape[1:]) != self.shapes[name]:
                raise ValueError(
                    f"{name}: shape {tuple(fast[name].shape[1:])} != {self.shapes[name]}"
                )
        pieces = [fast[n].detach().reshape(size, -1) for n in self.order]
        if len({t.dtype for t in pieces}) == 1:
            rows = torch.cat(pieces, dim=1).view(torch.uint8)  # (B, nbytes), freshly laid out
        else:
            fresh = [t.new_empty(t.shape).copy_(t).view(torch.uint8) for t in pieces]
            rows = torch.cat(fresh, dim=1)
        data = rows.cpu().numpy()
        return [self.prefix + data[i].tobytes() for i in range(size)]
