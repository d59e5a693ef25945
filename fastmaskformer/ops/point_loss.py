"""Point-sampled matching cost and mask loss (Mask2Former; Kirillov et al.'s PointRend sampling).

Mask2Former matches and supervises masks on sampled points instead of full masks:
- matching: per decoder layer and image, P = 12544 points uniform in the image, shared by all
  queries and segments; cost = w_class * (-softmax prob of the segment's class)
  + w_mask * mean-over-points sigmoid BCE + w_dice * dice (official ``HungarianMatcher``);
- loss: per matched mask, ``oversample`` * P uniform candidates, the ``importance_ratio`` * P
  most uncertain of them (uncertainty ``-|logit|``) plus (1 - importance_ratio) * P fresh uniform
  points; BCE averaged over the points and dice, each summed over masks / num_masks.

Coordinates are ``[..., P, 2]`` in [0, 1], x then y, relative to the padded input (the official
``point_sample``: ``grid_sample(input, 2 * coords - 1, align_corners=False)``, zeros outside).
Predictions are sampled on the stride-4 logits, targets on the full-resolution segment maps.

The lazy outputs make sampling cheap: a logit at a point is the bilinear blend of 4 neighbouring
``<mask_embed, pixel_embed>`` products, and a target value the blend of 4 segment-map taps equal
to the segment id, so no ``[M, H, W]`` target masks are built. These references are plain
PyTorch (autograd differentiates them); they form per-mask logit maps at stride 4 (the official
memory). Both also have fused Triton paths (``impl="triton"``, the default on CUDA):
- the matching cost (``kernels/point_matching_cost.py``) samples the pixel embedding at the
  shared points itself and never forms the logit maps;
- the loss (``kernels/point_loss.py``: forward and backward operators with autograd) forms the
  matched queries' low-res logits of all layers in one product, samples them at the candidates
  in a kernel (top-k in torch, the same selection), sums BCE, sigmoid, target and their product
  over the points in one kernel with the targets sampled from the segment maps in-kernel, and
  scatters the gradient of each point to its 4 taps with deterministic fixed-point atomics.
  Unlike the matching cost it does not sample the pixel embedding per point: every mask has its
  own 4 x 12544 points, which would gather ~12x the channel vectors of the map product (the
  module docstring has the numbers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_embeddings
from ._dispatch import load_kernel, resolve_impl
from .mask_logits import embed_product


def segment_taps(seg_maps: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
    """The 4 bilinear taps of points on segment maps (``align_corners=False``): seg_maps int
    [B, H, W]; coords [B, K, 2] in [0, 1] (x, y) -> (the taps' segment ids [B, K, 4] in the order
    (y0, x0), (y0, x1), (y1, x0), (y1, x1), -1 off the map: ``grid_sample``'s zero padding;
    weights [B, K, 4]). The map gets a border of -1 (1 before, 2 after) and the points are clamped
    to it, which moves no weight onto the map, so no tap needs a bounds test or a clamp."""
    b, h, w = seg_maps.shape
    row = w + 3
    padded = F.pad(seg_maps, (1, 2, 1, 2), value=-1).reshape(b, (h + 3) * row)
    coords = coords.to(torch.promote_types(coords.dtype, torch.float32))
    x = (coords[..., 0] * w - 0.5).clamp(-1, w)
    y = (coords[..., 1] * h - 0.5).clamp(-1, h)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    corner = (y0.long() + 1) * row + (x0.long() + 1)  # [B, K], in the padded map
    ids = torch.stack([torch.gather(padded, 1, corner + offset) for offset in (0, 1, row, row + 1)], -1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    return ids, weights


def sample_segment_targets(seg_maps: Tensor, segment: Tensor, coords: Tensor) -> Tensor:
    """seg_maps int32 [B, H, W] (-1: no segment); segment int64 [B, N] (segment ids, any value for
    unused rows); coords [B, N, P, 2] -> float32 [B, N, P]: the binary mask of each segment
    sampled bilinearly at the points (``point_sample`` of the 0/1 mask)."""
    b, n, p = coords.shape[:3]
    ids, weight = segment_taps(seg_maps, coords.reshape(b, n * p, 2))
    hit = ids.view(b, n, p, 4) == segment[:, :, None, None]
    return torch.where(hit, weight.float().view(b, n, p, 4), 0.0).sum(-1)


def sample_shared_point_targets(seg_maps: Tensor, num_segments: int, coords: Tensor) -> Tensor:
    """:func:`sample_segment_targets` of segments 0..num_segments-1 at points shared by all of
    them: seg_maps int32 [B, H, W]; coords [L, B, P, 2] -> float32 [L, B, M, P], the same values.
    The taps are computed and gathered once per point ([L, B, P, 4]) and each tap's weight is
    added to the row of its segment (a scatter-add; taps of no segment go to a spare row), so no
    [L, B, M, P, 4] comparison is formed."""
    layers, b, p = coords.shape[:3]
    ids, weight = segment_taps(seg_maps, coords.transpose(0, 1).reshape(b, layers * p, 2))
    ids = ids.view(b, layers, p, 4).transpose(0, 1)  # [L, B, P, 4]
    weight = weight.float().view(b, layers, p, 4).transpose(0, 1)
    rows = torch.where((ids >= 0) & (ids < num_segments), ids, num_segments).long()
    out = torch.zeros(layers, b, num_segments + 1, p, dtype=torch.float32, device=seg_maps.device)
    out.scatter_add_(2, rows.transpose(2, 3), weight.transpose(2, 3))
    return out[:, :, :num_segments]


def _point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """detectron2's ``point_sample``: maps [N, C, h, w], coords [N, P, 2] -> [N, C, P]."""
    grid = (2 * coords.to(maps.dtype) - 1)[:, None]  # (n, 1, p, 2)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, :, 0]


