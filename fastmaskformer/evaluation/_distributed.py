"""Summing evaluator statistics across ranks (the only collective the evaluators need)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Return the element-wise sum of ``tensor`` over all ranks (a new tensor, same device).

    Without an initialised multi-rank group this is a copy. NCCL only reduces CUDA tensors and
    gloo prefers CPU ones, so the reduction runs on the backend's device and the result comes
    back to the device of ``tensor``. Every rank must call this with the same shape and dtype.
    """
    if not is_distributed():
        return tensor.clone()
    backend_device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    buffer = tensor.to(backend_device, copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
