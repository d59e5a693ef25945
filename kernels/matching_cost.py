"""Fused pairwise matching cost (DESIGN 3, 1.1): all images x all decoder layers, one launch.

For problem ``n`` (image ``b = n % B``) with queries ``E [Q, C]``, pixel embeddings
``P [C, hw]``, the one-hot ``T [M, hw]`` of the segment map nearest-downsampled to (h, w), and
``x = E @ P``, ``s = sigmoid(x)``, ``f+ = a (1-s)^2 softplus(-x)``, ``f- = (1-a) s^2 softplus(x)``:

    focal = (f+ @ T^T + f- @ (1-T)^T) / hw = ((f+ - f-) @ T^T + rowsum(f-)) / hw
    dice  = 1 - (2 s @ T^T + 1) / (rowsum(s) + colsum(T) + 1)
    C     = -w_class softmax(class_logits)[:, labels] + w_focal focal + w_dice dice

The kernel is flash-attention shaped: a program owns (problem, query tile, segment tile, pixel
split), loops over its pixel tiles, forms the logit tile ``x = E_tile @ P_tile`` in registers,
turns it into ``f+ - f-`` and ``s`` (one exp, one reciprocal and one log per logit), and
contracts them with a one-hot tile built in registers from the segment ids (``tl.dot``).
Nothing of size ``[Q, hw]`` or ``[M, hw]`` reaches memory. Programs of the 6 layers of one
image are adjacent in the grid so they stream the same pixel embeddings through L2. With
per-layer pixel embeddings ``[L, B, C, h, w]`` (EoMT) each problem reads its own layer's map: the
same launch with a layer stride (0 when shared), each map read by its own layer's programs only.
C is looped over in BLOCK_C chunks, so ViT widths (384..1536) keep the same registers.

When the problems alone give fewer programs than the GPU has SMs (small batches), the pixels
are split across programs: each writes its partial sums and ``_matching_cost_finish_kernel``
adds the splits in a fixed order (deterministic, no float atomics). The class softmax (online
over chunks of the K+1 logits) and the final combination are one helper used by both paths.

Precision (``precision``): the logits and the one-hot products are tl.dots. The cost only
feeds an argmin, so the default is "tf32" (tensor cores; operands keep 10 mantissa bits, costs
move by ~1e-3 relative and exactly tied optima may swap); "tf32x3" (~fp32) and "ieee" (exact
fp32 products, CUDA cores) are opt-in. bf16/fp16 embeddings feed the first tl.dot directly
(exact products, fp32 accumulation). Under the interpreter the tf32 roundings are modelled.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from fastmaskformer.shared import FOCAL_ALPHA, FOCAL_GAMMA, interpreter_enabled

from .common import autotune_configs, check_precision, dot, launch, multiprocessor_count, triton_operator

assert FOCAL_GAMMA == 2.0, "the kernel squares (1-s) and s explicitly"

DEFAULT_PRECISION = "tf32"
# Segments per program: M is tiled so that the two [BLOCK_Q, BLOCK_M] accumulators stay in
# registers; each extra segment tile recomputes the logits, so we use as few as possible.
MAX_BLOCK_M = 64
MIN_SPLIT_PIXELS = 2048  # a pixel split is never shorter than this


@triton.jit
def _pixel_sums(embed_ptr, stride_eq, stride_ec, pixel_ptr, stride_pc, seg_ptr, offs_q, q_ok, offs_m,
                p_start, p_end, C, PRECISION: tl.constexpr, EMULATE: tl.constexpr, ALPHA: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums over pixels [p_start, p_end) of one problem: (f+ - f-) @ T^T and s @ T^T
    [BLOCK_Q, BLOCK_M], rowsum(f-) and rowsum(s) [BLOCK_Q], colsum(T) [BLOCK_M].
    embed_ptr: the problem's E [Q, C]; pixel_ptr: its image's P [C, hw] (pixel stride 1);
    seg_ptr: its image's segment ids [hw] (-1 = none)."""
    acc_ft = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
    acc_st = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
    row_fneg = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    row_s = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    count = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_end
        x = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            e = tl.load(embed_ptr + offs_q[:, None] * stride_eq + offs_c[None, :] * stride_ec,
                        mask=q_ok[:, None] & c_ok[None, :], other=0.0)
            p = tl.load(pixel_ptr + offs_c[:, None] * stride_pc + offs_p[None, :],
                        mask=c_ok[:, None] & p_ok[None, :], other=0.0)
            x = dot(e, p, x, PRECISION, EMULATE)  # (bq, bp) logits
        # With z = exp(-|x|): sigmoid(x) = 1/(1+z) or z/(1+z), softplus(-|x|) = log(1+z);
        # BCE(x, 0) = softplus(x) = max(x, 0) + log(1+z) and BCE(x, 1) = BCE(x, 0) - x.
        z = tl.exp(-tl.abs(x))
        inv = 1.0 / (1.0 + z)
        s = tl.where(x >= 0, inv, z * inv)
        bce_neg = tl.maximum(x, 0.0) + tl.log(1.0 + z)
        f_neg = (1.0 - ALPHA) * s * s * bce_neg
        f_diff = ALPHA * (1.0 - s) * (1.0 - s) * (bce_neg - x) - f_neg
        valid = p_ok[None, :]  # pixels past the range must not count (rows past Q are never stored)
        f_diff = tl.where(valid, f_diff, 0.0)
        s = tl.where(valid, s, 0.0)
        row_fneg += tl.sum(tl.where(valid, f_neg, 0.0), axis=1)
        row_s += tl.sum(s, axis=1)
        ids = tl.load(seg_ptr + offs_p, mask=p_ok, other=-1)  # (bp,)
        onehot = (ids[:, None] == offs_m[None, :]).to(tl.float32)  # (bp, bm) = T^T tile
        count += tl.sum(onehot, axis=0)
        acc_ft = dot(f_diff, onehot, acc_ft, PRECISION, EMULATE)
        acc_st = dot(s, onehot, acc_st, PRECISION, EMULATE)
    return acc_ft, acc_st, row_fneg, row_s, count


