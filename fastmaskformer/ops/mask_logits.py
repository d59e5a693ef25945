"""Mask logits from the lazy representation (DESIGN 1.1).

``logits[b, q, y, x] = <mask_embed[b, q, :], pixel_embed[b, :, y, x]>``, optionally bilinearly
upsampled (align_corners=False) to ``out_size``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_embeddings


def mask_logits_reference(mask_embed: Tensor, pixel_embed: Tensor, out_size=None) -> Tensor:
    """mask_embed [B,Q,C], pixel_embed [B,C,h,w] -> [B,Q,h,w] (or [B,Q,*out_size]), fp32."""
    logits = torch.einsum("bqc,bchw->bqhw", mask_embed.float(), pixel_embed.float())
    if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


def mask_logits(mask_embed: Tensor, pixel_embed: Tensor, out_size=None, impl: str = "auto") -> Tensor:
    """Mask logits ``[B,Q,h,w]``, or bilinearly upsampled to ``out_size`` ``[B,Q,H,W]``.

    mask_embed: [B,Q,C]; pixel_embed: [B,C,h,w]. Output is float32.
    """
    check_embeddings(mask_embed, pixel_embed)
    if mask_embed.dim() != 3:
        raise ValueError(f"mask_embed must be [B,Q,C], got shape {tuple(mask_embed.shape)}")
    from .mask_probs import resampled_masks

    size = list(pixel_embed.shape[-2:] if out_size is None else out_size)
    return resampled_masks(mask_embed, pixel_embed, size, size, size, False, torch.float32, impl)
