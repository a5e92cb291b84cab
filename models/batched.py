"""Temporary shim for the redesign merge; removed by the coordinator."""

from models.kernels import BatchedLearner, pad_batch
from models.kernels import KernelPath as Path
from models.params import BytesPacker

__all__ = ["BatchedLearner", "BytesPacker", "Path", "pad_batch"]
