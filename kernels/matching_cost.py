"""Fused pairwise matching cost (DESIGN 3, 1.1): all images x all decoder layers, one launch.

For problem ``n`` (image ``b = n % B``) with queries ``E [Q, C]``, pixel embeddings
``P [C, hw]``, the one-hot ``T [M, hw]`` of the segment map nearest-downsampled to (h, w), and
``x = E @ P``, ``s = sigmoid(x)``, ``f+ = a (1-s)^2 softplus(-x)``, ``f- = (1-a) s^2 softplus(x)``:

    focal = (f+ @ T^T + f- @ (1-T)^T) / hw = ((f+ - f-) @ T^T + rowsum(f-)) / hw
    dice  = 1 - (2 s @ T^T + 1) / (rowsum(s) + colsum(T) + 1)
    C     = -w_class softmax(class_logits)[:, labels] + w_focal focal + w_dice dice

The kernel is flash-attention shaped: a program owns (problem, query tile, segment tile), loops
over pixel tiles, forms the logit tile ``x = E_tile @ P_tile`` in registers, turns it into
``f+ - f-`` and ``s``, and contracts them with a one-hot tile built in registers from the
int32 segment ids (``tl.dot``). Nothing of size ``[Q, hw]`` or ``[M, hw]`` ever reaches memory:
the only temporaries are the int32 ``[B, h, w]`` downsampled map and the labels; the class
softmax is computed in the kernel too (online over chunks of the K+1 logits).

Precision: fp32 inputs use ``input_precision="ieee"`` (true fp32, the default). Set
``INPUT_PRECISION = "tf32"`` on this module (or pass ``input_precision="tf32"``) for the
tensor-core path: then the two one-hot products also round ``f+ - f-`` and ``s`` to tf32 (10-bit
mantissa), so costs move by ~1e-3 relative and near-tied assignments may change. bf16/fp16
inputs feed ``tl.dot`` directly and accumulate in fp32 (the products of bf16 values are exact
in fp32, so ``x`` matches the fp32 reference of the upcast inputs up to summation order); the
one-hot products stay fp32. Under the Triton interpreter (``TRITON_INTERPRET=1``) everything is
upcast to fp32 because the interpreter's bf16 ``tl.dot`` is wrong.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastmaskformer.ops._dispatch import interpreter_enabled
from fastmaskformer.ops.matching_cost import FOCAL_ALPHA, FOCAL_GAMMA
from fastmaskformer.target import Target

assert FOCAL_GAMMA == 2.0, "the kernel squares (1-s) and s explicitly"

# "ieee" (exact fp32, default) or "tf32" (tensor cores for fp32 inputs; see the module docstring).
INPUT_PRECISION = "ieee"
_PRECISIONS = ("ieee", "tf32")
# Segments per program: M is tiled so that the two [BLOCK_Q, BLOCK_M] accumulators stay in
# registers; each extra segment tile recomputes the logits, so we use as few as possible.
_MAX_BLOCK_M = 64


def _configs() -> list[triton.Config]:
    if interpreter_enabled():
        # One config (the interpreter cannot autotune) with big blocks: its cost grows with the
        # number of programs and loop iterations, not with the block size.
        return [triton.Config({"BLOCK_Q": 32, "BLOCK_P": 256, "BLOCK_C": 64})]
    return [
        triton.Config({"BLOCK_Q": bq, "BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw, num_stages=ns)
        for bq, bp, bc, nw, ns in [
            (64, 64, 32, 4, 3),
            (64, 128, 32, 8, 3),
            (128, 64, 32, 8, 3),
            (32, 128, 64, 4, 2),
            (64, 64, 64, 4, 2),
            (128, 128, 32, 8, 2),
        ]
    ]


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b; ``input_precision`` only means something for fp32 operands."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.autotune(configs=_configs(), key=["Q", "C", "HW", "BLOCK_M", "PRECISION"])
@triton.jit
def _matching_cost_kernel(
    logits_ptr, stride_ln, stride_lq, stride_lk,  # [N, Q, K+1] class logits, any strides/float dtype
    labels_ptr, stride_lb,  # [B, >=Mmax] int32 labels, rows padded with 0
    nseg_ptr,  # [B] int32, M_b
    embed_ptr, stride_en, stride_eq, stride_ec,  # [N, Q, C] mask embeddings, any strides
    pixel_ptr, stride_pb, stride_pc, stride_ph, stride_pw,  # [B, C, h, w], any strides
    seg_ptr,  # [B, hw] int32 contiguous, the downsampled segment map (-1 = no segment)
    out_ptr,  # [N, Q, Mmax] fp32 contiguous
    B, Q, C, W, HW, M_MAX, NUM_M_TILES, NUM_CLASSES,
    w_class, w_focal, w_dice,
    ALPHA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Segment tiles vary fastest so that programs running together share E and P in L2.
    pid = tl.program_id(0)
    num_q_tiles = tl.cdiv(Q, BLOCK_Q)
    m_tile = pid % NUM_M_TILES
    q_tile = (pid // NUM_M_TILES) % num_q_tiles
    n = pid // (NUM_M_TILES * num_q_tiles)
    b = n % B
    m_count = tl.load(nseg_ptr + b)

    offs_q = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (bq,)
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (bm,)
    q_ok = offs_q < Q
    m_ok = offs_m < m_count

    acc_ft = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)  # (f+ - f-) @ T^T
    acc_st = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)  # s @ T^T
    row_fneg = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # sum_p f-
    row_s = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # sum_p s
    count = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_p T (pixels of each segment)

    # A tile without segments (M_b = 0, or past M_b) only writes zeros: skip the pixel loop.
    p_end = tl.where(m_tile * BLOCK_M < m_count, HW, 0)
    embed_base = embed_ptr + n * stride_en + offs_q[:, None] * stride_eq
    for p0 in range(0, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)  # (bp,) flat pixel index y * w + x
        p_ok = offs_p < HW
        pixel_base = pixel_ptr + b * stride_pb + (offs_p // W) * stride_ph + (offs_p % W) * stride_pw
        x = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            e = tl.load(embed_base + offs_c[None, :] * stride_ec, mask=q_ok[:, None] & c_ok[None, :], other=0.0)
            p = tl.load(pixel_base[None, :] + offs_c[:, None] * stride_pc, mask=c_ok[:, None] & p_ok[None, :],
                        other=0.0)
            if UPCAST:
                e = e.to(tl.float32)
                p = p.to(tl.float32)
            x = _dot(e, p, x, PRECISION)  # (bq, bp) logits

        s = tl.sigmoid(x)
        # softplus(x) = BCE(x, 0) and softplus(-x) = BCE(x, 1), sharing the stable log term.
        log_term = tl.log(1.0 + tl.exp(-tl.abs(x)))
        bce_neg = tl.maximum(x, 0.0) + log_term
        bce_pos = tl.maximum(-x, 0.0) + log_term
        f_pos = ALPHA * (1.0 - s) * (1.0 - s) * bce_pos
        f_neg = (1.0 - ALPHA) * s * s * bce_neg
        valid = p_ok[None, :]  # pixels past hw must not count (q rows past Q are never stored)
        f_diff = tl.where(valid, f_pos - f_neg, 0.0)
        f_neg = tl.where(valid, f_neg, 0.0)
        s = tl.where(valid, s, 0.0)

        ids = tl.load(seg_ptr + b * HW + offs_p, mask=p_ok, other=-1)  # (bp,) int32
        onehot = (ids[:, None] == offs_m[None, :]).to(tl.float32)  # (bp, bm) = T^T tile
        acc_ft = _dot(f_diff, onehot, acc_ft, PRECISION)
        acc_st = _dot(s, onehot, acc_st, PRECISION)
        row_fneg += tl.sum(f_neg, axis=1)
        row_s += tl.sum(s, axis=1)
        count += tl.sum(onehot, axis=0)

    focal = (acc_ft + row_fneg[:, None]) / HW
    dice = 1.0 - (2.0 * acc_st + 1.0) / (row_s[:, None] + count[None, :] + 1.0)

    # Class term: softmax over the K+1 logits of each query (online max / sum over K chunks, so
    # no [N, Q, K+1] probability tensor is ever written), gathered at the segments' labels.
    logits_base = logits_ptr + n * stride_ln + offs_q[:, None] * stride_lq
    row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for k0 in range(0, NUM_CLASSES, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < NUM_CLASSES
        z = tl.load(logits_base + offs_k[None, :] * stride_lk, mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.where(k_ok[None, :], z.to(tl.float32), float("-inf"))  # rows past Q stay finite
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        row_max = new_max
    labels = tl.load(labels_ptr + b * stride_lb + offs_m, mask=m_ok, other=0)
    z_label = tl.load(logits_base + labels[None, :] * stride_lk, mask=q_ok[:, None] & m_ok[None, :], other=0.0)
    prob = tl.exp(z_label.to(tl.float32) - row_max[:, None]) / row_sum[:, None]
    cost = -w_class * prob + w_focal * focal + w_dice * dice
    cost = tl.where(m_ok[None, :], cost, 0.0)
    out = out_ptr + n * Q * M_MAX + offs_q[:, None] * M_MAX + offs_m[None, :]
    tl.store(out, cost, mask=q_ok[:, None] & (offs_m < M_MAX)[None, :])


def _nearest_source_index(out_size: int, in_size: int) -> Tensor:
    """PyTorch's nearest rule (``F.interpolate(mode="nearest")``): src = min(floor(dst * s), in - 1)
    with the fp32 scale s = in / out. int64 [out_size], non-decreasing."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = (torch.arange(out_size, dtype=torch.float32) * scale).floor().long()
    return src.clamp_max(in_size - 1)


