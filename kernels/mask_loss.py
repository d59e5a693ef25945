"""Fused focal + dice loss of matched masks with the bilinear upsampling inside (DESIGN 3, 1.1).

Split of the work:
1. Low-resolution logits of the matched queries, ``X = E_matched @ P_b``, one cuBLAS ``bmm``
   over images padded to the largest match count: ``[B, m_max, h*w]`` fp32, O(M h w). Its
   backward (grad E, grad P) is torch autograd's.
2. ``_mask_loss_fwd_kernel``: per (mask, split of full-res tiles) it gathers the 4 bilinear
   taps of every full-resolution pixel (align_corners=False, any scale, PyTorch's index and
   weight rule), forms ``s = sigmoid(v)``, the target bit ``segment_map[b] == seg_id`` and
   accumulates sum(focal), sum(s), sum(t), sum(s t). Partial sums go to ``[M, SPLIT, 4]`` and
   are reduced by torch: deterministic, no atomics.
3. ``_mask_loss_bwd_kernel``: per (mask, low-resolution tile) it recomputes dLoss/dv for every
   full-resolution pixel whose taps reach the tile (needs only the per-mask sums of step 2,
   O(M)) and applies the adjoint of the upsampling as two small dense products with the
   interpolation weights built in registers: ``grad_tile = Wy^T @ (G @ Wx)``. Every element of
   ``grad_X [B, m_max, h*w]`` is written by exactly one program: deterministic, no atomics.
Nothing of size ``M x H x W`` (or ``B x Q x H x W``) is allocated; the largest temporaries are
X and its gradient (O(M h w)) and the int32 padded segment maps ``[B, H, W]``.

Precision: the kernels compute in fp32 (the adjoint products use ``input_precision="ieee"``).
The ``bmm`` of step 1 runs in fp32 on upcast inputs (bf16 inputs included) and so follows
``torch.backends.cuda.matmul.allow_tf32`` exactly like the reference does.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastmaskformer.ops._dispatch import interpreter_enabled
from fastmaskformer.ops.matching_cost import FOCAL_ALPHA, FOCAL_GAMMA
from fastmaskformer.target import Target, pad_segment_maps

assert FOCAL_GAMMA == 2.0, "the kernels square (1-p_t) explicitly"


def _fwd_configs() -> list[triton.Config]:
    if interpreter_enabled():  # one config, big tiles: the interpreter pays per program/iteration
        return [triton.Config({"BLOCK_Y": 64, "BLOCK_X": 64})]
    return [
        triton.Config({"BLOCK_Y": by, "BLOCK_X": bx}, num_warps=nw)
        for by, bx, nw in [(8, 128, 4), (16, 64, 4), (16, 128, 8), (32, 64, 8), (32, 128, 8)]
    ]


def _bwd_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"LOW_Y": 32, "LOW_X": 32, "BLOCK_Y": 64, "BLOCK_X": 64})]
    return [
        triton.Config({"LOW_Y": ly, "LOW_X": lx, "BLOCK_Y": by, "BLOCK_X": bx}, num_warps=nw)
        for ly, lx, by, bx, nw in [
            (16, 16, 32, 32, 4),
            (16, 32, 32, 32, 4),
            (32, 32, 32, 32, 4),
            (32, 32, 32, 64, 8),
            (16, 32, 16, 64, 4),
        ]
    ]


@triton.jit
def _taps(dst, scale, in_size):
    """Bilinear source indices and weights of output indices ``dst`` (align_corners=False),
    exactly PyTorch's rule: src = max(scale (dst + 0.5) - 0.5, 0); i0 = floor(src) (<= in-1);
    i1 = i0 + (i0 < in - 1); l1 = clamp(src - i0, 0, 1); l0 = 1 - l1."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _upsampled_logits(x_row, ys, xs, h, w, scale_y, scale_x):
    """Logits at full-res pixels (ys [BY], xs [BX]) of one low-res map ``x_row [h, w]`` -> [BY, BX]."""
    y0, y1, ly0, ly1 = _taps(ys, scale_y, h)
    x0, x1, lx0, lx1 = _taps(xs, scale_x, w)
    top = x_row + y0[:, None] * w
    bot = x_row + y1[:, None] * w
    # The taps are always inside [0,h) x [0,w), even for rows/columns past H/W: no mask needed.
    v00 = tl.load(top + x0[None, :])
    v01 = tl.load(top + x1[None, :])
    v10 = tl.load(bot + x0[None, :])
    v11 = tl.load(bot + x1[None, :])
    # Same association as PyTorch's kernel: h0 (w0 a + w1 b) + h1 (w0 c + w1 d).
    return ly0[:, None] * (lx0[None, :] * v00 + lx1[None, :] * v01) + ly1[:, None] * (
        lx0[None, :] * v10 + lx1[None, :] * v11)


