"""Mask probabilities ``sigmoid(pred_masks)`` for users who want them (DESIGN 1.1, issue 5).

Without sizes: ``[B,Q,h,w]`` at the stride-4 resolution. With ``image_sizes`` and/or
``output_sizes``: per image ``[Q,H_i,W_i]``, the logits resampled as the official
post-processing does (upsample to the padded input (4h, 4w), crop to the image size, resize to
the output size) and then the sigmoid, as panoptic and instance inference see them.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._checks import check_embeddings
from ._dispatch import load_kernel, resolve_impl
from .inference import check_input_size, check_sizes, resized_mask_logits_reference
from .mask_logits import mask_logits_reference

Size = tuple[int, int]
OUT_DTYPES = (torch.float32, torch.bfloat16)


def mask_probs_reference(mask_embed: Tensor, pixel_embed: Tensor, image_sizes=None,
                         output_sizes=None, out_dtype: torch.dtype = torch.float32, input_size=None):
    """The plain-PyTorch spec of :func:`mask_probs` (arguments already normalised)."""
    if image_sizes is None and output_sizes is None:
        return mask_logits_reference(mask_embed, pixel_embed).sigmoid().to(out_dtype)
    return [resized_mask_logits_reference(mask_embed[b], pixel_embed[b], image_sizes[b],
                                          output_sizes[b], input_size).sigmoid().to(out_dtype)
            for b in range(mask_embed.shape[0])]


def mask_probs(mask_embed: Tensor, pixel_embed: Tensor, image_sizes: Sequence[Size] | None = None,
               output_sizes: Sequence[Size] | None = None, out_dtype: torch.dtype = torch.float32,
               input_size: Size | None = None, impl: str = "auto"):
    """Sigmoid mask probabilities in ``out_dtype`` (float32 or bfloat16).

    mask_embed [B,Q,C], pixel_embed [B,C,h,w]. Without sizes returns ``[B,Q,h,w]``. Otherwise a
    list of ``[Q,H_i,W_i]``: ``image_sizes`` are the unpadded inputs (default: the whole model
    input), ``output_sizes`` the original sizes (default: ``image_sizes``); ``input_size`` is the
    model input (padded batch) size the logits are upsampled to (default (4h, 4w)).
    """
    check_embeddings(mask_embed, pixel_embed)
    if mask_embed.dim() != 3:
        raise ValueError(f"mask_embed must be [B,Q,C], got shape {tuple(mask_embed.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    batch = mask_embed.shape[0]
    input_size = check_input_size(pixel_embed, input_size)
    if image_sizes is not None or output_sizes is not None:
        image_sizes, output_sizes = check_sizes([input_size] * batch if image_sizes is None else image_sizes,
                                                output_sizes, batch, input_size)
    if resolve_impl(impl, mask_embed, pixel_embed, op="mask_probs") == "triton":
        return load_kernel("mask_probs", "mask_probs").mask_probs(mask_embed, pixel_embed, image_sizes,
                                                                  output_sizes, out_dtype, input_size)
    return mask_probs_reference(mask_embed, pixel_embed, image_sizes, output_sizes, out_dtype, input_size)