def sample_logits(logit_maps: Tensor, coords: Tensor) -> Tensor:
    """logit_maps [B, N, h, w]; coords [B, N, P, 2] (each map its own points) -> [B, N, P]
    (bilinear, zeros outside: ``grid_sample``, native forward and backward)."""
    b, n, h, w = logit_maps.shape
    return _point_sample(logit_maps.reshape(b * n, 1, h, w), coords.reshape(b * n, -1, 2)).view(b, n, -1)


def sample_logits_shared(logit_maps: Tensor, coords: Tensor) -> Tensor:
    """logit_maps [B, N, h, w]; coords [B, P, 2] shared by the N maps of an image -> [B, N, P]."""
    return _point_sample(logit_maps, coords)


def point_matching_cost(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
                        labels: Tensor, coords: Tensor, weights=(2.0, 5.0, 5.0), precision: str | None = None,
                        impl: str = "auto") -> Tensor:
    """Matching costs on shared uniform points (official Mask2Former ``HungarianMatcher``).

    class_logits [L,B,Q,K+1], mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] (shared) or [L,B,C,h,w]
    (per layer); seg_maps int32 [B,H,W];
    labels int64 [B,M] (padded: padded columns get finite costs the solver ignores); coords
    [L,B,P,2] (one draw per layer and image); weights (class, BCE, dice) -> costs float32
    [L*B, Q, M] (the layout of ``matching_cost_packed``). Computed in float32, one layer at a time
    (reference) or by the fused kernel (``kernels/point_matching_cost.py``: samples the pixel
    embedding itself, never forms logit maps; precision "tf32" by default, "tf32x3" | "ieee").
    """
    check_point_matching_inputs(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords)
    num_layers, b, q = class_logits.shape[:3]
    m = labels.shape[1]
    w_class, w_mask, w_dice = weights
    if resolve_impl(impl, class_logits, mask_embed, pixel_embed, op="point_matching_cost") == "triton":
        p = coords.shape[2]
        prob = class_logits.float().softmax(-1).reshape(num_layers * b, q, -1)
        cost_class = -torch.gather(prob, 2, labels.repeat(num_layers, 1)[:, None, :].expand(-1, q, m))
        target = sample_shared_point_targets(seg_maps, m, coords.float())  # (l, b, m, p)
        xt, st, sp, ss = load_kernel("point_matching_cost", "point_matching_cost").point_matching_sums(
            mask_embed, pixel_embed, coords, target, precision or "tf32")
        cost_mask = (sp[:, :, None] - xt) / p
        cost_dice = 1 - (2 * st + 1) / (ss[:, :, None] + target.sum(-1).reshape(num_layers * b, 1, m) + 1)
        return w_class * cost_class + w_mask * cost_mask + w_dice * cost_dice
    out = []
    for layer in range(num_layers):
        pts = coords[layer].float()  # (b, p, 2)
        p = pts.shape[1]
        prob = class_logits[layer].float().softmax(-1)  # (b, q, k+1)
        cost_class = -torch.gather(prob, 2, labels[:, None, :].expand(b, q, m))  # (b, q, m)
        target = sample_shared_point_targets(seg_maps, m, pts[None])[0]  # (b, m, p)
        pixels = pixel_embed[layer] if pixel_embed.dim() == 5 else pixel_embed
        logit_maps = torch.einsum("bqc,bchw->bqhw", mask_embed[layer].float(), pixels.float())
        logits = sample_logits_shared(logit_maps, pts)  # (b, q, p)
        # BCE against t: softplus(x) - x * t (softplus(-x) = softplus(x) - x): one softplus and one
        # product instead of the official two of each (BCE against 1 and against 0)
        neg = F.softplus(logits)  # BCE against 0
        cost_mask = (neg.sum(-1)[:, :, None] - torch.einsum("bqp,bmp->bqm", logits, target)) / p
        sig = logits.sigmoid()
        numer = 2 * torch.einsum("bqp,bmp->bqm", sig, target)
        denom = sig.sum(-1)[:, :, None] + target.sum(-1)[:, None, :]
        cost_dice = 1 - (numer + 1) / (denom + 1)
        out.append(w_class * cost_class + w_mask * cost_mask + w_dice * cost_dice)
    return torch.stack(out).reshape(num_layers * b, q, m)


