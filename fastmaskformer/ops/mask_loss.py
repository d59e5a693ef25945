"""Focal + dice loss of matched (query, segment) pairs (DESIGN 3).

Matched mask logits are bilinearly upsampled (align_corners=False) to the padded input size,
where the targets live; ignore and padding pixels are negatives for every mask (official: no
loss masking). With ``s = sigmoid(x)``, ``p_t = s t + (1-s)(1-t)``,
``a_t = a t + (1-a)(1-t)``:

    focal = sum_m mean_pixels(a_t (1 - p_t)^2 BCE(x, t)) / num_masks
    dice  = sum_m (1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1)) / num_masks
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..target import Target, pad_segment_maps
from ._checks import check_embeddings, check_targets, default_input_size
from ._dispatch import load_kernel, resolve_impl
from .matching_cost import FOCAL_ALPHA, FOCAL_GAMMA

Indices = Sequence[tuple[Tensor, Tensor]]


def sigmoid_focal_loss_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """logits, targets [m, P] -> per-mask mean focal loss [m]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = FOCAL_ALPHA * targets + (1 - FOCAL_ALPHA) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA).mean(1)


def dice_loss_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """logits, targets [m, P] -> per-mask dice loss [m]."""
    s = logits.sigmoid()
    numerator = 2 * (s * targets).sum(-1)
    denominator = s.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def check_indices(indices: Indices, targets: Sequence[Target], num_queries: int) -> list[tuple[Tensor, Tensor]]:
    """Validate per-image (query_idx [m], seg_idx [m]) pairs; returns them as int64 CPU tensors."""
    if len(indices) != len(targets):
        raise ValueError(f"got {len(indices)} index pairs for {len(targets)} images")
    out = []
    for b, (qi, si) in enumerate(indices):
        qi = torch.as_tensor(qi, dtype=torch.int64).flatten().cpu()
        si = torch.as_tensor(si, dtype=torch.int64).flatten().cpu()
        if qi.numel() != si.numel():
            raise ValueError(f"image {b}: {qi.numel()} query indices but {si.numel()} segment indices")
        if qi.numel() and (int(qi.min()) < 0 or int(qi.max()) >= num_queries):
            raise ValueError(f"image {b}: query index out of range [0, {num_queries})")
        m = targets[b].num_segments
        if si.numel() and (int(si.min()) < 0 or int(si.max()) >= m):
            raise ValueError(f"image {b}: segment index out of range [0, {m})")
        out.append((qi, si))
    return out


def mask_loss_reference(mask_embed: Tensor, pixel_embed: Tensor, indices: Indices,
                        targets: Sequence[Target], num_masks: float, input_size) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: materialises the matched logits at full resolution [M_total, H, W]."""
    device = mask_embed.device
    padded = pad_segment_maps(targets, tuple(input_size)).to(device)  # [B, H, W]
    logits, masks = [], []
    for b, (qi, si) in enumerate(indices):
        if qi.numel() == 0:
            continue
        emb = mask_embed[b, qi.to(device)].float()  # [m, C]
        logits.append(torch.einsum("mc,chw->mhw", emb, pixel_embed[b].float()))
        masks.append(padded[b][None] == si.to(device)[:, None, None])
    if not logits:
        zero = (mask_embed.sum() + pixel_embed.sum()).float() * 0.0  # keeps the graph connected
        return zero, zero.clone()
    logits = F.interpolate(torch.cat(logits)[:, None], size=tuple(input_size), mode="bilinear",
                           align_corners=False)[:, 0].flatten(1)  # [M_total, H*W]
    masks = torch.cat(masks).flatten(1).float()
    focal = sigmoid_focal_loss_per_mask(logits, masks).sum() / num_masks
    dice = dice_loss_per_mask(logits, masks).sum() / num_masks
    return focal, dice


def mask_loss(mask_embed: Tensor, pixel_embed: Tensor, indices, targets: Sequence[Target], num_masks: float,
              input_size=None, precision: str | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Focal and dice loss (fp32) of the matched pairs of one decoder layer, or of all layers in
    one call.

    mask_embed: [B,Q,C] with indices per image (query_idx [m_b], seg_idx [m_b]) -> two scalars;
    or [L,B,Q,C] with indices per layer, per image -> two [L] tensors (the fused kernel then
    reads the pixel embeddings once for all layers). pixel_embed: [B,C,h,w]; targets: B Targets
    at input resolution (padded to ``input_size``, default (4h, 4w), with -1); num_masks: the
    normaliser (total GT segments, clamped >= 1). precision (fused path): "ieee" (default: the
    low-res matmuls follow PyTorch's fp32 matmul settings, like the reference) or "tf32"
    (opt-in fast mode: TF32 tensor cores for them).
    """
    check_embeddings(mask_embed, pixel_embed)
    per_layer = mask_embed.dim() == 4
    if per_layer and len(indices) != mask_embed.shape[0]:
        raise ValueError(f"got indices for {len(indices)} layers but mask_embed has {mask_embed.shape[0]}")
    size = default_input_size(pixel_embed, input_size)
    check_targets(targets, pixel_embed.shape[0], None, size)
    layers = [check_indices(layer, targets, mask_embed.shape[-2]) for layer in (indices if per_layer else [indices])]
    num_masks = float(num_masks)
    if not num_masks > 0:
        raise ValueError(f"num_masks must be positive, got {num_masks}")
    embeds = mask_embed if per_layer else mask_embed[None]
    if resolve_impl(impl, mask_embed, pixel_embed, op="mask_loss") == "triton":
        kernel = load_kernel("mask_loss", "mask_loss")
        focal, dice = kernel.mask_loss(embeds, pixel_embed, layers, targets, num_masks, size, precision or "ieee")
    else:
        losses = [mask_loss_reference(e, pixel_embed, idx, targets, num_masks, size) for e, idx in zip(embeds, layers)]
        focal, dice = (torch.stack(t) for t in zip(*losses))
    return (focal, dice) if per_layer else (focal[0], dice[0])
