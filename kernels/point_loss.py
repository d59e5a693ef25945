"""Fused point-sampled BCE + dice loss of matched masks (Mask2Former's mask loss), all decoder
layers at once, forward and backward (``fastmaskformer.ops.point_loss`` states the semantics).

A slot is one (layer l, image b, segment j), layer-major ``[L*B*M]`` as in kernels/mask_loss.py;
unmatched slots (assignment -1) do no work and contribute 0.

Split of the work:
1. Low-res logits of the matched queries of all layers, ``X = E_matched @ P_b`` fp32
   ``[B, L*M, h*w]``, or ``[L*B, M, h*w]`` with per-layer pixel embeddings (EoMT)
   (``mask_loss.matched_logits``: one bmm, shared with the full-resolution loss). Why X and not per-point sampling of the pixel embedding (as the point matching cost
   does, where 100 queries share each image's points): each slot has its OWN points, 3P = 37632
   candidates + P = 12544 loss points at the official sizes, i.e. 200K bilinear taps of C = 256
   channels per slot against a 128x128 map of 16K pixels. Sampling the embedding would gather
   ~12x the channel vectors the map product reads (~128 GB of L2 traffic for 10 layers x 2
   images x 32 masks, and 8G scattered gradient atomics); sampling X gathers 4 scalars per
   point. X is 42 MB there (the official loss forms the same per-layer maps); no ``[M, H, W]``
   target or logit map is ever formed.
2. ``_point_uncertainty_kernel`` (no grad): the uncertainty ``-|logit|`` at the S candidates of
   every slot, 4 taps of its X row -> ``[L*B*M, S]``; torch's top-k picks ``num_uncertain`` of
   them, exactly as ``importance_points`` (top-k order, then the ``extra`` points).
3. ``_point_loss_fwd_kernel``: per (slot, split of the points) the sums over the points of
   BCE-with-logits, sigmoid, target and sigmoid * target. Targets are sampled in the kernel from
   the int32 segment maps by the 4-tap rule of ``sample_segment_targets`` (weight of each tap
   whose segment id equals the slot's). Partial sums ``[slots, SPLIT, 4]`` are added by torch.
4. ``_point_loss_bwd_kernel``: per point, dLoss/dlogit from the forward sums, scattered to its
   4 taps of ``grad X`` with 64-bit fixed-point integer atomics (``common.fixed_point_scales``,
   the scheme of kernels/ms_deform_attn.py): the sum does not depend on the order, so two
   backward runs are bit-identical. Then ``grad E = grad X @ P^T`` and ``grad P = E^T @ grad X``
   (``mask_loss.matched_logits_backward``). Fixed-point bound: per slot and layer,
   ``sum_p |dL/dx_p| <= (|g_bce| + 2 |g_dice|) / num_masks`` (the BCE term is ``(s - t) / P``
   per point; the dice term is ``s'(N - 2 t D) / D^2`` with ``N = 2 sum(s t) + 1 <= D =
   sum(s) + sum(t) + 1``, so its absolute sum is at most ``2 sum(s') / D <= 2``), and every
   partial sum of an element of grad X is below it.

Precision: the kernels compute in fp32 on upcast inputs (bf16 / fp16 accepted). The bmms of
steps 1 and 4 follow ``torch.backends.cuda.matmul.allow_tf32`` like the reference ("ieee",
default) or force TF32 tensor cores ("tf32", opt-in).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import autotune_configs, fixed_point_scales, launch, multiprocessor_count, point_taps, triton_operator
from .mask_loss import LOSS_PRECISIONS, _slots, matched_logits, matched_logits_backward, slot_offsets


@triton.jit
def _sampled(x_row, i00, i01, i10, i11, w00, w01, w10, w11):
    """Bilinear blend of 4 taps of one low-res map, the reference's association
    ((w00 v00 + w01 v01) + w10 v10) + w11 v11 (taps are clamped in range: no mask needed)."""
    v = w00 * tl.load(x_row + i00)
    v += w01 * tl.load(x_row + i01)
    v += w10 * tl.load(x_row + i10)
    v += w11 * tl.load(x_row + i11)
    return v


@triton.jit
def _target(seg_img, pts, ps, p_ok, H, W, sid):
    """Sampled binary mask of segment ``sid`` at the points: sum of the weights of the taps of
    the segment map [H, W] equal to sid (ignore / padding -1 is a negative for every mask)."""
    j00, j01, j10, j11, u00, u01, u10, u11 = point_taps(pts, ps, p_ok, H, W)
    t = tl.where(tl.load(seg_img + j00) == sid, u00, 0.0)
    t += tl.where(tl.load(seg_img + j01) == sid, u01, 0.0)
    t += tl.where(tl.load(seg_img + j10) == sid, u10, 0.0)
    t += tl.where(tl.load(seg_img + j11) == sid, u11, 0.0)
    return t


@triton.jit
def _logit_and_target(x_row, seg_img, pts, ps, p_ok, h, w, H, W, sid):
    """At points ``ps`` of one slot: its logit (4 taps of its X row) and its sampled target, with
    the taps (indices, weights) the backward scatters to."""
    i00, i01, i10, i11, w00, w01, w10, w11 = point_taps(pts, ps, p_ok, h, w)
    x = _sampled(x_row, i00, i01, i10, i11, w00, w01, w10, w11)
    t = _target(seg_img, pts, ps, p_ok, H, W, sid)
    return x, t, i00, i01, i10, i11, w00, w01, w10, w11


@triton.autotune(
    configs=autotune_configs([{"BLOCK_P": 512, "num_warps": 4}, {"BLOCK_P": 1024, "num_warps": 4}],
                             interpreter={"BLOCK_P": 1024}),
    key=["S", "h", "w"])
@triton.jit
def _point_uncertainty_kernel(
    x_ptr,  # [R, h*w] fp32 contiguous low-res logits
    row_ptr,  # [N] int32 row of X of each slot
    pts_ptr,  # [N, S, 2] fp32 contiguous candidate points
    out_ptr,  # [N, S] fp32 uncertainty -|logit| at the candidates
    S, h, w, BLOCK_P: tl.constexpr,
):
    slot = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < S
    x_row = x_ptr + tl.load(row_ptr + slot).to(tl.int64) * h * w
    pts = pts_ptr + slot.to(tl.int64) * S * 2
    i00, i01, i10, i11, w00, w01, w10, w11 = point_taps(pts, ps, p_ok, h, w)
    x = _sampled(x_row, i00, i01, i10, i11, w00, w01, w10, w11)
    tl.store(out_ptr + slot.to(tl.int64) * S + ps, -tl.abs(x), mask=p_ok)


@triton.autotune(
    configs=autotune_configs([{"BLOCK_P": 512, "num_warps": 4}, {"BLOCK_P": 1024, "num_warps": 4},
                              {"BLOCK_P": 1024, "num_warps": 8}],
                             interpreter={"BLOCK_P": 1024}),
    key=["P", "h", "w"])
@triton.jit
def _point_loss_fwd_kernel(
    x_ptr,  # [R, h*w] fp32 contiguous low-res logits
    row_ptr, img_ptr, sid_ptr,  # [N] int32 per slot: row of X, image b, segment id (-2: unmatched)
    pts_ptr,  # [N, P, 2] fp32 contiguous points
    seg_ptr,  # [B, H, W] int32 contiguous segment maps (-1: no segment)
    partial_ptr,  # [N, SPLIT, 4] fp32: sum BCE, sum s, sum t, sum s t
    P, h, w, H, W, SPLIT, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = pid // SPLIT
    split = pid % SPLIT
    row, img, sid, matched = slot_offsets(slot, row_ptr, img_ptr, sid_ptr, h * w, H * W)
    x_row = x_ptr + row
    seg_img = seg_ptr + img
    pts = pts_ptr + slot.to(tl.int64) * P * 2
    acc_bce = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_st = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(split * BLOCK_P, P * matched, SPLIT * BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < P
        x, t, i00, i01, i10, i11, w00, w01, w10, w11 = _logit_and_target(x_row, seg_img, pts, ps, p_ok, h, w,
                                                                            H, W, sid)
        s = tl.sigmoid(x)
        # BCE with logits, soft target: max(x, 0) - x t + log(1 + exp(-|x|)).
        bce = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + tl.exp(-tl.abs(x)))
        acc_bce += tl.where(p_ok, bce, 0.0)
        acc_s += tl.where(p_ok, s, 0.0)
        acc_t += t  # zero weights on masked points
        acc_st += s * t
    out = partial_ptr + (slot.to(tl.int64) * SPLIT + split) * 4
    tl.store(out + 0, tl.sum(acc_bce, axis=0))
    tl.store(out + 1, tl.sum(acc_s, axis=0))
    tl.store(out + 2, tl.sum(acc_t, axis=0))
    tl.store(out + 3, tl.sum(acc_st, axis=0))


@triton.jit
def _scatter(acc_row, idx, wt, g, scale):
    """acc_row[idx] += wt * g in 64-bit fixed point (integer atomics: order-independent sums);
    zero-weight taps (outside the map, masked points) issue no atomic."""
    tl.atomic_add(acc_row + idx, (wt * g * scale).to(tl.int64), mask=wt != 0.0, sem="relaxed")


# The backward kernel issues atomics, which an autotuner's benchmark runs would add up more than
# once: ONE config (Triton runs a lone config without benchmarking).
@triton.autotune(configs=autotune_configs([{"BLOCK_P": 512, "num_warps": 4}], interpreter={"BLOCK_P": 1024}),
                 key=["P"])
@triton.jit
def _point_loss_bwd_kernel(
    x_ptr,  # [R, h*w] fp32 low-res logits (from the forward)
    acc_ptr,  # [R, h*w] int64 fixed-point gradient of X (zeros on entry)
    row_ptr, img_ptr, sid_ptr, layer_ptr,  # [N] int32 per slot
    pts_ptr,  # [N, P, 2] fp32 points
    seg_ptr,  # [B, H, W] int32 segment maps
    stats_ptr,  # [N, 4] fp32 forward sums: BCE, s, t, s t
    grad_ptr,  # [L, 2] fp32 (d total / d bce[l], d total / d dice[l]) / num_masks
    scale_ptr,  # [1] fp32 fixed-point scale
    P, inv_p, h, w, H, W, SPLIT, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = pid // SPLIT
    split = pid % SPLIT
    row, img, sid, matched = slot_offsets(slot, row_ptr, img_ptr, sid_ptr, h * w, H * W)
    x_row = x_ptr + row
    acc_row = acc_ptr + row
    seg_img = seg_ptr + img
    layer = tl.load(layer_ptr + slot)
    g_bce = tl.load(grad_ptr + 2 * layer) * inv_p  # BCE is a mean over the points
    g_dice = tl.load(grad_ptr + 2 * layer + 1)
    sum_s = tl.load(stats_ptr + slot.to(tl.int64) * 4 + 1)
    sum_t = tl.load(stats_ptr + slot.to(tl.int64) * 4 + 2)
    sum_st = tl.load(stats_ptr + slot.to(tl.int64) * 4 + 3)
    numer = 2.0 * sum_st + 1.0
    denom = sum_s + sum_t + 1.0
    scale = tl.load(scale_ptr)
    pts = pts_ptr + slot.to(tl.int64) * P * 2
    for p0 in range(split * BLOCK_P, P * matched, SPLIT * BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < P
        x, t, i00, i01, i10, i11, w00, w01, w10, w11 = _logit_and_target(x_row, seg_img, pts, ps, p_ok, h, w,
                                                                            H, W, sid)
        s = tl.sigmoid(x)
        # d BCE / dx = (s - t) / P; d dice / dx = s (1 - s) (N - 2 t D) / D^2 (dice = 1 - N / D).
        g = g_bce * (s - t) + g_dice * (s * (1.0 - s)) * (numer - 2.0 * t * denom) / (denom * denom)
        _scatter(acc_row, i00, w00, g, scale)
        _scatter(acc_row, i01, w01, g, scale)
        _scatter(acc_row, i10, w10, g, scale)
        _scatter(acc_row, i11, w11, g, scale)


# ---------------------------------------------------------------------------- launchers
def _split(device: torch.device, num_slots: int, points: int) -> int:
    """Programs per slot: about 16 per SM (the loops are bound by the latency of their gathers
    and atomics: many resident programs hide it), at least 2048 points each. At the official
    sizes (640 slots, 12544 points, 132 SMs): 4 programs per slot."""
    wanted = triton.cdiv(16 * multiprocessor_count(device), max(num_slots, 1))
    return max(1, min(wanted, triton.cdiv(points, 2048)))


def importance_points(low: Tensor, size: tuple[int, int], assignment: Tensor, per_layer: bool, candidates: Tensor,
                      extra: Tensor, num_uncertain: int) -> Tensor:
    """``ops.point_loss.importance_points`` on the low-res logits X (``mask_loss.matched_logits``;
    ``per_layer``: its layout for per-layer pixel embeddings) of grid ``size`` (h, w): candidates
    [L,B,M,S,2], extra [L,B,M,R,2] -> fp32 [L*B*M, num_uncertain + R, 2] contiguous (no grad)."""
    num_layers, batch, m = assignment.shape
    h, w = size
    n, s = num_layers * batch * m, candidates.shape[-2]
    cand = candidates.float().reshape(n, s, 2).contiguous()
    rest = extra.float().reshape(n, extra.shape[-2], 2)
    if num_uncertain == 0:
        return rest.contiguous().clone()  # an output: never an alias of the input
    rows, _, _, _ = _slots(assignment, per_layer)
    uncertainty = torch.zeros(n, s, dtype=torch.float32, device=low.device)
    if n and s and h * w:
        def grid(meta):
            return (n, triton.cdiv(s, meta["BLOCK_P"]))

        launch(_point_uncertainty_kernel, grid, low, rows, cand, uncertainty, s, h, w)
    top = uncertainty.topk(num_uncertain, dim=-1).indices  # [N, num_uncertain], top-k order
    chosen = torch.gather(cand, 1, top[..., None].expand(n, num_uncertain, 2))
    return torch.cat([chosen, rest], 1).contiguous()


@triton_operator("point_loss_forward")
def point_loss_forward(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                       num_masks: Tensor, candidates: Tensor, extra: Tensor, num_uncertain: int,
                       precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-layer BCE and dice (fp32 [L]) of the matched masks on importance-sampled points, plus
    what the backward reads: the low-res logits X (``mask_loss.matched_logits``), the points fp32
    [L,B,M,P,2] (P = num_uncertain + R) and the per-slot sums [L*B*M, 4].

    mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] shared by the layers or [L,B,C,h,w] per layer
    (any float dtype, any strides); assignment int64
    [L,B,M] (query of segment j of image b at layer l, or -1); seg_maps int32 [B,H,W] contiguous
    (-1: no segment); num_masks 0-d fp32; candidates [L,B,M,S,2], extra [L,B,M,R,2] uniform draws
    in [0, 1] (x, y); num_uncertain <= S; precision "ieee" | "tf32" (the bmms).
    """
    num_layers, batch, m = assignment.shape
    h, w = pixel_embed.shape[-2:]
    H, W = seg_maps.shape[-2:]
    per_layer = pixel_embed.dim() == 5
    low = matched_logits(mask_embed, pixel_embed, assignment, precision)  # [B, L*M, hw] or [L*B, M, hw]
    points = importance_points(low, (h, w), assignment, per_layer, candidates, extra, num_uncertain)  # [N, P, 2]
    rows, images, seg_ids, _ = _slots(assignment, per_layer)
    n, p = rows.numel(), points.shape[1]
    split = _split(low.device, n, p)
    partial = torch.zeros(n, split, 4, dtype=torch.float32, device=low.device)
    if n and p:
        launch(_point_loss_fwd_kernel, (n * split,), low, rows, images, seg_ids, points, seg_maps, partial,
               p, h, w, H, W, split)
    stats = partial.sum(1)  # [N, 4]
    bce = stats[:, 0] / p
    dice = 1 - (2 * stats[:, 3] + 1) / (stats[:, 1] + stats[:, 2] + 1)
    matched = (assignment >= 0).reshape(num_layers, batch * m).float()
    bce = (bce.view(num_layers, batch * m) * matched).sum(-1) / num_masks
    dice = (dice.view(num_layers, batch * m) * matched).sum(-1) / num_masks
    return bce, dice, low, points.view(num_layers, batch, m, p, 2), stats


