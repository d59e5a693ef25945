"""FSDP2 and activation checkpointing for the trainer (``solver.fsdp``, ``solver.activation_checkpointing``).

- :func:`shard_model`: ``torch.distributed.fsdp.fully_shard`` on every ViT block, then on the
  whole model (the root unit holds the patch embedding, the final norm, the queries and the
  heads). Parameters become DTensors sharded over all ranks; gradients are reduce-scattered and
  averaged over ranks, as DDP averages them.
- :func:`enable_activation_checkpointing`: each ViT block's activations are recomputed in the
  backward pass (``torch.utils.checkpoint``, non-reentrant; with or without FSDP).
- Checkpoints stay full state dicts, whatever the wrapping: :func:`full_state` gathers every
  sharded tensor (a collective: every rank calls it) so rank 0 writes the same file one
  process or DDP writes; :func:`shard_model_state` / :func:`shard_optimizer_state` cut a full
  state dict back into this rank's shards on load.

Both options need an encoder walked block by block: EoMT (``meta_arch: eomt``) only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def check_options(solver, meta_arch: str, world_size: int) -> None:
    """ValueError naming the problem when ``solver.fsdp`` / ``solver.activation_checkpointing``
    cannot apply to this run."""
    for option in ("fsdp", "activation_checkpointing"):
        if getattr(solver, option) and meta_arch != "eomt":
            raise ValueError(f"solver.{option} supports meta_arch eomt (one unit per ViT block), not {meta_arch}")
    if solver.fsdp and world_size == 1:
        raise ValueError("solver.fsdp shards the model over torchrun's processes and this run has one: "
                         "launch with torchrun --nproc_per_node N (N >= 2) or leave --fsdp off")
    if solver.fsdp and solver.eval_period > 0:
        raise ValueError("solver.fsdp trains without periodic evaluation (set solver.eval_period=0) and "
                         "evaluate its checkpoints with `fastmaskformer eval` (they are full state dicts)")


def _vit_of(model: nn.Module, option: str):
    from ..modeling.vit import ViTEncoder

    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, ViTEncoder):
        raise ValueError(f"{option} supports meta_arch eomt (one unit per ViT block), not a {type(model).__name__}")
    return backbone


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each ViT block in the backward pass instead of keeping its activations."""
    _vit_of(model, "solver.activation_checkpointing").activation_checkpointing = True


def shard_model(model: nn.Module) -> None:
    """FSDP2 in place: one unit per ViT block plus the root (the process group must exist)."""
    from torch.distributed.fsdp import fully_shard

    for block in _vit_of(model, "solver.fsdp").blocks:
        fully_shard(block)
    fully_shard(model)


def full_state(state):
    """A (nested) state dict with every DTensor gathered into a plain tensor. A collective under
    FSDP: every rank calls it, in the same order (state dicts are ordered)."""
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return {k: full_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [full_state(v) for v in state]
    return state


def _shard_like(full: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's shard of ``full`` laid out as ``like`` (every rank holds ``full``: no communication)."""
    if full.shape != like.shape:
        raise ValueError(f"a full tensor of shape {tuple(full.shape)} cannot fill a sharded {tuple(like.shape)}")
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_model_state(state: dict, model: nn.Module) -> dict:
    """A full model state dict with each entry of a sharded parameter or buffer cut like it."""
    current = model.state_dict()
    return {k: _shard_like(v, current[k]) if isinstance(current.get(k), DTensor) and torch.is_tensor(v) else v
            for k, v in state.items()}


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (integer parameter ids in param-group order, as
    ``Optimizer.state_dict``) with every per-parameter tensor of a parameter's shape cut like
    the parameter (AdamW's moments; the scalar ``step`` stays whole)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        sharded[index] = {k: _shard_like(v, param) if isinstance(param, DTensor) and torch.is_tensor(v)
                          and v.shape == param.shape else v for k, v in values.items()}
    return {**state, "state": sharded}
