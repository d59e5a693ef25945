"""Optimiser and learning-rate schedule exactly as the official MaskFormer (DESIGN 5).

- AdamW with per-parameter groups: backbone parameters get ``lr * backbone_multiplier``;
  parameters of normalisation layers (BatchNorm, GroupNorm, LayerNorm, ...) get
  ``weight_decay_norm`` and embeddings (``nn.Embedding``, e.g. the query embedding, and Swin's
  relative-position tables / absolute position embedding) get ``weight_decay_embed`` (0 in
  the official configs).
- Per-iteration schedule (``lr_scheduler``): linear warmup (``warmup_factor`` -> 1 over
  ``warmup_iters``) times poly decay ``(1 - it / max_iter) ** poly_power``, as detectron2's
  ``WarmupPolyLR`` ("poly", the semantic configs), or times ``gamma ** (steps passed)``, as
  detectron2's default ``WarmupMultiStepLR`` ("step", the COCO panoptic configs).
- Full-model gradient-norm clipping (``clip_grad_norm``, official 0.01): one norm over all
  parameters together, not per group.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Iterable

import torch
from torch import nn

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
)
# Swin's parameter-only embeddings (not nn.Embedding modules); the official build_optimizer
# exempts them from weight decay by name.
_EMBED_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def _is_norm(module: nn.Module) -> bool:
    # timm's norm layers (LayerNorm2d, BatchNormAct2d, FrozenBatchNorm2d ...) subclass these or
    # carry "Norm" in their class name
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def build_param_groups(model: nn.Module, solver) -> list[dict]:
    """AdamW parameter groups for ``model`` (unwrapped, not DDP) from a ``SolverConfig``.

    Each trainable parameter appears once; groups are keyed by (lr, weight_decay) and carry a
    ``name`` ("backbone"/"head" + "/decay", "/norm" or "/embed") for logging and tests.
    """
    groups: dict[tuple[str, str], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            part = "backbone" if full_name.startswith("backbone.") else "head"
            lr = solver.lr * (solver.backbone_multiplier if part == "backbone" else 1.0)
            if _is_norm(module):
                kind, weight_decay = "norm", solver.weight_decay_norm
            elif isinstance(module, nn.Embedding) or param_name in _EMBED_PARAM_NAMES:
                kind, weight_decay = "embed", solver.weight_decay_embed
            else:
                kind, weight_decay = "decay", solver.weight_decay
            key = (part, kind)
            if key not in groups:
                groups[key] = {"name": f"{part}/{kind}", "params": [], "lr": lr, "weight_decay": weight_decay}
            groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, solver) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` (betas and eps: PyTorch defaults, as detectron2)."""
    return torch.optim.AdamW(build_param_groups(model, solver), lr=solver.lr, weight_decay=solver.weight_decay)


class WarmupPoly:
    """LR multiplier at iteration ``it`` (a LambdaLR lambda; plain fields so that the
    scheduler's state_dict holds primitives only and loads with ``weights_only=True``)."""

    def __init__(self, max_iter: int, power: float = 0.9, warmup_iters: int = 0, warmup_factor: float = 1.0):
        if max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {max_iter}")
        self.max_iter = int(max_iter)
        self.power = float(power)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, it: int) -> float:
        return _warmup(it, self.warmup_iters, self.warmup_factor) * max(0.0, 1.0 - it / self.max_iter) ** self.power


class WarmupMultiStep:
    """LR multiplier ``warmup * gamma ** (number of steps <= it)`` (detectron2's
    ``WarmupMultiStepLR``); plain fields, as :class:`WarmupPoly`."""

    def __init__(self, steps, gamma: float = 0.1, warmup_iters: int = 0, warmup_factor: float = 1.0):
        self.steps = [int(s) for s in steps]
        if self.steps != sorted(self.steps) or any(s <= 0 for s in self.steps):
            raise ValueError(f"solver.steps must be increasing positive iterations, got {list(steps)}")
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, it: int) -> float:
        return _warmup(it, self.warmup_iters, self.warmup_factor) * self.gamma ** bisect_right(self.steps, it)


def _warmup(it: int, warmup_iters: int, warmup_factor: float) -> float:
    """Linear warmup factor: ``warmup_factor`` at 0 rising to 1 at ``warmup_iters``."""
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return warmup_factor * (1 - alpha) + alpha


def build_lr_scheduler(optimizer: torch.optim.Optimizer, solver) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration warmup + ``solver.lr_scheduler`` ("poly" or "step") schedule: call
    ``scheduler.step()`` once per optimiser step."""
    if solver.lr_scheduler == "poly":
        schedule = WarmupPoly(solver.max_iter, solver.poly_power, solver.warmup_iters, solver.warmup_factor)
    elif solver.lr_scheduler == "step":
        schedule = WarmupMultiStep(solver.steps, solver.gamma, solver.warmup_iters, solver.warmup_factor)
    else:
        raise ValueError(f"solver.lr_scheduler must be 'poly' or 'step', got {solver.lr_scheduler!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Full-model clipping: one L2 norm over every gradient. Returns the norm before clipping
    (non-finite when a gradient is; the caller decides). ``max_norm <= 0`` only measures."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
