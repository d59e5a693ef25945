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
- Layer-wise lr decay over a ViT's blocks (``layer_decay``, EoMT's ``llrd``; 1.0 = off): see
  :func:`layer_decay_exponents`.
- ``lr_scheduler: two_stage_poly`` (EoMT's ``TwoStageWarmupPolySchedule``): the non-backbone
  groups warm up linearly from 0 over ``warmup_iters`` and then decay as poly over the rest; the
  backbone groups stay at 0 for those ``warmup_iters``, warm up over ``backbone_warmup_iters``,
  then decay as poly over the rest (:class:`TwoStageWarmupPoly`; ``warmup_factor`` is unused:
  both warm-ups start at 0, as the official).
- Full-model gradient-norm clipping (``clip_grad_norm``, official 0.01): one norm over all
  parameters together, not per group.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

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


def layer_decay_exponents(model: nn.Module, query_blocks_decay: bool = True) -> dict[str, int]:
    """The official EoMT layer-wise lr decay rule (tue-mps/eomt ``LightningModule.configure_optimizers``)
    as exponents: parameter ``name`` of ``model`` (an EoMT: ``model.backbone`` a ``ViTEncoder``)
    -> e, its lr being ``lr * layer_decay ** e``. With D = the ViT's depth:

    - block i: e = D - 1 - i (the last block 0); a query block (the last ``model.num_blocks``)
      gets e = 0 instead when ``query_blocks_decay`` is false (official ``llrd_l2_enabled: False``,
      the DINOv3 configs);
    - ViT parameters registered before the blocks (patch embedding, class / register tokens,
      position embedding): block 0's e = D - 1 (the official walks the parameters backwards and
      keeps the last block index it saw);
    - the ViT's final norm (and anything registered after the blocks): e = 0;
    - everything outside the ViT (queries, heads, upscaler): not listed (e = 0).
    """
    from ..modeling.vit import ViTEncoder

    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, ViTEncoder):
        raise ValueError(f"solver.layer_decay needs a ViT encoder (meta_arch eomt), got a {type(model).__name__} "
                         f"with backbone {type(backbone).__name__}; set solver.layer_decay: 1.0")
    depth = len(backbone.blocks)
    first_query_block = depth - model.num_blocks
    exponents: dict[str, int] = {}
    seen_block = False
    for name, _ in backbone.vit.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            seen_block, block = True, int(parts[1])
            exempt = block >= first_query_block and not query_blocks_decay
            exponents[f"backbone.vit.{name}"] = 0 if exempt else depth - 1 - block
        else:
            exponents[f"backbone.vit.{name}"] = 0 if seen_block else depth - 1
    return exponents


def build_param_groups(model: nn.Module, solver) -> list[dict]:
    """AdamW parameter groups for ``model`` (unwrapped, not DDP) from a ``SolverConfig``.

    Each trainable parameter appears once; groups are keyed by (lr, weight_decay) and carry a
    ``name`` ("backbone"/"head" + "/decay", "/norm" or "/embed"; with ``layer_decay != 1`` the
    backbone names end in "/layer{e}", lr x layer_decay**e, see :func:`layer_decay_exponents`)
    for logging, the two-stage schedule and tests.
    """
    exponents = layer_decay_exponents(model, solver.layer_decay_query_blocks) if solver.layer_decay != 1.0 else {}
    groups: dict[tuple, dict] = {}
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
            name = f"{part}/{kind}"
            if full_name in exponents:
                lr *= solver.layer_decay ** exponents[full_name]
                name += f"/layer{exponents[full_name]}"
            if name not in groups:
                groups[name] = {"name": name, "params": [], "lr": lr, "weight_decay": weight_decay}
            groups[name]["params"].append(param)
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


class TwoStageWarmupPoly:
    """LR multiplier of one parameter group under EoMT's two-stage schedule (official
    ``TwoStageWarmupPolySchedule.get_lr``): 0 for the first ``delay`` iterations (the backbone
    waits for the heads' warm-up), then a linear rise from 0 over ``warmup_iters``, then
    ``(1 - t / max(1, max_iter - delay - warmup_iters)) ** power`` with t the iterations since
    the warm-up ended (clamped at 0 past ``max_iter``). Non-backbone groups: ``delay = 0``,
    ``warmup_iters`` = the first stage; backbone groups: ``delay`` = the first stage,
    ``warmup_iters`` = the second. Plain fields, as :class:`WarmupPoly`."""

    def __init__(self, max_iter: int, power: float = 0.9, warmup_iters: int = 0, delay: int = 0):
        if max_iter <= 0:
            raise ValueError(f"max_iter must be positive, got {max_iter}")
        if warmup_iters < 0 or delay < 0:
            raise ValueError(f"warm-up lengths must be >= 0, got {warmup_iters} (warm-up) and {delay} (delay)")
        self.max_iter, self.power = int(max_iter), float(power)
        self.warmup_iters, self.delay = int(warmup_iters), int(delay)

    def __call__(self, it: int) -> float:
        if it < self.delay:
            return 0.0
        if it < self.delay + self.warmup_iters:
            return (it - self.delay) / self.warmup_iters
        decay_iters = max(1, self.max_iter - self.delay - self.warmup_iters)
        return max(0.0, 1.0 - (it - self.delay - self.warmup_iters) / decay_iters) ** self.power


def _warmup(it: int, warmup_iters: int, warmup_factor: float) -> float:
    """Linear warmup factor: ``warmup_factor`` at 0 rising to 1 at ``warmup_iters``."""
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return warmup_factor * (1 - alpha) + alpha


def build_lr_scheduler(optimizer: torch.optim.Optimizer, solver) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration warmup + ``solver.lr_scheduler`` ("poly", "step" or "two_stage_poly")
    schedule: call ``scheduler.step()`` once per optimiser step. two_stage_poly tells the
    backbone groups by their name (``build_param_groups``)."""
    if solver.lr_scheduler == "two_stage_poly":
        schedules = [TwoStageWarmupPoly(solver.max_iter, solver.poly_power, solver.backbone_warmup_iters,
                                        delay=solver.warmup_iters)
                     if group.get("name", "").startswith("backbone") else
                     TwoStageWarmupPoly(solver.max_iter, solver.poly_power, solver.warmup_iters)
                     for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    if solver.lr_scheduler == "poly":
        schedule = WarmupPoly(solver.max_iter, solver.poly_power, solver.warmup_iters, solver.warmup_factor)
    elif solver.lr_scheduler == "step":
        schedule = WarmupMultiStep(solver.steps, solver.gamma, solver.warmup_iters, solver.warmup_factor)
    else:
        raise ValueError(f"solver.lr_scheduler must be 'poly', 'step' or 'two_stage_poly', got {solver.lr_scheduler!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Full-model clipping: one L2 norm over every gradient. Returns the norm before clipping
    (non-finite when a gradient is; the caller decides; a plain tensor under FSDP too).
    ``max_norm <= 0`` only measures."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    # max_norm inf: a clip coefficient of exactly 1 (FSDP's sharded gradients need the library's norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, error_if_nonfinite=False)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