def importance_points(logit_maps: Tensor, candidates: Tensor, extra: Tensor, num_uncertain: int) -> Tensor:
    """PointRend's ``get_uncertain_point_coords_with_randomness`` on given draws.

    logit_maps [B, N, h, w]; candidates [B, N, S, 2] (uniform, S = oversample * P); extra
    [B, N, R, 2] (uniform, R = P - num_uncertain) -> [B, N, num_uncertain + R, 2]: the
    num_uncertain candidates of highest uncertainty ``-|logit|`` (top-k order), then extra."""
    with torch.no_grad():
        uncertainty = -sample_logits(logit_maps, candidates).abs()  # (b, n, s)
        top = uncertainty.topk(num_uncertain, dim=-1).indices  # (b, n, u)
        # the chosen (x, y) rows by one index_select on the flattened candidates (a gather on
        # dim 2 with an expanded [b, n, u, 2] index is ~5x slower on the CPU); the same copies
        b, n, s = candidates.shape[:3]
        rows = top + (torch.arange(b * n, device=top.device) * s).view(b, n, 1)
        chosen = candidates.reshape(b * n * s, 2).index_select(0, rows.flatten()).view(b, n, -1, 2)
    return torch.cat([chosen, extra.to(chosen.dtype)], 2)


def check_point_matching_inputs(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
                                labels: Tensor, coords: Tensor) -> None:
    """Clear errors for the arguments of :func:`point_matching_cost` (shapes and devices)."""
    check_embeddings(mask_embed, pixel_embed)
    if mask_embed.dim() != 4 or class_logits.dim() != 4 or class_logits.shape[:3] != mask_embed.shape[:3]:
        raise ValueError(f"class_logits {tuple(class_logits.shape)} and mask_embed {tuple(mask_embed.shape)} must be "
                         "[L,B,Q,K+1] and [L,B,Q,C] with the same L, B, Q")
    num_layers, batch = mask_embed.shape[:2]
    if seg_maps.dim() != 3 or seg_maps.shape[0] != batch or labels.dim() != 2 or labels.shape[0] != batch:
        raise ValueError(f"seg_maps {tuple(seg_maps.shape)} and labels {tuple(labels.shape)} must be [B,H,W] and "
                         f"[B,M] with B={batch} (mask_embed {tuple(mask_embed.shape)})")
    if coords.dim() != 4 or coords.shape[:2] != (num_layers, batch) or coords.shape[-1] != 2:
        raise ValueError(f"coords must be [L,B,P,2] = [{num_layers},{batch},P,2], got {tuple(coords.shape)}")


