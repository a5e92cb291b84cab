"""The engine's batched kernels: B clients of one meta-model adapted and predicted per call.

``pick`` (``BatchedLearner`` picks the kernel, the batch layout), ``vmap`` (torch.func for
any net, plain autograd for one task, the frozen body outside vmap) and ``mlp_bmm`` (the
hand-batched ReLU MLP). Their maths is ``models.maml``'s; they do not restate it.
"""

from models.kernels.pick import BatchedLearner, KernelPath, pad_batch, stack, unstack
from models.kernels.vmap import CPU_BODY_ROWS, autograd_adapt, body_features

__all__ = [
    "CPU_BODY_ROWS",
    "BatchedLearner",
    "KernelPath",
    "autograd_adapt",
    "body_features",
    "pad_batch",
    "stack",
    "unstack",
]
