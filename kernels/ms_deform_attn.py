"""Multi-scale deformable attention: fused Triton forward and deterministic backward (issues 18, 26).

Semantics (``fastmaskformer.ops.ms_deform_attn``): for query q, head h, level l, point p,
bilinear ``grid_sample`` (align_corners=False, zero padding) of level l's value map at the
normalised location (x, y), weighted by the attention weight and summed over (l, p):
``out[b, q, h*D + d]``. Pixel coordinates ``x_pix = x * w_l - 0.5``; the taps are
``floor(x_pix) + {0, 1}`` with weights ``1 - fx, fx`` (fx the fractional part); a tap outside the
map reads zero.

Layouts (all contiguous): value [B, S, H, D] (levels flattened row-major, level l starting at row
``start_l``), sampling_locations [B, Lq, H, L, P, 2], attention_weights [B, Lq, H, L, P],
out / grad_out [B, Lq, H*D]. One program handles BLOCK_Q queries of one (image, head) and all D
channels of the head (a [BLOCK_Q, D] tile: each tap is one contiguous row of D values, the
access layout DCNv4 argues for; programs ordered head-fastest); it loops over levels and points.
Loads of any float dtype are upcast: all arithmetic is float32.

Backward (same tiling):
- attention-weight and location gradients are reductions over D inside the program (gather
  formulation: no atomics);
- the value gradient is a scatter (each sample adds ``a * w_tap * grad_out`` to 4 value rows).
  The official CUDA extension does this with float atomics, so its gradients change from run to
  run. By default (``deterministic=True``) every contribution is rounded to 32-bit fixed point
  and added with *integer* atomics, which are associative: the sum is the same whatever the
  order, so two runs give bit-identical gradients, at the width (4 bytes per element) of the
  official float atomics. The scale is a power of two per (image, head, level), chosen on the
  device (no host sync) from the data so that no partial sum can overflow:
  1. a mass pass adds ``|a|`` of every sample to its (clamped) top-left tap in 32-bit fixed point
     (``_ms_deform_attn_mass_kernel``; one scalar atomic per sample, each term rounded up);
  2. a value row's taps come from samples whose top-left tap is the row or one of its 3
     up/left neighbours, so ``bound(row) = max|grad_out(b, h)| * (the 2x2 box sum of the mass)``
     bounds the sum of |contributions| of every value-gradient element of the row
     (``_ms_deform_attn_box_max_kernel``: the largest box sum of each level, int32 atomic max);
  3. ``scale(b, h, l) = 2^(30 - e)`` with ``max_rows_of_l bound < 2^e``, computed from the exponent
     bits inside the kernels that need it: every partial sum stays below ``2^30 + n`` (n
     contributions, each rounded to the nearest integer) < 2^31;
  4. ``_ms_deform_attn_fixed_to_float_kernel`` divides by the scale of each row's level (exact:
     a power of two) and writes the value gradient in value's dtype.
  Resolution: each contribution keeps its float32 value to within half a unit of
  ``2^-30 * bound(b, h, l)`` (finer than float32 for the largest sums of the level; for rows far
  below the level's largest, coarser than float atomics would be). A non-finite grad_out or
  weight makes the value gradient of its (image, head) NaN.
  Memory: an int32 accumulator [B, S, H, D] (the size of a float32 value gradient; 88 MB at the
  Mask2Former pixel-decoder size B=16, 512x512) and the int32 mass [B, S, H].
  Fewer atomics (``MERGE`` configs): neighbouring queries sample overlapping rows, so a program
  sorts the taps of each level of its query block by value row, adds up each row's (already
  rounded) contributions in registers and issues one atomic per distinct row: about half the
  atomics on the benchmark's offsets (``benchmarks/deform_cache.py``), the same integer sums.
- ``deterministic=False``: float32 atomics, the official extension's scheme (no mass pass and no
  fixed-point conversion; gradients differ from run to run in the last bits; merged rows are
  summed in float64 first).
"""
import contextlib

import torch
import triton
import triton.language as tl

from .common import autotune_configs, launch, triton_operator

# Forward: BLOCK_Q queries of one head per program ([BLOCK_Q, D] tiles); autotuned.
FORWARD_CONFIG = dict(gpu=[dict(BLOCK_Q=16, num_warps=2), dict(BLOCK_Q=16, num_warps=4), dict(BLOCK_Q=32, num_warps=4),
                           dict(BLOCK_Q=64, num_warps=8)],
                      interpreter=dict(BLOCK_Q=128))