def check_point_loss_inputs(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                            candidates: Tensor, extra: Tensor, num_uncertain: int) -> None:
    """Clear errors for the arguments of :func:`point_mask_loss` (shapes, dtypes, devices; the
    assignment's range when it is on the CPU: on a GPU that check would sync, and the gather of
    the matched embeddings bounds-checks on the device)."""
    check_embeddings(mask_embed, pixel_embed)
    if mask_embed.dim() != 4:
        raise ValueError(f"mask_embed must be [L,B,Q,C], got shape {tuple(mask_embed.shape)}")
    if not isinstance(assignment, Tensor) or assignment.dtype != torch.int64 or assignment.dim() != 3 \
            or assignment.shape[:2] != mask_embed.shape[:2]:
        raise ValueError(f"assignment must be int64 [L,B,M] for mask_embed {tuple(mask_embed.shape)} [L,B,Q,C], got "
                         f"{getattr(assignment, 'dtype', type(assignment).__name__)} "
                         f"{tuple(getattr(assignment, 'shape', ()))}")
    if not isinstance(seg_maps, Tensor) or seg_maps.dim() != 3 or seg_maps.shape[0] != pixel_embed.shape[-4] \
            or seg_maps.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seg_maps must be int32 [B,H,W] with B={pixel_embed.shape[-4]}, got "
                         f"{getattr(seg_maps, 'dtype', None)} {tuple(getattr(seg_maps, 'shape', ()))}")
    num_layers, batch, m = assignment.shape
    for name, pts in (("candidates", candidates), ("extra", extra)):
        if not isinstance(pts, Tensor) or not pts.is_floating_point() or pts.dim() != 5 \
                or pts.shape[:3] != (num_layers, batch, m) or pts.shape[-1] != 2:
            raise ValueError(f"{name} must be floating [L,B,M,*,2] = [{num_layers},{batch},{m},*,2], got "
                             f"{getattr(pts, 'dtype', None)} {tuple(getattr(pts, 'shape', ()))}")
    if not 0 <= int(num_uncertain) <= candidates.shape[3]:
        raise ValueError(f"num_uncertain must be in [0, {candidates.shape[3]}] (the candidates per slot), "
                         f"got {num_uncertain}")
    if int(num_uncertain) + extra.shape[3] == 0:
        raise ValueError("point_mask_loss needs at least one point per mask (num_uncertain + extra points)")
    for name, x in (("assignment", assignment), ("seg_maps", seg_maps), ("candidates", candidates),
                    ("extra", extra)):
        if x.device != pixel_embed.device:
            raise ValueError(f"{name} on {x.device} but pixel_embed on {pixel_embed.device}")
    if assignment.device.type == "cpu" and assignment.numel() and not torch.compiler.is_compiling():
        low, high = int(assignment.min()), int(assignment.max())
        if low < -1 or high >= mask_embed.shape[2]:
            raise ValueError(f"assignment values must be -1 (unmatched) or query indices in [0, "
                             f"{mask_embed.shape[2]}), got range [{low}, {high}]")