def downsample_segment_ids(targets: Sequence[Target], input_size, out_size) -> Tensor:
    """int32 [B, h, w]: each map padded (-1) to ``input_size`` then nearest-downsampled to
    ``out_size``; equal to ``ops.matching_cost.downsample_segment_maps`` but built by gathering
    the sampled rows/columns of each map, without the padded [B, H, W] map or its float copy."""
    (H, W), (h, w) = input_size, out_size
    rows, cols = _nearest_source_index(h, H), _nearest_source_index(w, W)
    device = targets[0].device
    out = torch.full((len(targets), h, w), -1, dtype=torch.int32, device=device)
    for b, t in enumerate(targets):
        # Sampled rows/columns past the map's own size fall in the padding (-1); being
        # non-decreasing, the ones inside form a prefix.
        n_rows = int((rows < t.image_size[0]).sum())
        n_cols = int((cols < t.image_size[1]).sum())
        sampled = t.segment_map.index_select(0, rows[:n_rows].to(device))
        out[b, :n_rows, :n_cols] = sampled.index_select(1, cols[:n_cols].to(device))
    return out


def _kernel_dtype(x: Tensor) -> Tensor:
    """fp32 / bf16 / fp16 go to the kernel as they are; fp64 is computed in fp32 like the reference."""
    return x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()


