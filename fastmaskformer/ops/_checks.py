"""Argument checks shared by the public ops: clear errors before any kernel runs."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..target import Target, validate_targets

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name: str, x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


def check_embeddings(mask_embed: Tensor, pixel_embed: Tensor) -> None:
    """mask_embed [B,Q,C] (or [L,B,Q,C]) and pixel_embed [B,C,h,w] must agree on B and C."""
    check_float("mask_embed", mask_embed, mask_embed.dim() if mask_embed.dim() in (3, 4) else 3)
    check_float("pixel_embed", pixel_embed, 4)
    if mask_embed.shape[-3] != pixel_embed.shape[0]:
        raise ValueError(
            f"batch mismatch: mask_embed {tuple(mask_embed.shape)} vs pixel_embed {tuple(pixel_embed.shape)}"
        )
    if mask_embed.shape[-1] != pixel_embed.shape[1]:
        raise ValueError(
            f"channel mismatch: mask_embed has C={mask_embed.shape[-1]}, pixel_embed has C={pixel_embed.shape[1]}"
        )
    if mask_embed.device != pixel_embed.device:
        raise ValueError(f"mask_embed on {mask_embed.device} but pixel_embed on {pixel_embed.device}")


def check_targets(targets: Sequence[Target], batch: int, num_classes: int | None,
                  input_size: tuple[int, int]) -> None:
    """targets: one Target per image, labels in [0, num_classes), maps no larger than input_size."""
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
    if num_classes is not None:
        validate_targets(targets, num_classes)
    for i, t in enumerate(targets):
        h, w = t.image_size
        if h > input_size[0] or w > input_size[1]:
            raise ValueError(
                f"target {i} segment map is {h}x{w}, larger than the padded input size "
                f"{input_size[0]}x{input_size[1]}"
            )


def default_input_size(pixel_embed: Tensor, input_size, stride: int = 4) -> tuple[int, int]:
    """Padded input size (H, W); pixel_embed is at stride 4 of it (DESIGN 1)."""
    if input_size is None:
        return int(pixel_embed.shape[-2]) * stride, int(pixel_embed.shape[-1]) * stride
    return int(input_size[0]), int(input_size[1])
