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
    """mask_embed [B,Q,C] or [L,B,Q,C] (L predictions); pixel_embed [B,C,h,w] (features shared
    by every prediction) or [L,B,C,h,w] (prediction l's own features pixel_embed[l]: EoMT), the
    latter only beside [L,B,Q,C] with the same L. They must agree on B, C and the device."""
    check_float("mask_embed", mask_embed, mask_embed.dim() if mask_embed.dim() in (3, 4) else 3)
    check_float("pixel_embed", pixel_embed, pixel_embed.dim() if pixel_embed.dim() in (4, 5) else 4)
    shapes = f"mask_embed {tuple(mask_embed.shape)} vs pixel_embed {tuple(pixel_embed.shape)}"
    if pixel_embed.dim() == 5 and (mask_embed.dim() != 4 or mask_embed.shape[0] != pixel_embed.shape[0]):
        raise ValueError(f"prediction count mismatch: per-prediction pixel_embed [L,B,C,h,w] needs mask_embed "
                         f"[L,B,Q,C] with the same L, got {shapes}")
    if mask_embed.shape[-3] != pixel_embed.shape[-4]:
        raise ValueError(f"batch mismatch: {shapes}")
    if mask_embed.shape[-1] != pixel_embed.shape[-3]:
        raise ValueError(f"channel mismatch: mask_embed has C={mask_embed.shape[-1]}, pixel_embed has "
                         f"C={pixel_embed.shape[-3]} ({shapes})")
    if mask_embed.device != pixel_embed.device:
        raise ValueError(f"mask_embed on {mask_embed.device} but pixel_embed on {pixel_embed.device}")


# ---------------------------------------------------------------------------- pixel features
# pixel_embed is [B,C,h,w] (MaskFormer, Mask2Former: one map shared by all predictions) or
# [L,B,C,h,w] (EoMT: every prediction has its own upscaled tokens). These pick the features of
# the predictions an op reads, as views (no copy).
def final_pixel_embed(pixel_embed: Tensor) -> Tensor:
    """The final prediction's features [B,C,h,w]: pixel_embed[-1] when per prediction. What the
    inference ops (which post-process the final prediction) read."""
    check_float("pixel_embed", pixel_embed, pixel_embed.dim() if pixel_embed.dim() in (4, 5) else 4)
    return pixel_embed[-1] if pixel_embed.dim() == 5 else pixel_embed


def select_pixel_embed(pixel_embed: Tensor, predictions: list[int]) -> Tensor:
    """The features of the selected ``predictions`` (indices, as ``mask_embed[predictions]``):
    per-prediction [L,B,C,h,w] -> [L',B,C,h,w], a view when the indices are consecutive (all
    layers, or the last: what the criteria select; an index list would copy the whole map); a
    shared [B,C,h,w] map is returned as it is."""
    if pixel_embed.dim() != 5:
        return pixel_embed
    start = predictions[0] if len(predictions) else 0
    if list(predictions) == list(range(start, start + len(predictions))):
        return pixel_embed[start:start + len(predictions)]
    return pixel_embed[predictions]


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


Size = tuple[int, int]


def check_input_size(pixel_embed: Tensor, input_size: Size | None) -> Size:
    """The model input size (H_in, W_in) the stride-4 ``pixel_embed [.., h, w]`` came from:
    ``input_size`` or, by default, (4h, 4w). Mask logits are upsampled to it."""
    h, w = int(pixel_embed.shape[-2]), int(pixel_embed.shape[-1])
    if input_size is None:
        return 4 * h, 4 * w
    size = (int(input_size[0]), int(input_size[1]))
    if size[0] < h or size[1] < w:
        raise ValueError(f"input_size {size} is smaller than the pixel embedding ({h}, {w}); it must be "
                         "the model input size the stride-4 embedding came from")
    return size


def check_sizes(image_sizes: Sequence[Size], output_sizes: Sequence[Size] | None, batch: int,
                input_size: Size) -> tuple[list[Size], list[Size]]:
    """Per-image (unpadded input size, output size), checked against the model input size."""
    image_sizes = [(int(h), int(w)) for h, w in image_sizes]
    output_sizes = image_sizes if output_sizes is None else [(int(h), int(w)) for h, w in output_sizes]
    if len(image_sizes) != batch or len(output_sizes) != batch:
        raise ValueError(f"need {batch} image_sizes and output_sizes, got {len(image_sizes)} and {len(output_sizes)}")
    for i, ((h, w), (oh, ow)) in enumerate(zip(image_sizes, output_sizes)):
        if not (0 < h <= input_size[0] and 0 < w <= input_size[1]):
            raise ValueError(f"image_sizes[{i}] = {(h, w)} must be positive and within the model input size {input_size}")
        if oh <= 0 or ow <= 0:
            raise ValueError(f"output_sizes[{i}] = {(oh, ow)} must be positive")
    return image_sizes, output_sizes
