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
from ..shared import FOCAL_ALPHA, FOCAL_GAMMA
from ._checks import check_embeddings, check_targets, default_input_size
from ._dispatch import load_kernel, resolve_impl
from ._library import reference_operator
from .mask_logits import embed_product

Indices = Sequence[tuple[Tensor, Tensor]]


def sigmoid_focal_loss_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """logits, targets [m, P] -> per-mask mean focal loss [m]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = FOCAL_ALPHA * targets + (1 - FOCAL_ALPHA) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA).mean(1)


def sigmoid_bce_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """logits, targets [m, P] -> per-mask mean sigmoid BCE [m] (Mask2Former's mask term)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)


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
        if si.unique().numel() != si.numel():
            raise ValueError(f"image {b}: a segment is matched more than once")
        out.append((qi, si))
    return out


def assignment_from_indices(layers: Sequence[Sequence[tuple[Tensor, Tensor]]], num_segments: Sequence[int]) -> Tensor:
    """Per layer, per image (query_idx, seg_idx) -> int64 [L, B, max M_b]: the query matched to
    each segment, -1 where none (the padded form the mask-loss operators take)."""
    width = max(num_segments, default=0)
    out = torch.full((len(layers), len(num_segments), width), -1, dtype=torch.int64)
    for layer, per_image in enumerate(layers):
        for b, (qi, si) in enumerate(per_image):
            out[layer, b, si] = qi
    return out


@reference_operator("mask_loss_reference", differentiable=("mask_embed", "pixel_embed"))
def mask_loss_reference(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                        num_masks: Tensor, loss: str = "focal") -> tuple[Tensor, Tensor]:
    """Plain PyTorch, per layer: the matched logits at full resolution [B, M, H, W].

    mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] (shared) or [L,B,C,h,w] (per layer); assignment
    int64 [L,B,M] (query of segment j of image b at layer l, or -1); seg_maps int32 [B,H,W] padded with -1; num_masks 0-d; loss
    "focal" (MaskFormer) or "bce" (Mask2Former's sigmoid BCE in the first term).
    Returns (focal or BCE), dice: fp32 [L].
    """
    num_layers, batch, _, channels = mask_embed.shape
    m = assignment.shape[-1]
    if m == 0:  # no segment in the batch: zero losses, still connected to the graph
        zero = (mask_embed.sum() + pixel_embed.sum()).float() * 0.0
        return zero.expand(num_layers).clone(), zero.expand(num_layers).clone()
    size = tuple(seg_maps.shape[-2:])
    segments = torch.arange(m, device=seg_maps.device)
    targets = (seg_maps[:, None] == segments[None, :, None, None]).flatten(2).float()  # [B, M, H*W]
    focal, dice = [], []
    for layer in range(num_layers):
        query = assignment[layer].clamp_min(0)[..., None].expand(batch, m, channels)
        embed = mask_embed[layer].float().gather(1, query)  # [B, M, C]
        pixels = pixel_embed[layer] if pixel_embed.dim() == 5 else pixel_embed
        logits = embed_product(embed, pixels)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).flatten(2)  # [B, M, H*W]
        matched = (assignment[layer] >= 0).float().flatten()
        first = sigmoid_bce_per_mask if loss == "bce" else sigmoid_focal_loss_per_mask
        per_mask = (first(logits.flatten(0, 1), targets.flatten(0, 1)),
                    dice_loss_per_mask(logits.flatten(0, 1), targets.flatten(0, 1)))
        focal.append((per_mask[0] * matched).sum() / num_masks)
        dice.append((per_mask[1] * matched).sum() / num_masks)
    return torch.stack(focal), torch.stack(dice)


def mask_loss_assigned(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                       num_masks, precision: str | None = None, impl: str = "auto",
                       loss: str = "focal") -> tuple[Tensor, Tensor]:
    """:func:`mask_loss` on the padded matching, with no host work: what the criterion calls
    (``torch.compile`` traces it whole).

    mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] shared by the layers or [L,B,C,h,w] per layer
    (EoMT); assignment int64 [L,B,M] on the device (query of segment j of image b at layer l,
    -1 = unmatched); seg_maps int32 [B,H,W] at the padded
    input size, -1 = no segment; num_masks: float or 0-d tensor; loss: "focal" (MaskFormer) or
    "bce" (Mask2Former's sigmoid BCE, the exact full-resolution form of its point-sampled loss).
    Returns fp32 (focal or BCE), dice [L].
    """
    check_embeddings(mask_embed, pixel_embed)
    if loss not in ("focal", "bce"):
        raise ValueError(f"mask loss must be 'focal' or 'bce', got {loss!r}")
    if mask_embed.dim() != 4 or assignment.dim() != 3 or assignment.shape[:2] != mask_embed.shape[:2]:
        raise ValueError(f"assignment {tuple(assignment.shape)} must be [L,B,M] for mask_embed "
                         f"{tuple(mask_embed.shape)} [L,B,Q,C]")
    if seg_maps.dim() != 3 or seg_maps.shape[0] != pixel_embed.shape[-4]:
        raise ValueError(f"seg_maps must be [B,H,W] with B={pixel_embed.shape[-4]} (pixel_embed "
                         f"{tuple(pixel_embed.shape)}), got {tuple(seg_maps.shape)}")
    num_masks = torch.as_tensor(num_masks, dtype=torch.float32, device=pixel_embed.device)
    assignment = assignment.to(pixel_embed.device, torch.int64)
    seg_maps = seg_maps.to(pixel_embed.device, torch.int32).contiguous()
    if resolve_impl(impl, mask_embed, pixel_embed, op="mask_loss") == "triton":
        return load_kernel("mask_loss", "mask_loss").mask_loss(mask_embed, pixel_embed, assignment, seg_maps,
                                                               num_masks, precision or "ieee", loss)
    return torch.ops.fastmaskformer.mask_loss_reference(mask_embed, pixel_embed, assignment, seg_maps, num_masks,
                                                        loss)


def mask_loss(mask_embed: Tensor, pixel_embed: Tensor, indices, targets: Sequence[Target], num_masks: float,
              input_size=None, precision: str | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Focal and dice loss (fp32) of the matched pairs of one decoder layer, or of all layers in
    one call.

    mask_embed: [B,Q,C] with indices per image (query_idx [m_b], seg_idx [m_b]) -> two scalars;
    or [L,B,Q,C] with indices per layer, per image -> two [L] tensors (the fused kernel then
    reads the pixel embeddings once for all layers). pixel_embed: [B,C,h,w], or [L,B,C,h,w]
    (per layer, beside [L,B,Q,C]); targets: B Targets
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
    check_targets(targets, pixel_embed.shape[-4], None, size)
    layers = [check_indices(layer, targets, mask_embed.shape[-2]) for layer in (indices if per_layer else [indices])]
    num_masks = float(num_masks)
    if not num_masks > 0:
        raise ValueError(f"num_masks must be positive, got {num_masks}")
    assignment = assignment_from_indices(layers, [t.num_segments for t in targets])
    seg_maps = pad_segment_maps(targets, size)
    focal, dice = mask_loss_assigned(mask_embed if per_layer else mask_embed[None], pixel_embed, assignment,
                                     seg_maps, num_masks, precision, impl)
    return (focal, dice) if per_layer else (focal[0], dice[0])