@triton_operator("point_loss_backward")
def point_loss_backward(grad_bce: Tensor, grad_dice: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                        assignment: Tensor, seg_maps: Tensor, num_masks: Tensor, low: Tensor, points: Tensor,
                        stats: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """Gradients (fp32, shaped like mask_embed [L,B,Q,C] and pixel_embed ([L,]B,C,h,w)) of
    ``sum_l grad_bce[l] bce[l] + grad_dice[l] dice[l]``; low, points, stats from the forward.
    Deterministic: the scatter into grad X is a fixed-point integer sum (module docstring)."""
    h, w = pixel_embed.shape[-2:]
    H, W = seg_maps.shape[-2:]
    rows, images, seg_ids, layers = _slots(assignment, pixel_embed.dim() == 5)
    n, p = rows.numel(), points.shape[-2]
    grad_out = (torch.stack([grad_bce, grad_dice], 1).float() / num_masks).contiguous()  # [L, 2]
    # Every partial sum of an element of grad X is at most (|g_bce| + 2 |g_dice|) / num_masks.
    bound = (grad_out[:, 0].abs() + 2 * grad_out[:, 1].abs()).amax() if grad_out.numel() else grad_out.new_ones(())
    scale, inv_scale, finite = fixed_point_scales(bound)
    acc = torch.zeros(low.shape, dtype=torch.int64, device=low.device)
    split = _split(low.device, n, p)
    if n and p:
        launch(_point_loss_bwd_kernel, (n * split,), low, acc, rows, images, seg_ids, layers,
               points.reshape(n, p, 2), seg_maps, stats, grad_out, scale, p, 1.0 / p, h, w, H, W, split)
    grad_low = torch.where(finite, acc.to(torch.float32) * inv_scale, float("nan"))
    return matched_logits_backward(grad_low, mask_embed, pixel_embed, assignment, precision)


def _setup_context(ctx, inputs, output):
    mask_embed, pixel_embed, assignment, seg_maps, num_masks, _, _, _, precision = inputs
    ctx.save_for_backward(mask_embed, pixel_embed, assignment, seg_maps, num_masks, output[2], output[3], output[4])
    ctx.precision = precision
    ctx.dtypes = (mask_embed.dtype, pixel_embed.dtype)


def _backward(ctx, grad_bce, grad_dice, _grad_low, _grad_points, _grad_stats):
    mask_embed, pixel_embed, assignment, seg_maps, num_masks, low, points, stats = ctx.saved_tensors
    zeros = stats.new_zeros(mask_embed.shape[0])
    grad_bce = zeros if grad_bce is None else grad_bce
    grad_dice = zeros if grad_dice is None else grad_dice
    grad_embed, grad_pixel = point_loss_backward(grad_bce, grad_dice, mask_embed, pixel_embed, assignment, seg_maps,
                                                 num_masks, low, points, stats, ctx.precision)
    return grad_embed.to(ctx.dtypes[0]), grad_pixel.to(ctx.dtypes[1]), None, None, None, None, None, None, None


point_loss_forward.register_autograd(_backward, setup_context=_setup_context)


def point_mask_loss(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                    num_masks: Tensor, candidates: Tensor, extra: Tensor, num_uncertain: int,
                    precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """BCE and dice (fp32 [L], differentiable w.r.t. mask_embed and pixel_embed) of the matched
    masks of all layers; see :func:`point_loss_forward` for the arguments (validated by
    ``fastmaskformer.ops.point_mask_loss``)."""
    if precision not in LOSS_PRECISIONS:
        raise ValueError(f"point_mask_loss: precision must be one of {LOSS_PRECISIONS}, got {precision!r}")
    bce, dice, _, _, _ = torch.ops.fastmaskformer.point_loss_forward(mask_embed, pixel_embed, assignment, seg_maps,
                                                                     num_masks, candidates, extra, int(num_uncertain),
                                                                     precision)
    return bce, dice