# The backward kernel's autotuner zeroes the accumulator before each benchmark run and before the
# real one (``reset_to_zero``): its atomics are not added up more than once. TILE = BLOCK_Q * BLOCK_D
# elements per program on 4 warps: 2 per thread, 48-80 registers, 38-63% occupancy on sm_90 / sm_80
# (benchmarks/results/aot-ms-deform-attn-2026-12-07.json) for this gather/atomic-latency-bound loop
# (4 per thread need ~140 registers, 8 ~240). QBLOCKS: query
# blocks one program runs one after the other (a program then spans QBLOCKS * BLOCK_Q neighbouring
# queries of one head, whose taps overlap: the repeats can hit the SM's L1 instead of L2; simulated
# in ``benchmarks/deform_cache.py``). MERGE: the value-gradient taps of a query block's level are
# sorted by value row and each row's contributions added up in registers before ONE atomic per
# distinct row (``_scatter_level_merged``; about half the atomics on the benchmark's offsets),
# MERGE_D channels at a time: registers grow with it (deterministic, sm_90, TILE 256 on 4 warps:
# 88 at MERGE_D=2, 168 at 8, 255 at 32), while every chunk repeats the cross-warp prefix sum;
# the fixed-point gradients are bit-identical either way. The whole query range per (image, head)
# under the interpreter, merged.
BACKWARD_CONFIG = dict(gpu=[dict(TILE=256, QBLOCKS=1, MERGE=False, num_warps=4),
                            dict(TILE=256, QBLOCKS=4, MERGE=False, num_warps=4),
                            dict(TILE=256, QBLOCKS=8, MERGE=False, num_warps=4),
                            dict(TILE=256, QBLOCKS=1, MERGE=True, MERGE_D=2, num_warps=4),
                            dict(TILE=256, QBLOCKS=4, MERGE=True, MERGE_D=2, num_warps=4),
                            dict(TILE=256, QBLOCKS=1, MERGE=True, MERGE_D=8, num_warps=4),
                            dict(TILE=512, QBLOCKS=2, MERGE=True, MERGE_D=2, num_warps=8)],
                       interpreter=dict(TILE=8192, QBLOCKS=1, MERGE=True, MERGE_D=1024))
# The mass kernel's atomics feed a bound that must not be added up twice: ONE config (Triton runs a
# lone config without benchmarking).
MASS_CONFIG = dict(gpu=[dict(BLOCK_Q=128, num_warps=4)], interpreter=dict(BLOCK_Q=1024))
# Row-wise passes: the mass box maxima over [B, S, H] (BLOCK_S rows), the fixed-point conversion
# over [B, S, H*D] (TILE elements: 16 per thread on 4 warps).
BOX_CONFIG = dict(gpu=[dict(BLOCK_S=32, num_warps=4)], interpreter=dict(BLOCK_S=4096))
CONVERT_CONFIG = dict(gpu=[dict(TILE=2048, num_warps=4)], interpreter=dict(TILE=1 << 20))
# Fixed-point headroom (module docstring): bound * scale < 2^30, partial sums < 2^30 + n < 2^31.
# The mass uses 2^28 so that a 2x2 box sum of it stays below 2^31.
FIXED_POINT_BITS: tl.constexpr = tl.constexpr(30)
MASS_BITS: tl.constexpr = tl.constexpr(28)
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
NAN: tl.constexpr = tl.constexpr(float("nan"))
# Float rounding slack of the bounds (conversions and products of float32 values round by
# at most 2^-24 each): a bound multiplied by it stays an upper bound.
BOUND_SLACK: tl.constexpr = tl.constexpr(1.0 + 2.0 ** -20)