def matching_cost(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, targets: Sequence[Target],
                  weights, input_size, input_precision: str | None = None) -> Tensor:
    """Fused matching cost of all problems.

    class_logits: [N, Q, K+1]; mask_embed: [N, Q, C] (any strides); pixel_embed: [B, C, h, w]
    (any strides); problem n uses image b = n % B (N = L*B, layer-major); targets: B Targets
    with segment maps at most ``input_size`` (H, W) (padded with -1 to it, then nearest-
    downsampled to (h, w) like the reference). weights: (w_class, w_focal, w_dice).
    input_precision: "ieee" or "tf32" for fp32 inputs (default: the module's ``INPUT_PRECISION``).
    Returns costs float32 [N, Q, Mmax], zero past each problem's M_b. Arguments are assumed
    validated by ``fastmaskformer.ops.matching_cost_padded``.
    """
    precision = INPUT_PRECISION if input_precision is None else input_precision
    if precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS}, got {precision!r}")
    n_problems, num_queries, _ = class_logits.shape
    batch, channels, h, w = pixel_embed.shape
    device = class_logits.device
    m_max = max((t.num_segments for t in targets), default=0)
    out = torch.empty(n_problems, num_queries, m_max, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out.zero_()

    seg_small = downsample_segment_ids(targets, input_size, (h, w)).reshape(batch, h * w)  # [B, hw] int32
    labels = torch.zeros(batch, m_max, dtype=torch.int32, device=device)
    for b, t in enumerate(targets):
        labels[b, : t.num_segments] = t.labels  # device copy: no host sync
    num_segments = torch.tensor([t.num_segments for t in targets], dtype=torch.int32, device=device)
    num_classes = class_logits.shape[-1]
    block_k = min(triton.next_power_of_2(num_classes), 1024 if interpreter_enabled() else 128)

    embed = _kernel_dtype(mask_embed)
    pixel = _kernel_dtype(pixel_embed)
    if embed.dtype != pixel.dtype:  # tl.dot needs one operand dtype
        embed, pixel = embed.float(), pixel.float()
    block_m = min(max(16, triton.next_power_of_2(m_max)), _MAX_BLOCK_M)
    num_m_tiles = triton.cdiv(m_max, block_m)
    w_class, w_focal, w_dice = (float(v) for v in weights)

    def grid(meta):
        return (n_problems * triton.cdiv(num_queries, meta["BLOCK_Q"]) * num_m_tiles,)

    _matching_cost_kernel[grid](
        class_logits, class_logits.stride(0), class_logits.stride(1), class_logits.stride(2),
        labels, labels.stride(0),
        num_segments,
        embed, embed.stride(0), embed.stride(1), embed.stride(2),
        pixel, pixel.stride(0), pixel.stride(1), pixel.stride(2), pixel.stride(3),
        seg_small,
        out,
        batch, num_queries, channels, w, h * w, m_max, num_m_tiles, num_classes,
        w_class, w_focal, w_dice,
        ALPHA=FOCAL_ALPHA,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        PRECISION=precision,
        UPCAST=interpreter_enabled(),
    )
    return out
