"""EoMT's official semantic inference over overlapping square windows.

The official code (tue-mps/eomt ``training/lightning_module.py``: ``window_imgs_semantic``,
``revert_window_logits_semantic``, ``to_per_pixel_logits_semantic``) resizes an image's shorter
side to the model's square size S, cuts ``ceil(long / S)`` windows of S x S spread evenly along
the longer side (overlapping where S does not divide it), runs the windows as one batch, and per
window forms the class scores ``sum_q softmax(cls)[q, :K] sigmoid(mask_q)`` at S x S (mask logits
bilinearly upsampled from S/4). The scores of overlapping windows are averaged in the resized
image's frame, bilinearly resized to the original size, and argmaxed.

What is materialised, and why: averaging needs every class's score of every pixel a window
covers, so per window the Q mask probabilities [Q, S, S] (the fused ``mask_probs`` operator
with ``impl`` "triton") and its K class scores [K, S, S] exist, and per image the averaged
scores [K, h, w] at the resized size and [K, H, W] at the original size (the ``argmax``-fused
path of ``semantic_inference`` cannot be used: the argmax comes after the average). Panoptic and
instance inference need no windows (EoMT pads to S x S instead) and stay lazy.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import Size, check_embeddings, check_float, final_pixel_embed
from .mask_logits import resampled_masks


def semantic_windows(resized_size: Size, window: int) -> list[tuple[int, int]]:
    """(top, left) of the official windows of an image of ``resized_size`` (h, w) whose shorter
    side is ``window``: ``n = ceil(long / window)`` windows along the longer side (the width
    when h == w), window j starting at ``int(j * (window - overlap / (n - 1)))`` where
    ``overlap = n * window - long`` (0 when n = 1), so the first starts at 0 and the last ends
    at the far edge."""
    h, w = int(resized_size[0]), int(resized_size[1])
    if min(h, w) != window:
        raise ValueError(f"EoMT windows need the shorter image side at the window size {window}, "
                         f"got an image of {h}x{w}")
    long = max(h, w)
    count = math.ceil(long / window)
    overlap = count * window - long
    shift = overlap / (count - 1) if overlap > 0 else 0
    starts = [int(j * (window - shift)) for j in range(count)]
    return [(s, 0) if h > w else (0, s) for s in starts]


def window_semantic_inference(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                              windows: Sequence[tuple[int, int, int]], resized_sizes: Sequence[Size],
                              output_sizes: Sequence[Size], window: int, impl: str = "auto") -> list[Tensor]:
    """Semantic labels of images run as windows (module docstring).

    class_logits [N,Q,K+1], mask_embed [N,Q,C], pixel_embed [N,C,h,w] or [L,N,C,h,w] (the final
    prediction's features are read): the final prediction of N windows of ``window`` x
    ``window`` pixels; ``windows[n]`` = (image index, top, left) of window n in its image's
    resized frame; ``resized_sizes[i]``: image i's resized (h_i, w_i), which its windows must
    cover; ``output_sizes[i]``: its original (H_i, W_i). ``impl`` picks the mask-probability
    operator. Returns int64 labels [H_i, W_i] per image.
    """
    check_float("class_logits", class_logits, 3)
    pixel_embed = final_pixel_embed(pixel_embed)
    check_embeddings(mask_embed, pixel_embed)
    if not (class_logits.shape[0] == mask_embed.shape[0] == pixel_embed.shape[0] == len(windows)):
        raise ValueError(f"one prediction per window: class_logits {tuple(class_logits.shape)}, mask_embed "
                         f"{tuple(mask_embed.shape)}, pixel_embed {tuple(pixel_embed.shape)}, {len(windows)} windows")
    if len(resized_sizes) != len(output_sizes):
        raise ValueError(f"{len(resized_sizes)} resized sizes but {len(output_sizes)} output sizes")
    num_classes = class_logits.shape[-1] - 1
    device = class_logits.device
    sums = [torch.zeros(num_classes, int(h), int(w), device=device) for h, w in resized_sizes]
    counts = [torch.zeros(int(h), int(w), device=device) for h, w in resized_sizes]
    square = [window, window]
    for n, (image, top, left) in enumerate(windows):
        if not (0 <= image < len(sums) and 0 <= top and 0 <= left and top + window <= sums[image].shape[1]
                and left + window <= sums[image].shape[2]):
            raise ValueError(f"window {n} (image {image}, top {top}, left {left}, side {window}) lies outside "
                             f"its image's resized size")
        masks = resampled_masks(mask_embed[n][None], pixel_embed[n][None], square, square, square, True,
                                torch.float32, impl)[0]  # [Q, S, S]
        probs = class_logits[n].float().softmax(-1)[:, :-1]  # [Q, K]: drop "no object"
        scores = torch.einsum("qk,qhw->khw", probs, masks)  # [K, S, S]
        sums[image][:, top:top + window, left:left + window] += scores
        counts[image][top:top + window, left:left + window] += 1
        del masks, scores
    labels = []
    for i, (total, count) in enumerate(zip(sums, counts)):
        if not bool((count > 0).all()):
            raise ValueError(f"the windows leave pixels of image {i} uncovered")
        mean = total.div_(count)  # [K, h, w]
        out = F.interpolate(mean[None], size=tuple(int(v) for v in output_sizes[i]), mode="bilinear",
                            align_corners=False)[0]
        labels.append(out.argmax(0))
        del mean, out
    return labels