def point_mask_loss(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                    num_masks: Tensor, candidates: Tensor, extra: Tensor, num_uncertain: int,
                    precision: str | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Importance-sampled sigmoid BCE + dice of the matched masks (official Mask2Former loss).

    mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] (shared) or [L,B,C,h,w] (per layer); assignment
    int64 [L,B,M] (query of each segment, -1 none); seg_maps int32 [B,H,W]; num_masks 0-d;
    candidates [L,B,M,S,2] and extra [L,B,M,R,2] uniform draws per segment slot (only matched
    slots are used) -> (bce [L], dice [L]),
    each sum over matched masks / num_masks. With num_uncertain = 0 (and S = 0) the loss is taken
    at exactly the ``extra`` points (explicit points).

    impl "triton" (default on CUDA): ``kernels/point_loss.py``, fp32 kernels on any float input
    dtype, deterministic gradients; precision "ieee" (default: its two low-res products follow
    PyTorch's fp32 matmul settings, like the reference) or "tf32" (TF32 tensor cores for them).
    Its points are fp32 (the criterion's draws are); the reference samples in the coordinates'
    own dtype.
    """
    check_point_loss_inputs(mask_embed, pixel_embed, assignment, seg_maps, candidates, extra, num_uncertain)
    if resolve_impl(impl, mask_embed, pixel_embed, op="point_mask_loss") == "triton":
        num_masks = torch.as_tensor(num_masks, dtype=torch.float32, device=pixel_embed.device)
        return load_kernel("point_loss", "point_mask_loss").point_mask_loss(
            mask_embed, pixel_embed, assignment, seg_maps.to(torch.int32).contiguous(), num_masks, candidates, extra,
            int(num_uncertain), precision or "ieee")
    return point_mask_loss_reference(mask_embed, pixel_embed, assignment, seg_maps, num_masks, candidates, extra,
                                     num_uncertain)


def point_mask_loss_reference(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                              num_masks: Tensor, candidates: Tensor, extra: Tensor,
                              num_uncertain: int) -> tuple[Tensor, Tensor]:
    """Plain PyTorch :func:`point_mask_loss` (unchecked), layer by layer as the official loss:
    per-layer logit maps of the matched queries [B, M, h, w], sampled at the points."""
    num_layers, b, m = assignment.shape
    # The binary masks of the segment slots [B*M, 1, H, W], built once for all layers (the
    # official code's target masks): their point_sample is one native grid_sample per layer,
    # the values of sample_segment_targets (which forms [B, M*P, 4] taps per layer, ~6x slower
    # on the CPU).
    ctype = torch.promote_types(candidates.dtype, torch.float32)
    segments = torch.arange(m, device=seg_maps.device)
    masks = (seg_maps[:, None] == segments[None, :, None, None]).to(ctype).flatten(0, 1)[:, None]
    bce_out, dice_out = [], []
    for layer in range(num_layers):
        matched = assignment[layer] >= 0  # (b, m)
        query = assignment[layer].clamp(min=0)
        emb = torch.gather(mask_embed[layer], 1, query[..., None].expand(b, m, mask_embed.shape[-1]))  # (b, m, c)
        pixels = pixel_embed[layer] if pixel_embed.dim() == 5 else pixel_embed
        logit_maps = embed_product(emb, pixels)
        pts = importance_points(logit_maps.detach(), candidates[layer], extra[layer], num_uncertain)
        logits = sample_logits(logit_maps, pts)  # (b, m, p)
        target = _point_sample(masks, pts.reshape(b * m, -1, 2)).view(b, m, -1).float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
        sig = logits.sigmoid()
        dice = 1 - (2 * (sig * target).sum(-1) + 1) / (sig.sum(-1) + target.sum(-1) + 1)
        zero = torch.zeros_like(bce)
        bce_out.append(torch.where(matched, bce, zero).sum() / num_masks)
        dice_out.append(torch.where(matched, dice, zero).sum() / num_masks)
    return torch.stack(bce_out), torch.stack(dice_out)
