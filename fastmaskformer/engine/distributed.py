"""Process-group setup for ``torchrun`` (single node or multi-node) and rank-0 helpers.

``torchrun --nproc_per_node N -m fastmaskformer.cli train ...`` sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`init_distributed` reads them and starts NCCL on GPUs, gloo on CPUs.
Without those variables everything runs as a single process (rank 0 of 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """rank / world_size over all processes, local_rank on this node, and this process's device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment, if any.

    device: "cpu", "cuda", "cuda:1" or None/"auto" (CUDA when available). Under torchrun each
    process takes GPU ``LOCAL_RANK``; the backend is NCCL for CUDA and gloo for the CPU.
    Calling it again once the group exists only reports the state.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, dev)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` (picklable) as a list indexed by rank on rank 0, None on the other
    ranks. A collective: every rank must call it."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of Python floats over ranks (same keys on every rank)."""
    if get_world_size() == 1 or not values:
        return dict(values)
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=backend_device)
    dist.all_reduce(buf)
    buf /= get_world_size()
    return dict(zip(keys, buf.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    if get_world_size() == 1:
        return flag
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.tensor([1.0 if flag else 0.0], device=backend_device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return bool(buf.item() > 0)


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