# ---------------------------------------------------------------------------- jit helpers
@triton.jit
def _sample(loc_ptr, attn_ptr, off, qmask, h_l, w_l):
    """Taps of the samples ``off`` [BLOCK_Q] (flat (b, q, h, l, p) indices) on a level of size
    (h_l, w_l): integer top-left tap (x0, y0), fractions (fx, fy) and the attention weight."""
    lx = tl.load(loc_ptr + 2 * off, mask=qmask, other=0.0).to(tl.float32)
    ly = tl.load(loc_ptr + 2 * off + 1, mask=qmask, other=0.0).to(tl.float32)
    a = tl.load(attn_ptr + off, mask=qmask, other=0.0).to(tl.float32)
    wf = w_l.to(tl.float32)
    hf = h_l.to(tl.float32)
    # Clamping far-away points keeps the integer conversion defined; beyond -2 / size+1 both
    # taps are outside the map either way (value and gradients zero).
    x = tl.minimum(tl.maximum(lx * wf - 0.5, -2.0), wf + 1.0)
    y = tl.minimum(tl.maximum(ly * hf - 0.5, -2.0), hf + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f, a


@triton.jit
def _tap_rows(x0, y0, h_l, w_l, start, qmask):
    """Value rows of the 4 taps (row-major in the flattened value) and whether each is inside."""
    in_x0 = (x0 >= 0) & (x0 < w_l)
    in_x1 = (x0 + 1 >= 0) & (x0 + 1 < w_l)
    in_y0 = (y0 >= 0) & (y0 < h_l)
    in_y1 = (y0 + 1 >= 0) & (y0 + 1 < h_l)
    r00 = start + y0 * w_l + x0
    return (r00, qmask & in_y0 & in_x0, r00 + 1, qmask & in_y0 & in_x1,
            r00 + w_l, qmask & in_y1 & in_x0, r00 + w_l + 1, qmask & in_y1 & in_x1)


@triton.jit
def _load_tap(value_ptr, vbase, row, inside, d, dmask, row_stride):
    """value rows ``row`` [BLOCK_Q] of one head -> [BLOCK_Q, BLOCK_D] float32 (0 outside)."""
    ptrs = value_ptr + vbase + (row.to(tl.int64) * row_stride)[:, None] + d[None, :]
    return tl.load(ptrs, mask=inside[:, None] & dmask[None, :], other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _first_query(H, BLOCK_Q: tl.constexpr, QBLOCKS: tl.constexpr, sub):
    """The first query of this program's ``sub``-th block of BLOCK_Q queries (programs: heads
    fastest, then runs of QBLOCKS blocks)."""
    return ((tl.program_id(0) // H) * QBLOCKS + sub) * BLOCK_Q


@triton.jit
def _program_block(S, Lq, H, D, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, QBLOCKS: tl.constexpr, sub):
    """This program's image b, head h and its ``sub``-th block of BLOCK_Q queries (a program runs
    QBLOCKS blocks): (b, h, query mask, d, d mask, value row stride, value base offset of (b, h),
    flat (b, q, h) indices [BLOCK_Q]). Heads vary fastest over the programs: the programs of one
    query block run together and share the location / weight sectors and the value rows ([H, D]
    contiguous per pixel) in L2."""
    h = tl.program_id(0) % H
    b = tl.program_id(1).to(tl.int64)
    q = _first_query(H, BLOCK_Q, QBLOCKS, sub) + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    row_stride = H * D
    return b, h, q < Lq, d, d < D, row_stride, b * S * row_stride + h * D, (b * Lq + q) * H + h


@triton.jit
def _level(shapes_ptr, lvl):
    """(h_l, w_l) of level ``lvl``; the callers loop over the levels in order and add up the
    first value row of each (``start += h_l * w_l``)."""
    return tl.load(shapes_ptr + 2 * lvl).to(tl.int32), tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)


@triton.jit
def _pow2_scale(bound, BITS: tl.constexpr):
    """``2^(BITS - e)`` as float32 with ``bound < 2^e`` (bound >= 0 finite float32; the exponent
    read from the bits: a normal bound lies in [2^(E-127), 2^(E-126)) for the biased exponent
    E, zero and subnormals below 2^-126), kept inside float32's normal range [2^-126, 2^127]:
    ``scale * bound < 2^BITS``."""
    e = ((bound.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    exponent = tl.minimum(tl.maximum(-e + BITS, -126), 127)
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mass_scale(a_sum_ptr, bh):
    """The fixed-point scale of the mass of (image, head) ``bh``: its sum of |a| bounds every mass."""
    return _pow2_scale(tl.load(a_sum_ptr + bh) * BOUND_SLACK, MASS_BITS)


@triton.jit
def _value_scale(box_max_ptr, a_sum_ptr, g_max_ptr, b, lvl, h, L, H):
    """The fixed-point scale of the value gradient of (image b, level lvl, heads h): the level's
    largest mass box sum (in units of 1 / mass scale) times max|grad_out| of (b, h) bounds the
    sum of |contributions| of every element; scale * bound < 2^30. Also whether that is finite."""
    bh = b * H + h
    mass = tl.load(box_max_ptr + (b * L + lvl) * H + h).to(tl.float32) * BOUND_SLACK / _mass_scale(a_sum_ptr, bh)
    g_max = tl.load(g_max_ptr + bh)
    a_sum = tl.load(a_sum_ptr + bh)
    finite = (g_max <= FLOAT32_MAX) & (a_sum <= FLOAT32_MAX)  # false for inf and NaN
    return _pow2_scale(tl.where(finite, mass * g_max * BOUND_SLACK, 0.0), FIXED_POINT_BITS), finite


@triton.autotune(
    configs=autotune_configs(**FORWARD_CONFIG),
    # Lq rounded up to a power of two: variable image sizes (COCO) do not re-tune at every size.
    key=["LQ_BUCKET", "H", "L", "P", "BLOCK_D"],
)
@triton.jit
def _ms_deform_attn_fwd_kernel(value_ptr, shapes_ptr, loc_ptr, attn_ptr, out_ptr,
                               S, Lq, H, D, L, P, LQ_BUCKET, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    _, _, qmask, d, dmask, row_stride, vbase, qh = _program_block(S, Lq, H, D, BLOCK_D, BLOCK_Q, 1, 0)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    start = 0
    for lvl in range(L):
        h_l, w_l = _level(shapes_ptr, lvl)
        for pt in range(P):
            off = qh * (L * P) + lvl * P + pt
            x0, y0, fx, fy, a = _sample(loc_ptr, attn_ptr, off, qmask, h_l, w_l)
            r00, i00, r01, i01, r10, i10, r11, i11 = _tap_rows(x0, y0, h_l, w_l, start, qmask)
            gx = 1.0 - fx
            gy = 1.0 - fy
            v = (gy * gx)[:, None] * _load_tap(value_ptr, vbase, r00, i00, d, dmask, row_stride)
            v += (gy * fx)[:, None] * _load_tap(value_ptr, vbase, r01, i01, d, dmask, row_stride)
            v += (fy * gx)[:, None] * _load_tap(value_ptr, vbase, r10, i10, d, dmask, row_stride)
            v += (fy * fx)[:, None] * _load_tap(value_ptr, vbase, r11, i11, d, dmask, row_stride)
            acc += a[:, None] * v
        start += h_l * w_l
    out = out_ptr + (qh * D)[:, None] + d[None, :]
    tl.store(out, acc, mask=qmask[:, None] & dmask[None, :])


@triton.autotune(configs=autotune_configs(**MASS_CONFIG), key=["H", "L", "P"])
@triton.jit
def _ms_deform_attn_mass_kernel(shapes_ptr, loc_ptr, attn_ptr, a_sum_ptr, mass_ptr, S, Lq, H, L, P,
                                BLOCK_Q: tl.constexpr):
    """mass[b, row, h] += ceil(|a| * mass scale) (int32 atomics) over the samples whose top-left
    tap, clamped into the map, is ``row``; samples with no tap inside the map add nothing."""
    # (named: Triton treats a name assigned again inside the loops as loop-carried)
    b, h, qmask, _d, _dmask, _row_stride, _vbase, qh = _program_block(S, Lq, H, 1, 1, BLOCK_Q, 1, 0)
    mass_scale = _mass_scale(a_sum_ptr, b * H + h)
    start = 0
    for lvl in range(L):
        h_l, w_l = _level(shapes_ptr, lvl)
        for pt in range(P):
            off = qh * (L * P) + lvl * P + pt
            x0, y0, _fx, _fy, a = _sample(loc_ptr, attn_ptr, off, qmask, h_l, w_l)
            touches = qmask & (x0 >= -1) & (x0 < w_l) & (y0 >= -1) & (y0 < h_l)
            row = start + tl.maximum(y0, 0) * w_l + tl.maximum(x0, 0)
            tl.atomic_add(mass_ptr + (b * S + row.to(tl.int64)) * H + h,
                          tl.ceil(tl.abs(a) * mass_scale).to(tl.int32), mask=touches, sem="relaxed")
        start += h_l * w_l


@triton.jit
def _rows_of_level(s, start, h_l, w_l):
    """For value rows ``s`` [BLOCK_S]: inside the level starting at ``start``, column, row."""
    local = s - start
    return (local >= 0) & (local < h_l * w_l), local % w_l, local // w_l


@triton.autotune(configs=autotune_configs(**BOX_CONFIG), key=["H", "L"])
@triton.jit
def _ms_deform_attn_box_max_kernel(shapes_ptr, mass_ptr, box_max_ptr, S, H, L, BLOCK_H: tl.constexpr,
                                   BLOCK_S: tl.constexpr):
    """box_max[b, l, h] = max over the rows of level l of the 2x2 box sum of mass [B, S, H] (the
    row, its left, upper and upper-left neighbours inside the level): int32 atomic max, exact."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(1).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    base = mass_ptr + b * S * H + hs[None, :]
    start = 0
    for lvl in range(L):
        h_l, w_l = _level(shapes_ptr, lvl)
        inside, x, y = _rows_of_level(s, start, h_l, w_l)
        box = tl.zeros((BLOCK_S, BLOCK_H), dtype=tl.int32)
        for dy in range(2):
            for dx in range(2):
                ok = inside & (x >= dx) & (y >= dy)
                box += tl.load(base + ((s - dy * w_l - dx) * H)[:, None], mask=ok[:, None] & hmask[None, :], other=0)
        tl.atomic_max(box_max_ptr + (b * L + lvl) * H + hs, tl.max(box, axis=0), mask=hmask, sem="relaxed")
        start += h_l * w_l


@triton.autotune(configs=autotune_configs(**CONVERT_CONFIG), key=["H", "D", "L"])
@triton.jit
def _ms_deform_attn_fixed_to_float_kernel(shapes_ptr, acc_ptr, box_max_ptr, a_sum_ptr, g_max_ptr, grad_value_ptr,
                                          S, H, D, L, BLOCK_HD: tl.constexpr, TILE: tl.constexpr):
    """grad_value [B, S, H*D] (its dtype) = acc / scale(b, level of the row, h); NaN where the
    bound of (b, h) is not finite."""
    BLOCK_S: tl.constexpr = (TILE + BLOCK_HD - 1) // BLOCK_HD  # powers of two: at least 1 row
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_HD)
    cmask = cols < H * D
    h = cols // D
    offs = (b * S + s.to(tl.int64))[:, None] * (H * D) + cols[None, :]
    start = 0
    for lvl in range(L):
        h_l, w_l = _level(shapes_ptr, lvl)
        inside, _, _ = _rows_of_level(s, start, h_l, w_l)
        mask = inside[:, None] & cmask[None, :]
        scale, finite = _value_scale(box_max_ptr, a_sum_ptr, g_max_ptr, b, lvl, h, L, H)  # (BLOCK_HD,)
        acc = tl.load(acc_ptr + offs, mask=mask, other=0).to(tl.float32)
        grad = tl.where(finite[None, :], acc / scale[None, :], NAN)
        tl.store(grad_value_ptr + offs, grad.to(grad_value_ptr.dtype.element_ty), mask=mask)
        start += h_l * w_l


@triton.jit
def _contribution(coef, g, scale, FIXED_POINT: tl.constexpr):
    """``coef[:, None] * g``: rounded to 32-bit fixed point (``* scale``) or float32."""
    value = coef[:, None] * g
    if FIXED_POINT:
        value = tl.floor(value * scale + 0.5).to(tl.int32)
    return value


@triton.jit
def _scatter_tap(acc_ptr, vbase, row, inside, d, dmask, row_stride, coef, g, scale, FIXED_POINT: tl.constexpr):
    """Adds ``coef * g`` [BLOCK_Q, BLOCK_D] to the value-gradient rows ``row``: rounded to 32-bit
    fixed point (``* scale``, integer atomics: the sum does not depend on the order), or without
    FIXED_POINT with float32 atomics (the official extension's non-deterministic way)."""
    ptrs = acc_ptr + vbase + (row.to(tl.int64) * row_stride)[:, None] + d[None, :]
    tl.atomic_add(ptrs, _contribution(coef, g, scale, FIXED_POINT), mask=inside[:, None] & dmask[None, :],
                  sem="relaxed")


@triton.jit
def _sort_unique(x, T: tl.constexpr):
    """``x`` [T] (distinct integers, T a power of two) in ascending order: a bitonic network whose
    compare-and-exchange partner (position ``t ^ 2^j``) is read with ``tl.gather``. (``tl.sort``
    does the same, but the CPU interpreter runs its reductions element by element: ~30 s to sort
    4096 keys.)"""
    t = tl.arange(0, T)
    for k in tl.static_range(1, 17):
        if (1 << k) <= T:
            for jj in tl.static_range(k):
                j = k - 1 - jj
                y = tl.gather(x, t ^ (1 << j), 0)
                # ascending inside blocks of 2^k with bit k of t clear; the lower position keeps the min
                keep_min = ((t & (1 << j)) == 0) == ((t & (1 << k)) == 0)
                x = tl.where(keep_min, tl.minimum(x, y), tl.maximum(x, y))
    return x


@triton.jit
def _runs(row, T: tl.constexpr):
    """For ``row`` [T] sorted: the first position of each position's run of equal rows and
    whether the position is its run's last."""
    t = tl.arange(0, T)
    # pointer doubling from "my run starts here or one before"
    first = tl.where((t == 0) | (row != tl.gather(row, tl.maximum(t - 1, 0), 0)), t, t - 1)
    for k in tl.static_range(16):
        if (1 << k) < T:
            first = tl.gather(first, first, 0)
    return first, (t == T - 1) | (row != tl.gather(row, tl.minimum(t + 1, T - 1), 0))


@triton.jit
def _run_sums(c, first, T: tl.constexpr, BLOCK_D: tl.constexpr):
    """For contributions ``c`` [T, BLOCK_D] of positions whose runs start at ``first`` [T]
    (``_runs``): at each position the sum of its run up to it (at a run's last, the run's sum), as
    a difference of inclusive prefix sums: exact for int32 (two's-complement wrap-around cancels,
    the run's own sum fits); float32 contributions are summed in float64, so the difference keeps
    float32 accuracy."""
    if c.dtype != tl.int32:
        c = c.to(tl.float64)
    prefix = tl.cumsum(c, 0)
    return prefix - tl.gather(prefix - c, tl.broadcast_to(first[:, None], (T, BLOCK_D)), 0)


@triton.jit
def _scatter_level_merged(loc_ptr, attn_ptr, grad_out_ptr, acc_ptr, b, h, q0, S, Lq, H, D, L, P, lvl, h_l, w_l,
                          start, vbase, row_stride, scale, FIXED_POINT: tl.constexpr,
                          WIDE_KEYS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr):
    """The value-gradient scatter of level ``lvl`` for the queries q0 .. q0 + BLOCK_Q - 1 of head h,
    with repeated rows merged first: the T = BLOCK_Q * BLOCK_P * 4 taps (query, point, tap; taps
    outside the map or past Lq / P get the row S and are dropped) are sorted by (value row, tap),
    each tap's contribution formed as ``_scatter_tap`` forms it (CHUNK_D channels at a time), the
    contributions of a row added up (``_runs``, ``_run_sums``) and the row's total added with ONE
    atomic. In fixed point
    every contribution is rounded before the integer sum, so the result is bit-identical to one
    atomic per tap. Sort keys ``row * T + tap`` are int32, or int64 where (S + 1) * T overflows
    (``WIDE_KEYS``)."""
    T: tl.constexpr = BLOCK_Q * BLOCK_P * 4
    t = tl.arange(0, T)
    pt = (t // 4) % BLOCK_P
    q = q0 + t // (4 * BLOCK_P)
    valid = (q < Lq) & (pt < P)
    x0, y0, fx, fy, a = _sample(loc_ptr, attn_ptr, ((b * Lq + q) * H + h) * (L * P) + lvl * P + pt, valid, h_l, w_l)
    dx = t % 2
    dy = (t // 2) % 2
    x = x0 + dx
    y = y0 + dy
    inside = valid & (x >= 0) & (x < w_l) & (y >= 0) & (y < h_l)
    coef = a * tl.where(dy == 1, fy, 1.0 - fy) * tl.where(dx == 1, fx, 1.0 - fx)
    row = tl.where(inside, start + y * w_l + x, S)
    if WIDE_KEYS:
        row = row.to(tl.int64)
    key = _sort_unique(row * T + t, T)
    tap = (key % T).to(tl.int32)
    row = key // T
    kept = row < S
    coef = tl.gather(coef, tap, 0)
    grad_rows = ((b * Lq + q0 + tap // (4 * BLOCK_P)) * H + h) * D
    first, last = _runs(row, T)
    last = last & kept
    for d0 in range(0, BLOCK_D, CHUNK_D):  # CHUNK_D channels at a time: fewer registers
        dc = d0 + tl.arange(0, CHUNK_D)
        dcmask = dc < D
        g = tl.load(grad_out_ptr + grad_rows[:, None] + dc[None, :], mask=kept[:, None] & dcmask[None, :],
                    other=0.0).to(tl.float32)
        total = _run_sums(_contribution(coef, g, scale, FIXED_POINT), first, T, CHUNK_D)
        tl.atomic_add(acc_ptr + vbase + (row.to(tl.int64) * row_stride)[:, None] + dc[None, :],
                      total.to(acc_ptr.dtype.element_ty), mask=last[:, None] & dcmask[None, :], sem="relaxed")


@triton.autotune(configs=autotune_configs(**BACKWARD_CONFIG), key=["LQ_BUCKET", "H", "L", "P", "BLOCK_D"],
                 reset_to_zero=["grad_value_acc_ptr"])
@triton.jit
def _ms_deform_attn_bwd_kernel(value_ptr, shapes_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                               box_max_ptr, a_sum_ptr, g_max_ptr, grad_value_acc_ptr, grad_loc_ptr, grad_attn_ptr,
                               S, Lq, H, D, L, P, LQ_BUCKET, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                               FIXED_POINT: tl.constexpr, WIDE_KEYS: tl.constexpr, TILE: tl.constexpr,
                               QBLOCKS: tl.constexpr, MERGE: tl.constexpr, MERGE_D: tl.constexpr = 2):
    BLOCK_Q: tl.constexpr = (TILE + BLOCK_D - 1) // BLOCK_D  # powers of two: at least 1 query
    CHUNK_D: tl.constexpr = MERGE_D if MERGE_D < BLOCK_D else BLOCK_D
    for sub in range(QBLOCKS):
        b, h, qmask, d, dmask, row_stride, vbase, qh = _program_block(S, Lq, H, D, BLOCK_D, BLOCK_Q, QBLOCKS, sub)
        g = tl.load(grad_out_ptr + (qh * D)[:, None] + d[None, :], mask=qmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        start = 0
        for lvl in range(L):
            h_l, w_l = _level(shapes_ptr, lvl)
            scale = 1.0
            if FIXED_POINT:
                scale, _ = _value_scale(box_max_ptr, a_sum_ptr, g_max_ptr, b, lvl, h, L, H)
            for pt in range(P):
                off = qh * (L * P) + lvl * P + pt
                x0, y0, fx, fy, a = _sample(loc_ptr, attn_ptr, off, qmask, h_l, w_l)
                r00, i00, r01, i01, r10, i10, r11, i11 = _tap_rows(x0, y0, h_l, w_l, start, qmask)
                # Per tap, only <g, v_tap> [BLOCK_Q] is kept (one [BLOCK_Q, D] tile live at a time):
                # d(out)/d(a) = sum_tap w_tap <g, v_tap>, and the fraction derivatives are
                # differences of the same dot products.
                s00 = tl.sum(g * _load_tap(value_ptr, vbase, r00, i00, d, dmask, row_stride), axis=1)
                s01 = tl.sum(g * _load_tap(value_ptr, vbase, r01, i01, d, dmask, row_stride), axis=1)
                s10 = tl.sum(g * _load_tap(value_ptr, vbase, r10, i10, d, dmask, row_stride), axis=1)
                s11 = tl.sum(g * _load_tap(value_ptr, vbase, r11, i11, d, dmask, row_stride), axis=1)
                gx = 1.0 - fx
                gy = 1.0 - fy
                tl.store(grad_attn_ptr + off, gy * (gx * s00 + fx * s01) + fy * (gx * s10 + fx * s11), mask=qmask)
                # x_pix = x * w_l - 0.5: d/dx = w_l * d/dx_pix.
                dfx = gy * (s01 - s00) + fy * (s11 - s10)
                dfy = gx * (s10 - s00) + fx * (s11 - s01)
                tl.store(grad_loc_ptr + 2 * off, a * w_l.to(tl.float32) * dfx, mask=qmask)
                tl.store(grad_loc_ptr + 2 * off + 1, a * h_l.to(tl.float32) * dfy, mask=qmask)
                if not MERGE:
                    _scatter_tap(grad_value_acc_ptr, vbase, r00, i00, d, dmask, row_stride,
                                 a * gy * gx, g, scale, FIXED_POINT)
                    _scatter_tap(grad_value_acc_ptr, vbase, r01, i01, d, dmask, row_stride,
                                 a * gy * fx, g, scale, FIXED_POINT)
                    _scatter_tap(grad_value_acc_ptr, vbase, r10, i10, d, dmask, row_stride,
                                 a * fy * gx, g, scale, FIXED_POINT)
                    _scatter_tap(grad_value_acc_ptr, vbase, r11, i11, d, dmask, row_stride,
                                 a * fy * fx, g, scale, FIXED_POINT)
            if MERGE:
                _scatter_level_merged(loc_ptr, attn_ptr, grad_out_ptr, grad_value_acc_ptr, b, h,
                                      _first_query(H, BLOCK_Q, QBLOCKS, sub), S, Lq, H, D, L, P, lvl, h_l, w_l,
                                      start, vbase, row_stride, scale, FIXED_POINT, WIDE_KEYS, BLOCK_Q,
                                      BLOCK_P, BLOCK_D, CHUNK_D)
            start += h_l * w_l


# ---------------------------------------------------------------------------- operators
def _sizes(value, sampling_locations):
    b, s, nh, d = value.shape
    lq, nl, npt = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    return b, s, nh, d, lq, nl, npt


@triton_operator("ms_deform_attn_forward")
def ms_deform_attn_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
    """value [B,S,H,D], spatial_shapes int64 [L,2], sampling_locations [B,Lq,H,L,P,2],
    attention_weights [B,Lq,H,L,P] (all contiguous) -> [B,Lq,H*D] in value's dtype.
    ``deterministic`` only selects the backward (module docstring)."""
    b, s, nh, d, lq, nl, npt = _sizes(value, sampling_locations)
    out = value.new_empty(b, lq, nh * d)

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_Q"]) * nh, b)

    launch(_ms_deform_attn_fwd_kernel, grid, value, spatial_shapes, sampling_locations, attention_weights,
           out, s, lq, nh, d, nl, npt, triton.next_power_of_2(lq), BLOCK_D=triton.next_power_of_2(d))
    return out


def _rows_grid(b, s, row_elements=1):
    """Grid of a row-wise pass: BLOCK_S rows, or TILE elements of ``row_elements`` per row."""
    def grid(meta):
        rows = meta["BLOCK_S"] if "BLOCK_S" in meta else triton.cdiv(meta["TILE"], row_elements)
        return (triton.cdiv(s, rows), b)
    return grid


def value_gradient_bounds(grad_out, value, spatial_shapes, sampling_locations, attention_weights):
    """What the fixed-point scales are made of (module docstring): per (image, head) max|grad_out|
    and sum|a| (float32 [B, H]) and per (image, level, head) the largest 2x2 box sum of the mass
    (int32 [B, L, H], units of 1 / mass scale). No host sync."""
    b, s, nh, d, lq, nl, npt = _sizes(value, sampling_locations)
    g_max = torch.linalg.vector_norm(grad_out.view(b, lq, nh, d), float("inf"), dim=(1, 3), dtype=torch.float32)
    a_sum = torch.linalg.vector_norm(attention_weights, 1, dim=(1, 3, 4), dtype=torch.float32)
    mass = torch.zeros(b, s, nh, dtype=torch.int32, device=value.device)
    launch(_ms_deform_attn_mass_kernel, lambda meta: (triton.cdiv(lq, meta["BLOCK_Q"]) * nh, b), spatial_shapes,
           sampling_locations, attention_weights, a_sum, mass, s, lq, nh, nl, npt)
    box_max = torch.zeros(b, nl, nh, dtype=torch.int32, device=value.device)
    launch(_ms_deform_attn_box_max_kernel, _rows_grid(b, s), spatial_shapes, mass, box_max, s, nh, nl,
           BLOCK_H=triton.next_power_of_2(nh))
    return g_max, a_sum, box_max


def _launch_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights, deterministic: bool,
                     config: dict | None = None, wide_keys: bool | None = None):
    """``config``: one of ``BACKWARD_CONFIG["gpu"]`` to launch instead of the autotuned choice (tests
    run every GPU config through the interpreter); ``wide_keys``: int64 sort keys in the merged
    scatter even where int32 would do (tests; by default only where int32 could overflow)."""
    b, s, nh, d, lq, nl, npt = _sizes(value, sampling_locations)
    grad_out = grad_out.contiguous()
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    if deterministic:
        g_max, a_sum, box_max = value_gradient_bounds(grad_out, value, spatial_shapes, sampling_locations,
                                                      attention_weights)
        acc = torch.zeros(b, s, nh, d, dtype=torch.int32, device=value.device)
    else:
        acc = torch.zeros(b, s, nh, d, dtype=torch.float32, device=value.device)
        g_max = a_sum = box_max = acc  # not read
    block_d, block_p = triton.next_power_of_2(d), triton.next_power_of_2(npt)
    # the merged scatter's largest sort key: (S + 1) * T - 1, T = BLOCK_Q * BLOCK_P * 4 taps
    tiles = [config["TILE"]] if config else [c.kwargs["TILE"] for c in _ms_deform_attn_bwd_kernel.configs]
    block_q = triton.cdiv(max(tiles), block_d)
    wide_keys = wide_keys or (s + 1) * block_q * block_p * 4 > 2 ** 31 - 1

    def grid(meta):
        return (triton.cdiv(lq, triton.cdiv(meta["TILE"], block_d) * meta["QBLOCKS"]) * nh, b)

    # config: the kernel under the autotuner, with that config's meta-parameters
    kernel = _ms_deform_attn_bwd_kernel if config is None else _ms_deform_attn_bwd_kernel.fn
    launch(kernel, grid, value, spatial_shapes, sampling_locations, attention_weights,
           grad_out, box_max, a_sum, g_max, acc, grad_loc, grad_attn, s, lq, nh, d, nl, npt,
           triton.next_power_of_2(lq), BLOCK_D=block_d, BLOCK_P=block_p, FIXED_POINT=deterministic,
           WIDE_KEYS=wide_keys, **(config or {}))
    if not deterministic:
        return acc.to(value.dtype), grad_loc, grad_attn
    grad_value = torch.empty_like(value)
    block_hd = triton.next_power_of_2(nh * d)
    launch(_ms_deform_attn_fixed_to_float_kernel, _rows_grid(b, s, block_hd), spatial_shapes, acc, box_max, a_sum,
           g_max, grad_value, s, nh, d, nl, BLOCK_HD=block_hd)
    return grad_value, grad_loc, grad_attn


_RESTRICTED_TUNING: dict = {}  # the backward autotuner's choices under each restriction


@contextlib.contextmanager
def restrict_backward_configs(**fixed):
    """Within the block the backward autotuner chooses only among the GPU configs whose
    meta-parameters equal ``fixed`` (e.g. ``MERGE=False``: the per-tap scatter), with choices
    cached per restriction: benchmarks time such variants side by side."""
    tuner = _ms_deform_attn_bwd_kernel
    saved = tuner.configs, tuner.cache
    chosen = [c for c in saved[0] if all(c.kwargs.get(k) == v for k, v in fixed.items())]
    if not chosen:
        raise ValueError(f"no backward config has {fixed}")
    tuner.configs, tuner.cache = chosen, _RESTRICTED_TUNING.setdefault(tuple(sorted(fixed.items())), {})
    try:
        yield
    finally:
        tuner.configs, tuner.cache = saved


@triton_operator("ms_deform_attn_backward")
def ms_deform_attn_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                            sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                            deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (value, sampling_locations, attention_weights) for grad_out [B,Lq,H*D], each in its
    input's dtype; bit-identical across runs unless ``deterministic=False`` (module docstring)."""
    return _launch_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights, deterministic)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights, deterministic = inputs
    ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)
    ctx.deterministic = deterministic


def _backward(ctx, grad_out):
    value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward(grad_out, value, spatial_shapes, sampling_locations,
                                                              attention_weights, ctx.deterministic)
    return grad_value, None, grad_loc, grad_attn, None


ms_deform_attn_forward.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
    """The fused op (inputs checked and contiguous: ``fastmaskformer.ops.ms_deform_attn``)."""
    return ms_deform_attn_forward(value, spatial_shapes, sampling_locations, attention_weights, deterministic)