@triton.jit
def _softplus_pair(v):
    """(softplus(v), softplus(-v)) = (BCE(v, 0), BCE(v, 1)), numerically stable."""
    log_term = tl.log(1.0 + tl.exp(-tl.abs(v)))
    return tl.maximum(v, 0.0) + log_term, tl.maximum(-v, 0.0) + log_term


@triton.autotune(configs=_fwd_configs(), key=["h", "w", "H", "W"])
@triton.jit
def _mask_loss_fwd_kernel(
    x_ptr,  # [R, h*w] fp32 contiguous low-res logits (R = B * m_max rows)
    row_ptr, img_ptr, sid_ptr,  # [M] int32: row of X, image b, segment id of each matched mask
    seg_ptr,  # [B, H, W] int32 contiguous segment maps padded with -1
    partial_ptr,  # [M, SPLIT, 4] fp32: sum focal, sum s, sum t, sum s t
    h, w, H, W, scale_y, scale_x, SPLIT,
    ALPHA: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    mask_id = pid // SPLIT
    split = pid % SPLIT
    row = tl.load(row_ptr + mask_id).to(tl.int64)
    img = tl.load(img_ptr + mask_id).to(tl.int64)
    sid = tl.load(sid_ptr + mask_id)
    x_row = x_ptr + row * h * w
    seg_img = seg_ptr + img * H * W

    acc_focal = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_st = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    tiles_x = tl.cdiv(W, BLOCK_X)
    num_tiles = tl.cdiv(H, BLOCK_Y) * tiles_x
    for tile in range(split, num_tiles, SPLIT):
        ys = (tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
        xs = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
        inside = (ys < H)[:, None] & (xs < W)[None, :]
        v = _upsampled_logits(x_row, ys, xs, h, w, scale_y, scale_x)
        ids = tl.load(seg_img + ys[:, None] * W + xs[None, :], mask=inside, other=-1)
        t = ids == sid  # (by, bx) target bit; ignore/padding (-1) is a negative for every mask
        s = tl.sigmoid(v)
        bce_neg, bce_pos = _softplus_pair(v)
        # alpha_t (1 - p_t)^2 BCE(v, t) with t binary.
        focal = tl.where(t, ALPHA * (1.0 - s) * (1.0 - s) * bce_pos, (1.0 - ALPHA) * s * s * bce_neg)
        tf = t.to(tl.float32)
        acc_focal += tl.where(inside, focal, 0.0)
        acc_s += tl.where(inside, s, 0.0)
        acc_t += tf
        acc_st += s * tf
    out = partial_ptr + (mask_id * SPLIT + split) * 4
    tl.store(out + 0, tl.sum(tl.sum(acc_focal, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(acc_s, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(acc_t, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(acc_st, axis=1), axis=0))


@triton.jit
def _interp_weights(full, low, in_size, scale):
    """Dense interpolation weights [len(full), len(low)] between full-res indices ``full`` and
    low-res indices ``low``: W[i, j] = l0 [i0 == low_j] + l1 [i1 == low_j] (both when i0 == i1)."""
    i0, i1, l0, l1 = _taps(full, scale, in_size)
    return (tl.where(i0[:, None] == low[None, :], l0[:, None], 0.0)
            + tl.where(i1[:, None] == low[None, :], l1[:, None], 0.0))


@triton.jit
def _support_start(low_first, inv_scale):
    """A full-res index <= the first one whose taps reach low-res index ``low_first``: i1 >= a
    needs src >= a - 1, i.e. dst >= (a - 0.5) / scale - 0.5; one index of margin absorbs the
    rounding of the kernel's own fp32 tap arithmetic."""
    return tl.maximum(tl.floor((low_first - 0.5) * inv_scale - 0.5).to(tl.int32) - 1, 0)


@triton.jit
def _support_end(low_last, inv_scale, out_size):
    """A full-res index past the last one whose taps reach ``low_last`` (i0 <= b needs
    src < b + 1, i.e. dst < (b + 1.5) / scale - 0.5), with one index of margin."""
    return tl.minimum(tl.ceil((low_last + 1.5) * inv_scale - 0.5).to(tl.int32) + 2, out_size)


@triton.autotune(configs=_bwd_configs(), key=["h", "w", "H", "W"])
@triton.jit
def _mask_loss_bwd_kernel(
    x_ptr,  # [R, h*w] fp32 contiguous low-res logits
    grad_x_ptr,  # [R, h*w] fp32, zero-initialised; rows of matched masks are written here
    row_ptr, img_ptr, sid_ptr,  # [M] int32
    seg_ptr,  # [B, H, W] int32 contiguous
    stats_ptr,  # [M, 4] fp32 from the forward: sum focal, sum s, sum t, sum s t
    grad_out_ptr,  # [2] fp32: dL/dfocal, dL/ddice
    h, w, H, W, scale_y, scale_x, inv_scale_y, inv_scale_x, inv_num_masks, inv_pixels,
    ALPHA: tl.constexpr,
    LOW_Y: tl.constexpr,
    LOW_X: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_x = tl.cdiv(w, LOW_X)
    tiles_per_mask = tl.cdiv(h, LOW_Y) * tiles_x
    mask_id = pid // tiles_per_mask
    tile = pid % tiles_per_mask
    row = tl.load(row_ptr + mask_id).to(tl.int64)
    img = tl.load(img_ptr + mask_id).to(tl.int64)
    sid = tl.load(sid_ptr + mask_id)
    x_row = x_ptr + row * h * w
    seg_img = seg_ptr + img * H * W

    # dice_m = 1 - I/U with I = 2 sum(s t) + 1, U = sum(s) + sum(t) + 1:
    # d dice_m / d s_p = (I - 2 t_p U) / U^2.
    sum_s = tl.load(stats_ptr + mask_id * 4 + 1)
    sum_t = tl.load(stats_ptr + mask_id * 4 + 2)
    sum_st = tl.load(stats_ptr + mask_id * 4 + 3)
    dice_i = 2.0 * sum_st + 1.0
    dice_u = sum_s + sum_t + 1.0
    coef_focal = tl.load(grad_out_ptr) * inv_num_masks * inv_pixels  # focal is a per-mask pixel mean
    coef_dice = tl.load(grad_out_ptr + 1) * inv_num_masks / (dice_u * dice_u)

    low_y = (tile // tiles_x) * LOW_Y + tl.arange(0, LOW_Y)  # this program's low-res rows
    low_x = (tile % tiles_x) * LOW_X + tl.arange(0, LOW_X)
    y_start = _support_start((tile // tiles_x) * LOW_Y, inv_scale_y)
    y_end = _support_end((tile // tiles_x) * LOW_Y + LOW_Y - 1, inv_scale_y, H)
    x_start = _support_start((tile % tiles_x) * LOW_X, inv_scale_x)
    x_end = _support_end((tile % tiles_x) * LOW_X + LOW_X - 1, inv_scale_x, W)

    acc = tl.zeros((LOW_Y, LOW_X), dtype=tl.float32)
    for y0 in range(y_start, y_end, BLOCK_Y):
        ys = y0 + tl.arange(0, BLOCK_Y)
        # Wy^T [LOW_Y, BLOCK_Y]; full-res rows past H get zero weight.
        wy_t = tl.trans(_interp_weights(ys, low_y, h, scale_y))
        wy_t = tl.where((ys < H)[None, :], wy_t, 0.0)
        for x0 in range(x_start, x_end, BLOCK_X):
            xs = x0 + tl.arange(0, BLOCK_X)
            inside = (ys < H)[:, None] & (xs < W)[None, :]
            v = _upsampled_logits(x_row, ys, xs, h, w, scale_y, scale_x)
            ids = tl.load(seg_img + ys[:, None] * W + xs[None, :], mask=inside, other=-1)
            t = ids == sid
            s = tl.sigmoid(v)
            bce_neg, bce_pos = _softplus_pair(v)
            # d focal_elem / dv: t=1: -a (1-s)^2 ((1-s) + 2 s BCE(v,1));
            #                    t=0: (1-a) s^2 (s + 2 (1-s) BCE(v,0)).
            d_focal = tl.where(t, -ALPHA * (1.0 - s) * (1.0 - s) * ((1.0 - s) + 2.0 * s * bce_pos),
                               (1.0 - ALPHA) * s * s * (s + 2.0 * (1.0 - s) * bce_neg))
            d_dice = (dice_i - 2.0 * t.to(tl.float32) * dice_u) * s * (1.0 - s)
            grad_v = tl.where(inside, coef_focal * d_focal + coef_dice * d_dice, 0.0)  # (by, bx)
            wx = _interp_weights(xs, low_x, w, scale_x)  # (bx, low_x)
            partial = tl.dot(grad_v, wx, input_precision="ieee")  # (by, low_x)
            acc = tl.dot(wy_t, partial, acc, input_precision="ieee")  # (low_y, low_x)
    out = grad_x_ptr + row * h * w + low_y[:, None] * w + low_x[None, :]
    tl.store(out, acc, mask=(low_y < h)[:, None] & (low_x < w)[None, :])


class _UpsampledFocalDice(torch.autograd.Function):
    """(focal, dice) of matched masks from their low-res logits; upsampling fused in the kernels.

    low_logits: [R, h, w] fp32 contiguous; rows/images/seg_ids: [M] int32 (row of low_logits,
    image, segment id of each mask); seg_maps: [B, H, W] int32 padded with -1.
    """

    @staticmethod
    def forward(ctx, low_logits: Tensor, rows: Tensor, images: Tensor, seg_ids: Tensor, seg_maps: Tensor,
                num_masks: float):
        num_pairs = rows.numel()
        _, h, w = low_logits.shape
        H, W = seg_maps.shape[-2:]
        split = _forward_split(low_logits.device, num_pairs, H * W)
        partial = torch.empty(num_pairs, split, 4, dtype=torch.float32, device=low_logits.device)
        _mask_loss_fwd_kernel[(num_pairs * split,)](
            low_logits, rows, images, seg_ids, seg_maps, partial,
            h, w, H, W, h / H, w / W, split,
            ALPHA=FOCAL_ALPHA,
        )
        stats = partial.sum(1)  # [M, 4]
        focal = (stats[:, 0] / (H * W)).sum() / num_masks
        dice = (1 - (2 * stats[:, 3] + 1) / (stats[:, 1] + stats[:, 2] + 1)).sum() / num_masks
        ctx.save_for_backward(low_logits, rows, images, seg_ids, seg_maps, stats)
        ctx.num_masks = num_masks
        return focal, dice

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_focal: Tensor, grad_dice: Tensor):
        low_logits, rows, images, seg_ids, seg_maps, stats = ctx.saved_tensors
        _, h, w = low_logits.shape
        H, W = seg_maps.shape[-2:]
        grad_out = torch.stack([grad_focal, grad_dice]).float().contiguous()
        # Rows of X that belong to no match (padding of the batched matmul) keep a zero gradient.
        grad_low = torch.zeros_like(low_logits)
        num_pairs = rows.numel()

        def grid(meta):
            return (num_pairs * triton.cdiv(h, meta["LOW_Y"]) * triton.cdiv(w, meta["LOW_X"]),)

        _mask_loss_bwd_kernel[grid](
            low_logits, grad_low, rows, images, seg_ids, seg_maps, stats, grad_out,
            h, w, H, W, h / H, w / W, H / h, W / w, 1.0 / ctx.num_masks, 1.0 / (H * W),
            ALPHA=FOCAL_ALPHA,
        )
        return grad_low, None, None, None, None, None


def _forward_split(device: torch.device, num_pairs: int, pixels: int) -> int:
    """How many programs share one mask's full-res pixels: enough programs to fill the GPU
    (about 4 per SM), never fewer than ~16K pixels each. 1 under the interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(4 * sms, max(num_pairs, 1))
    return max(1, min(wanted, pixels // 16384))


def mask_loss(mask_embed: Tensor, pixel_embed: Tensor, indices: Sequence[tuple[Tensor, Tensor]],
              targets: Sequence[Target], num_masks: float, input_size) -> tuple[Tensor, Tensor]:
    """Focal and dice loss (fp32 scalars with autograd) of the matched pairs of one layer.

    mask_embed: [B, Q, C]; pixel_embed: [B, C, h, w] (any strides, any float dtype);
    indices: per image (query_idx int64 [m_b], seg_idx int64 [m_b]) on the CPU; targets: B
    Targets, segment maps padded with -1 to ``input_size`` (H, W); num_masks: the normaliser.
    Arguments are assumed validated by ``fastmaskformer.ops.mask_loss``.
    """
    device = mask_embed.device
    batch, _, channels = mask_embed.shape
    counts = [int(qi.numel()) for qi, _ in indices]
    if sum(counts) == 0:
        zero = (mask_embed.sum() + pixel_embed.sum()).float() * 0.0  # keeps the graph connected
        return zero, zero.clone()
    m_max = max(counts)
    h, w = pixel_embed.shape[-2:]

    # Matched queries padded to [B, m_max]: slot j of image b holds its j-th match.
    query_pad = torch.zeros(batch, m_max, dtype=torch.int64)
    valid = torch.zeros(batch, m_max, dtype=torch.bool)
    rows, images, seg_ids = [], [], []
    for b, (qi, si) in enumerate(indices):
        query_pad[b, : counts[b]] = qi
        valid[b, : counts[b]] = True
        rows.append(b * m_max + torch.arange(counts[b], dtype=torch.int32))
        images.append(torch.full((counts[b],), b, dtype=torch.int32))
        seg_ids.append(si.to(torch.int32))
    # One packed host->device copy, from page-locked memory and asynchronous: several small
    # pageable copies would each synchronise the stream.
    total = sum(counts)
    packed = torch.cat([torch.cat(rows), torch.cat(images), torch.cat(seg_ids)]).to(torch.int64)
    packed = torch.cat([packed, query_pad.flatten(), valid.flatten().to(torch.int64)])
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    rows, images, seg_ids = (packed[i * total:(i + 1) * total].to(torch.int32) for i in range(3))
    query_pad = packed[3 * total: 3 * total + batch * m_max].view(batch, m_max)
    valid = packed[3 * total + batch * m_max:].view(batch, m_max).bool()

    batch_idx = torch.arange(batch, device=device)[:, None]
    embed = mask_embed.float()[batch_idx, query_pad] * valid[..., None]  # [B, m_max, C], padding 0
    low = torch.bmm(embed, pixel_embed.float().reshape(batch, channels, h * w))  # [B, m_max, hw]
    seg_maps = pad_segment_maps(targets, tuple(input_size)).to(device).contiguous()  # [B, H, W] int32
    return _UpsampledFocalDice.apply(low.view(batch * m_max, h, w), rows, images, seg_ids, seg_maps,
                                     float(num_masks))