@triton.jit
def _store_cost(acc_ft, acc_st, row_fneg, row_s, count, logits_ptr, stride_lq, stride_lk, labels_ptr, out_ptr,
                offs_q, q_ok, offs_m, m_ok, Q, M_MAX, HW, NUM_CLASSES, w_class, w_focal, w_dice,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """Combine the pixel sums of one (problem, query tile, segment tile) with the class term and
    store the costs. logits_ptr: the problem's class logits [Q, K+1]; labels_ptr: its image's
    labels; out_ptr: its cost matrix [Q, M_MAX]."""
    focal = (acc_ft + row_fneg[:, None]) / HW
    dice = 1.0 - (2.0 * acc_st + 1.0) / (row_s[:, None] + count[None, :] + 1.0)
    # softmax over the K+1 logits of each query, online over chunks (no [Q, K+1] probabilities
    # are written), gathered at the segments' labels.
    row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for k0 in range(0, NUM_CLASSES, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < NUM_CLASSES
        z = tl.load(logits_ptr + offs_q[:, None] * stride_lq + offs_k[None, :] * stride_lk,
                    mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.where(k_ok[None, :], z.to(tl.float32), float("-inf"))  # rows past Q stay finite
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        row_max = new_max
    labels = tl.load(labels_ptr + offs_m, mask=m_ok, other=0)
    z_label = tl.load(logits_ptr + offs_q[:, None] * stride_lq + labels[None, :] * stride_lk,
                      mask=q_ok[:, None] & m_ok[None, :], other=0.0)
    prob = tl.exp(z_label.to(tl.float32) - row_max[:, None]) / row_sum[:, None]
    cost = tl.where(m_ok[None, :], -w_class * prob + w_focal * focal + w_dice * dice, 0.0)
    tl.store(out_ptr + offs_q[:, None] * M_MAX + offs_m[None, :], cost,
             mask=q_ok[:, None] & (offs_m < M_MAX)[None, :])


@triton.jit
def _program_tile(pid, B, LAYERS, Q, NUM_M_TILES, SPLIT, BLOCK_Q: tl.constexpr):
    """(problem n, image b, query tile, segment tile, split) of a program. Splits, then segment
    tiles, then query tiles, then layers vary fastest: the programs of one image run together."""
    num_q_tiles = tl.cdiv(Q, BLOCK_Q)
    split = pid % SPLIT
    m_tile = (pid // SPLIT) % NUM_M_TILES
    q_tile = (pid // (SPLIT * NUM_M_TILES)) % num_q_tiles
    rest = pid // (SPLIT * NUM_M_TILES * num_q_tiles)
    layer = rest % LAYERS
    b = rest // LAYERS
    return layer * B + b, b, q_tile, m_tile, split


# (BLOCK_Q, BLOCK_P, BLOCK_C, num_warps, num_stages) per precision: the configs that compile
# without heavy spills for sm_90 and sm_80 (python benchmarks/aot.py); tf32x3 keeps
# two more [BLOCK_Q, BLOCK_P] operand halves alive, so it gets smaller pixel tiles.
_GPU_CONFIGS = {
    "ieee": [(64, 64, 32, 8, 3), (128, 32, 32, 8, 3)],
    "tf32": [(64, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 64, 16, 8, 2), (128, 32, 32, 8, 3)],
    "tf32x3": [(128, 32, 32, 8, 3), (64, 32, 32, 8, 3), (128, 32, 16, 8, 2)],
}


def _configs(precision: str) -> list[triton.Config]:
    return autotune_configs(
        gpu=[{"BLOCK_Q": bq, "BLOCK_P": bp, "BLOCK_C": bc, "num_warps": nw, "num_stages": ns}
             for bq, bp, bc, nw, ns in _GPU_CONFIGS[precision]],
        # One config (the interpreter cannot autotune) with big blocks: its cost grows with the
        # number of programs and loop iterations, not with the block size.
        interpreter={"BLOCK_Q": 32, "BLOCK_P": 512, "BLOCK_C": 64})


@triton.jit
def _matching_cost_kernel(
    logits_ptr, stride_ln, stride_lq, stride_lk,  # [N, Q, K+1] class logits, any strides/float dtype
    labels_ptr, stride_lb,  # [B, >=Mmax] int32 labels, rows padded with 0
    nseg_ptr,  # [B] int32, M_b
    embed_ptr, stride_en, stride_eq, stride_ec,  # [N, Q, C] mask embeddings, any strides
    pixel_ptr, stride_pl, stride_pb, stride_pc,  # [L, B, C, hw] pixel embeddings (stride_pl 0: shared), pixel stride 1
    seg_ptr,  # [B, hw] int32 contiguous, the downsampled segment map (-1 = no segment)
    out_ptr,  # SPLIT == 1: costs [N, Q, Mmax] fp32; else partial sums (see _partial_offsets)
    B, LAYERS, Q, C, HW, M_MAX, NUM_M_TILES, NUM_CLASSES, SPLIT_LEN,
    w_class, w_focal, w_dice,
    ALPHA: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, b, q_tile, m_tile, split = _program_tile(tl.program_id(0), B, LAYERS, Q, NUM_M_TILES, SPLIT, BLOCK_Q)
    m_count = tl.load(nseg_ptr + b)
    offs_q = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_q < Q
    m_ok = offs_m < m_count
    # A tile without segments (M_b = 0, or past M_b) only writes zeros: skip the pixel loop.
    p_start = split * SPLIT_LEN
    p_end = tl.where(m_tile * BLOCK_M < m_count, tl.minimum(p_start + SPLIT_LEN, HW), p_start)
    acc_ft, acc_st, row_fneg, row_s, count = _pixel_sums(
        embed_ptr + n.to(tl.int64) * stride_en, stride_eq, stride_ec,
        pixel_ptr + (n // B).to(tl.int64) * stride_pl + b.to(tl.int64) * stride_pb, stride_pc,
        seg_ptr + b.to(tl.int64) * HW, offs_q, q_ok, offs_m, p_start, p_end, C,
        PRECISION, EMULATE, ALPHA, BLOCK_Q, BLOCK_M, BLOCK_P, BLOCK_C)
    if SPLIT == 1:
        _store_cost(acc_ft, acc_st, row_fneg, row_s, count, logits_ptr + n.to(tl.int64) * stride_ln, stride_lq,
                    stride_lk, labels_ptr + b * stride_lb, out_ptr + n.to(tl.int64) * Q * M_MAX, offs_q, q_ok,
                    offs_m, m_ok, Q, M_MAX, HW, NUM_CLASSES, w_class, w_focal, w_dice, BLOCK_Q, BLOCK_K)
    else:
        base = out_ptr + _partial_offset(n, split, SPLIT, Q, M_MAX)
        _store_partials(base, acc_ft, acc_st, row_fneg, row_s, count, offs_q, q_ok, offs_m, Q, M_MAX)


# One autotuner per precision, each with the configs tuned for it: torch.compile supports
# triton.autotune with configs and keys only (no pruning hooks).
_MATCHING_COST_KERNELS = {
    precision: triton.autotune(configs=_configs(precision), key=["Q", "C", "HW", "BLOCK_M", "SPLIT"])(
        _matching_cost_kernel)
    for precision in _GPU_CONFIGS
}


@triton.jit
def _partial_offset(n, split, SPLIT, Q, M_MAX):
    """Start of the partial sums of (problem n, split): per problem and split a block of
    2 Q M_MAX + 2 Q + M_MAX floats: (f+ - f-) T^T, s T^T [Q, M_MAX], rowsum f-, rowsum s [Q],
    colsum T [M_MAX]."""
    return (n.to(tl.int64) * SPLIT + split) * (2 * Q * M_MAX + 2 * Q + M_MAX)


@triton.jit
def _store_partials(base, acc_ft, acc_st, row_fneg, row_s, count, offs_q, q_ok, offs_m, Q, M_MAX):
    qm = offs_q[:, None] * M_MAX + offs_m[None, :]
    qm_ok = q_ok[:, None] & (offs_m < M_MAX)[None, :]
    tl.store(base + qm, acc_ft, mask=qm_ok)
    tl.store(base + Q * M_MAX + qm, acc_st, mask=qm_ok)
    tl.store(base + 2 * Q * M_MAX + offs_q, row_fneg, mask=q_ok)
    tl.store(base + 2 * Q * M_MAX + Q + offs_q, row_s, mask=q_ok)
    tl.store(base + 2 * Q * M_MAX + 2 * Q + offs_m, count, mask=offs_m < M_MAX)


@triton.jit
def _matching_cost_finish_kernel(
    partial_ptr, logits_ptr, stride_ln, stride_lq, stride_lk, labels_ptr, stride_lb, nseg_ptr, out_ptr,
    B, Q, M_MAX, NUM_M_TILES, HW, NUM_CLASSES, w_class, w_focal, w_dice, SPLIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Adds the SPLIT partial sums of each (problem, query tile, segment tile) in split order and
    stores the costs. Grid: (N * cdiv(Q, BLOCK_Q) * NUM_M_TILES,)."""
    pid = tl.program_id(0)
    num_q_tiles = tl.cdiv(Q, BLOCK_Q)
    m_tile = pid % NUM_M_TILES
    q_tile = (pid // NUM_M_TILES) % num_q_tiles
    n = pid // (NUM_M_TILES * num_q_tiles)
    b = n % B
    offs_q = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_q < Q
    m_ok = offs_m < tl.load(nseg_ptr + b)
    qm = offs_q[:, None] * M_MAX + offs_m[None, :]
    qm_ok = q_ok[:, None] & (offs_m < M_MAX)[None, :]
    acc_ft = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
    acc_st = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
    row_fneg = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    row_s = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    count = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for split in range(SPLIT):
        base = partial_ptr + _partial_offset(n, split, SPLIT, Q, M_MAX)
        acc_ft += tl.load(base + qm, mask=qm_ok, other=0.0)
        acc_st += tl.load(base + Q * M_MAX + qm, mask=qm_ok, other=0.0)
        row_fneg += tl.load(base + 2 * Q * M_MAX + offs_q, mask=q_ok, other=0.0)
        row_s += tl.load(base + 2 * Q * M_MAX + Q + offs_q, mask=q_ok, other=0.0)
        count += tl.load(base + 2 * Q * M_MAX + 2 * Q + offs_m, mask=offs_m < M_MAX, other=0.0)
    _store_cost(acc_ft, acc_st, row_fneg, row_s, count, logits_ptr + n.to(tl.int64) * stride_ln, stride_lq, stride_lk,
                labels_ptr + b * stride_lb, out_ptr + n.to(tl.int64) * Q * M_MAX, offs_q, q_ok, offs_m, m_ok,
                Q, M_MAX, HW, NUM_CLASSES, w_class, w_focal, w_dice, BLOCK_Q, BLOCK_K)


def _kernel_dtype(x: Tensor) -> Tensor:
    """fp32 / bf16 / fp16 go to the kernel as they are; fp64 is computed in fp32 like the reference."""
    return x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()


def pixel_splits(device, base_programs: int, pixels: int) -> int:
    """Programs per problem along the pixels: enough to give every SM one program when the
    problems alone do not, never splits shorter than MIN_SPLIT_PIXELS."""
    wanted = triton.cdiv(multiprocessor_count(device), max(base_programs, 1))
    return max(1, min(wanted, pixels // MIN_SPLIT_PIXELS))


@triton_operator("matching_cost")
def matching_cost(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_small: Tensor, labels: Tensor,
                  num_segments: Tensor, weights: list[float], precision: str, num_layers: int) -> Tensor:
    """Fused matching cost of all problems.

    class_logits: [N, Q, K+1]; mask_embed: [N, Q, C] (any strides); pixel_embed: [B, C, h, w]
    shared by the layers, or [L, B, C, h, w] per layer; problem n = layer * B + b uses image b
    (its layer's map when per layer); seg_small: int32 [B, h, w], the segment maps at the
    prediction size (-1 = none); labels: int64 [B, M] (padded); num_segments: int64 [B];
    weights: (w_class, w_focal, w_dice); precision: "tf32" | "tf32x3" | "ieee"; num_layers: N / B.
    Returns costs float32 [N, Q, M], zero past each problem's M_b.
    """
    check_precision(precision, "matching_cost")
    n_problems, num_queries, _ = class_logits.shape
    batch, channels, h, w = pixel_embed.shape[-4:]
    m_max = labels.shape[1]
    out = torch.zeros(n_problems, num_queries, m_max, dtype=torch.float32, device=class_logits.device)
    if out.numel() == 0:
        return out
    device = class_logits.device
    seg_small = seg_small.reshape(batch, h * w).to(torch.int32).contiguous()
    labels = labels.to(torch.int32).contiguous()
    num_segments = num_segments.to(torch.int32).contiguous()
    num_classes = class_logits.shape[-1]
    # The class softmax runs once per program: small chunks keep its registers low.
    block_k = min(triton.next_power_of_2(num_classes), 1024 if interpreter_enabled() else 32)

    embed = _kernel_dtype(mask_embed)
    pixel = _kernel_dtype(pixel_embed)
    pixel = pixel.reshape(*pixel.shape[:-2], h * w)  # copies only if the pixels are strided
    if pixel.stride(-1) != 1:
        pixel = pixel.contiguous()
    stride_pl = pixel.stride(0) if pixel.dim() == 4 else 0
    if embed.dtype != pixel.dtype:  # tl.dot needs one operand dtype
        embed, pixel = embed.float(), pixel.float()
    block_m = min(max(16, triton.next_power_of_2(m_max)), MAX_BLOCK_M)
    num_m_tiles = triton.cdiv(m_max, block_m)
    # Splits are sized for the largest query tile (the fewest programs per problem).
    split = pixel_splits(device, n_problems * triton.cdiv(num_queries, 128) * num_m_tiles, h * w)
    split_len = triton.cdiv(h * w, split)
    w_class, w_focal, w_dice = (float(v) for v in weights)
    partial = torch.empty(n_problems * split * (2 * num_queries * m_max + 2 * num_queries + m_max) if split > 1 else 0,
                          dtype=torch.float32, device=device)

    def grid(meta):
        return (n_problems * triton.cdiv(num_queries, meta["BLOCK_Q"]) * num_m_tiles * split,)

    launch(_MATCHING_COST_KERNELS[precision], grid,
           class_logits, class_logits.stride(0), class_logits.stride(1), class_logits.stride(2),
           labels, labels.stride(0),
           num_segments,
           embed, embed.stride(0), embed.stride(1), embed.stride(2),
           pixel, stride_pl, pixel.stride(-3), pixel.stride(-2),
           seg_small,
           out if split == 1 else partial,
           batch, num_layers, num_queries, channels, h * w, m_max, num_m_tiles, num_classes, split_len,
           w_class, w_focal, w_dice,
           ALPHA=FOCAL_ALPHA, SPLIT=split, BLOCK_M=block_m, BLOCK_K=block_k,
           PRECISION=precision, EMULATE=interpreter_enabled())
    if split > 1:
        block_q = min(triton.next_power_of_2(num_queries), 64)
        launch(_matching_cost_finish_kernel, (n_problems * triton.cdiv(num_queries, block_q) * num_m_tiles,),
               partial, class_logits, class_logits.stride(0), class_logits.stride(1), class_logits.stride(2),
               labels, labels.stride(0), num_segments, out,
               batch, num_queries, m_max, num_m_tiles, h * w, num_classes, w_class, w_focal, w_dice,
               SPLIT=split, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return out
