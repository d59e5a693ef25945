"""Pairwise matching cost between all queries and all ground-truth segments (DESIGN 3).

For one image with logits ``x [Q, hw]`` at prediction resolution (h, w) = input / 4, targets
``t [M, hw]`` (the segment map nearest-downsampled to (h, w)), ``s = sigmoid(x)``:

    class  = -softmax(class_logits)[:, labels]                                       [Q, M]
    focal  = (a (1-s)^2 BCE(x,1)) @ t^T + ((1-a) s^2 BCE(x,0)) @ (1-t)^T, all / hw   [Q, M]
    dice   = 1 - (2 s @ t^T + 1) / (sum(s)[:, None] + sum(t)[None, :] + 1)           [Q, M]
    C      = w_class * class + w_focal * focal + w_dice * dice

Predictions are not upsampled for matching (official). The cost uses -p rather than -log p:
the constant 1 of the matcher's "1 - p" is dropped because it does not change the assignment.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..target import Target, pad_segment_maps
from ._checks import check_embeddings, check_float, check_targets, default_input_size
from ..shared import FOCAL_ALPHA, FOCAL_GAMMA
from ._dispatch import load_kernel, resolve_impl
from ._library import reference_operator


def nearest_source_index(out_size: int, in_size: int, device=None) -> Tensor:
    """PyTorch's nearest rule (``F.interpolate(mode="nearest")``): src = min(floor(dst * s), in - 1)
    with the fp32 scale s = in / out. int64 [out_size], non-decreasing."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = (torch.arange(out_size, dtype=torch.float32) * scale).floor().long()
    return src.clamp_max(in_size - 1).to(device)


def downsample_segment_ids(seg_maps: Tensor, out_size) -> Tensor:
    """Padded segment maps int32 [B, H, W] nearest-downsampled to ``out_size`` (h, w): int32
    [B, h, w]. Nearest on the map equals nearest on each binary mask, which is what the official
    matcher does (``F.interpolate(masks, size, mode="nearest")``)."""
    H, W = seg_maps.shape[-2:]
    rows = nearest_source_index(out_size[0], H, seg_maps.device)
    cols = nearest_source_index(out_size[1], W, seg_maps.device)
    return seg_maps.index_select(1, rows).index_select(2, cols)


def downsample_segment_maps(targets: Sequence[Target], input_size, out_size) -> Tensor:
    """Segment maps padded (-1) to ``input_size`` then nearest-downsampled: int64 [B, h, w]."""
    padded = pad_segment_maps(targets, tuple(input_size))  # [B, H, W] int32
    small = F.interpolate(padded[:, None].float(), size=tuple(out_size), mode="nearest")
    return small[:, 0].long()


def _pair_cost(class_logits: Tensor, logits: Tensor, onehot: Tensor, labels: Tensor, weights) -> Tensor:
    """One image: class_logits [Q,K+1], logits [Q,hw], onehot [M,hw] float -> cost [Q,M]."""
    w_class, w_focal, w_dice = weights
    hw = logits.shape[1]
    prob = class_logits.float().softmax(-1)
    cost_class = -prob[:, labels]
    s = logits.sigmoid()
    focal_pos = FOCAL_ALPHA * (1 - s) ** FOCAL_GAMMA * F.binary_cross_entropy_with_logits(
        logits, torch.ones_like(logits), reduction="none"
    )
    focal_neg = (1 - FOCAL_ALPHA) * s**FOCAL_GAMMA * F.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(logits), reduction="none"
    )
    cost_focal = (focal_pos @ onehot.T + focal_neg @ (1 - onehot).T) / hw
    numerator = 2 * s @ onehot.T
    denominator = s.sum(-1)[:, None] + onehot.sum(-1)[None, :]
    cost_dice = 1 - (numerator + 1) / (denominator + 1)
    return w_class * cost_class + w_focal * cost_focal + w_dice * cost_dice


@reference_operator("matching_cost_reference")
def matching_cost_reference(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_small: Tensor,
                            labels: Tensor, num_segments: Tensor, weights: list[float]) -> Tensor:
    """Per-problem loop as the official matcher. class_logits [N,Q,K+1], mask_embed [N,Q,C],
    pixel_embed [B,C,h,w] shared by the layers or [L,B,C,h,w] per layer (problem n = l * B + b
    uses image b, of layer l when per layer); seg_small int32 [B,h,w] (segment maps at the
    prediction size, -1 = none); labels int64 [B,M] padded; num_segments int64 [B].
    Returns [N, Q, M] float32, 0 past each problem's M_b."""
    n_problems = class_logits.shape[0]
    batch = pixel_embed.shape[-4]
    pixels = pixel_embed.flatten(0, 1) if pixel_embed.dim() == 5 else pixel_embed  # problem n: pixels[n % len]
    m = labels.shape[1]
    segments = torch.arange(m, device=seg_small.device)
    onehot = (seg_small.flatten(1)[:, None, :] == segments[None, :, None]).float()  # [B, M, hw]
    costs = []
    for n in range(n_problems):
        b = n % batch
        logits = mask_embed[n].float() @ pixels[n % pixels.shape[0]].float().flatten(1)  # [Q, hw]
        cost = _pair_cost(class_logits[n], logits, onehot[b], labels[b], weights)
        costs.append(torch.where(segments[None, :] < num_segments[b], cost, 0.0))
    if not costs:
        return class_logits.new_zeros(0, class_logits.shape[1], m, dtype=torch.float32)
    return torch.stack(costs).float()


