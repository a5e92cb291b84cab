"""Safetensors bytes <-> Params: the packer the engine uses for many clients at once."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from models.kernels import BatchedLearner, pad_batch, unstack
from models.maml import InnerLoopConfig, Learner, mse_loss
from models.nets import MLP
from models.params import BytesPacker, Params, from_bytes, to_bytes

torch.set_num_threads(1)


def make_learner(*, adapt: str = "all") -> tuple[Learner, Params, Params]:
    torch.manual_seed(0)
    net = MLP()
    inner = InnerLoopConfig(steps=5, lr=0.02, adapt=adapt)  # type: ignore[arg-type]
    learner = Learner(net, mse_loss, inner)
    return learner, {n: p.detach().clone() for n, p in net.named_parameters()}, {}


def sinusoids(sizes: list[int], seed: int = 1) -> tuple[list[Tensor], list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(k, 1, generator=g) * 10 - 5 for k in sizes]
    return xs, [2.0 * torch.sin(x - 1.0) for x in xs]


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_bytes_packer_is_byte_identical_to_safetensors(adapt: str) -> None:
    learner, params, lrs = make_learner(adapt=adapt)
    batch = BatchedLearner(learner, params, lrs)
    xs, ys = sinusoids([3, 8, 5])
    x, y, w = pad_batch(xs, ys)
    fast = batch.adapt(x, y, w).fast  # strided views of the kernel's stacks
    packer = BytesPacker(learner.split(params)[0])
    blobs = packer.pack(fast)
    for blob, one in zip(blobs, unstack(fast), strict=True):
        assert blob == to_bytes(one)
        back = from_bytes(blob)
        for name, tensor in one.items():
            assert torch.equal(back[name], tensor)
    with pytest.raises(ValueError, match="shape"):
        packer.pack({n: t[..., :1] for n, t in fast.items()})


def test_the_packer_reads_blobs_back_flat_and_unflattens_a_batch() -> None:
    """The engine caches each client's params as one flat tensor: from a blob of ours (its
    data section) or any safetensors of the same params, and back to (B, ...) per entry."""
    learner, params, lrs = make_learner()
    xs, ys = sinusoids([5, 7, 3])
    fast = BatchedLearner(learner, params, lrs).adapt(*pad_batch(xs, ys), steps=2).fast
    packer = BytesPacker(learner.split(params)[0])
    ours = packer.pack(fast)
    foreign = [to_bytes(dict(reversed(list(one.items())))) for one in unstack(fast)]
    for blobs in (ours, foreign):
        flat = torch.stack([packer.unpack(blob) for blob in blobs])  # (B, P)
        assert flat.shape == (3, packer.numel) and flat.is_contiguous()
        back = packer.unflatten(flat)
        for name, tensor in fast.items():
            assert torch.equal(back[name], tensor)
    with pytest.raises(ValueError, match="differ"):
        packer.unpack(to_bytes({n: t[0, ..., :1].contiguous() for n, t in fast.items()}))