def pack_targets(targets: Sequence[Target], input_size, device) -> tuple[Tensor, Tensor, Tensor]:
    """B Targets -> (seg_maps int32 [B,H,W] padded with -1 to ``input_size``, labels int64
    [B, max M_b] padded with 0, num_segments int64 [B]) on ``device``: what the tensor-level ops
    take. Built on the host (targets stay on the CPU until here) and copied once."""
    counts = [t.num_segments for t in targets]
    labels = torch.zeros(len(targets), max(counts, default=0), dtype=torch.int64)
    for b, t in enumerate(targets):
        labels[b, :t.num_segments] = t.labels.to("cpu")
    seg_maps = pad_segment_maps(targets, tuple(input_size))
    packed = (seg_maps, labels, torch.tensor(counts, dtype=torch.int64))
    return tuple(x.to(device, non_blocking=True) for x in packed)


def matching_cost_packed(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
                         labels: Tensor, num_segments: Tensor, weights=(1.0, 20.0, 1.0), precision: str | None = None,
                         impl: str = "auto") -> Tensor:
    """Matching costs of all problems from packed targets (:func:`pack_targets`), with no host
    work: what the matcher calls (``torch.compile`` traces it whole).

    class_logits [B,Q,K+1] or [L,B,Q,K+1]; mask_embed [B,Q,C] or [L,B,Q,C]; pixel_embed
    [B,C,h,w] (shared) or [L,B,C,h,w] (per prediction, beside [L,B,...] inputs); seg_maps int32
    [B,H,W] at the padded input size; labels int64 [B,M]; num_segments int64 [B].
    Returns costs float32 [N,Q,M] (N = L*B, layer-major, 0 past M_b).
    """
    check_float("class_logits", class_logits, class_logits.dim() if class_logits.dim() in (3, 4) else 3)
    check_embeddings(mask_embed, pixel_embed)
    if class_logits.shape[:-1] != mask_embed.shape[:-1]:
        raise ValueError(
            f"class_logits {tuple(class_logits.shape)} and mask_embed {tuple(mask_embed.shape)} "
            "disagree on the leading [L,]B,Q dimensions"
        )
    batch = pixel_embed.shape[-4]
    if seg_maps.dim() != 3 or seg_maps.shape[0] != batch or labels.shape[0] != batch or num_segments.shape != (batch,):
        raise ValueError(f"targets must be packed for B={batch} images (pixel_embed {tuple(pixel_embed.shape)}): "
                         f"seg_maps {tuple(seg_maps.shape)}, labels {tuple(labels.shape)}, num_segments "
                         f"{tuple(num_segments.shape)}")
    flat_logits = class_logits.reshape(-1, *class_logits.shape[-2:])
    flat_embed = mask_embed.reshape(-1, *mask_embed.shape[-2:])
    seg_small = downsample_segment_ids(seg_maps, pixel_embed.shape[-2:])
    weights = [float(v) for v in weights]
    if resolve_impl(impl, class_logits, mask_embed, pixel_embed, op="matching_cost") == "triton":
        kernel = load_kernel("matching_cost", "matching_cost")
        return kernel.matching_cost(flat_logits, flat_embed, pixel_embed, seg_small, labels, num_segments, weights,
                                    precision or kernel.DEFAULT_PRECISION, flat_logits.shape[0] // batch)
    return torch.ops.fastmaskformer.matching_cost_reference(flat_logits.detach(), flat_embed.detach(),
                                                           pixel_embed.detach(), seg_small, labels, num_segments,
                                                           weights)


def matching_cost_padded(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                         targets: Sequence[Target], weights=(1.0, 20.0, 1.0), input_size=None,
                         precision: str | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """All problems of a batch (and of all decoder layers) at once, ready for the batched solver.

    class_logits: [B,Q,K+1] or [L,B,Q,K+1]; mask_embed: [B,Q,C] or [L,B,Q,C];
    pixel_embed: [B,C,h,w] shared by the predictions, or [L,B,C,h,w] (prediction l's own
    features, beside [L,B,...] inputs: EoMT); targets: B Targets, segment maps at (padded) input
    resolution.
    precision: the fused kernel's tl.dot precision, "tf32" (default: the cost only feeds an
    argmin; costs move by ~1e-3 relative), "tf32x3" (~fp32) or "ieee" (exact fp32 products);
    the torch reference always computes in fp32.
    Returns ``costs [N,Q,Mmax]`` float32 (N = L*B layer-major, entries past M_b are 0) and
    ``num_segments`` int64 [N] (M of each problem).
    """
    check_embeddings(mask_embed, pixel_embed)
    batch = pixel_embed.shape[-4]
    size = default_input_size(pixel_embed, input_size)
    check_targets(targets, batch, class_logits.shape[-1] - 1, size)
    seg_maps, labels, num_segments = pack_targets(targets, size, pixel_embed.device)
    costs = matching_cost_packed(class_logits, mask_embed, pixel_embed, seg_maps, labels, num_segments, weights,
                                 precision, impl)
    sizes = torch.tensor([t.num_segments for t in targets] * (costs.shape[0] // batch), dtype=torch.int64)
    return costs, sizes


def matching_cost(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                  targets: Sequence[Target], weights=(1.0, 20.0, 1.0), input_size=None,
                  precision: str | None = None, impl: str = "auto") -> list[Tensor]:
    """Matching cost per image: list of ``[Q, M_b]`` float32 (``L*B`` of them, layer-major,
    when given ``[L,B,...]`` inputs). See ``matching_cost_padded`` for the arguments."""
    costs, sizes = matching_cost_padded(class_logits, mask_embed, pixel_embed, targets, weights,
                                        input_size, precision, impl)
    return [costs[n, :, : int(m)] for n, m in enumerate(sizes.tolist())]
