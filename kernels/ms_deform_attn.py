"""Multi-scale deformable attention: fused Triton forward and deterministic backward (issue 18).

Semantics (``fastmaskformer.ops.ms_deform_attn``): for query q, head h, level l, point p,
bilinear ``grid_sample`` (align_corners=False, zero padding) of level l's value map at the
normalised location (x, y), weighted by the attention weight and summed over (l, p):
``out[b, q, h*D + d]``. Pixel coordinates ``x_pix = x * w_l - 0.5``; the taps are
``floor(x_pix) + {0, 1}`` with weights ``1 - fx, fx`` (fx the fractional part); a tap outside the
map reads zero.

Layouts (all contiguous): value [B, S, H, D] (levels flattened row-major, level l starting at row
``start_l``), sampling_locations [B, Lq, H, L, P, 2], attention_weights [B, Lq, H, L, P],
out / grad_out [B, Lq, H*D]. One program handles BLOCK_Q queries of one (image, head) and all D
channels of the head (a [BLOCK_Q, D] tile: each tap is one contiguous row of D values; programs
ordered head-fastest); it loops over levels and points. Loads of any float dtype are upcast: all
arithmetic is float32.

Backward (one kernel, same tiling):
- attention-weight and location gradients are reductions over D inside the program (gather
  formulation: no atomics);
- the value gradient is a scatter (each sample adds ``a * w_tap * grad_out`` to 4 value rows).
  The official CUDA extension does this with float atomics, so its gradients change from run to
  run. Here every contribution is converted to 64-bit fixed point and added with *integer*
  atomics, which are associative: the sum is the same whatever the order, so two runs give
  bit-identical gradients. The fixed-point scale is a power of two chosen on the device (no host
  sync) from ``bound = max|grad_out| * max_(b,h) sum_(q,l,p) |a|``, which bounds every partial sum
  of a value gradient, as ``2^61 / bound`` rounded down to a power of two: no overflow, and the
  resolution is at most ``2^-60 * bound`` - each contribution keeps its full float32 precision
  down to ~2^-47 of the largest |grad_out| (Lq = 5376 queries of softmax weights), and the sums
  are exact; the result is finer than float32 accumulation. A non-finite grad_out makes the value
  gradient NaN (everywhere), as an overflowing float sum would.
  Memory: the int64 accumulator is [B, S, H, D] (twice a float32 value gradient; 176 MB at the
  Mask2Former pixel-decoder size B=16, 512x512), freed when the float gradient is formed.
  The op offers no float-atomic mode (the same number of atomics at half the width, not
  reproducible); ``ms_deform_attn_backward_float_atomics`` exists for the benchmark to price
  determinism.
"""
import torch
import triton
import triton.language as tl

from .common import autotune_configs, fixed_point_scales, launch, triton_operator

# The backward kernel issues atomics, which an autotuner's benchmark runs would add up more than
# once: it has ONE config (Triton runs a lone config without benchmarking). TILE = BLOCK_Q * BLOCK_D
# elements per program on 4 warps: 2 per thread, ~80 registers, 38% occupancy on sm_90 / sm_80 for
# this gather/atomic-latency-bound loop (4 per thread need ~140 registers, 8 ~240); the whole query
# range per (image, head) under the interpreter.
BACKWARD_CONFIG = dict(gpu=[dict(TILE=256, num_warps=4)], interpreter=dict(TILE=8192))


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
def _program_block(S, Lq, H, D, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    """This program's head h, image b and BLOCK_Q queries: (query mask, d, d mask, value row
    stride, value base offset of (b, h), flat (b, q, h) indices [BLOCK_Q]). Heads vary
    fastest over the programs: the programs of one query block run together and share the
    location / weight sectors and the value rows ([H, D] contiguous per pixel) in L2."""
    pid = tl.program_id(0)
    h = pid % H
    b = tl.program_id(1).to(tl.int64)
    q = (pid // H) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    row_stride = H * D
    return q < Lq, d, d < D, row_stride, b * S * row_stride + h * D, (b * Lq + q) * H + h


@triton.autotune(
    configs=autotune_configs(
        gpu=[dict(BLOCK_Q=16, num_warps=2), dict(BLOCK_Q=16, num_warps=4), dict(BLOCK_Q=32, num_warps=4),
             dict(BLOCK_Q=64, num_warps=8)],
        interpreter=dict(BLOCK_Q=128)),
    # Lq rounded up to a power of two: variable image sizes (COCO) do not re-tune at every size.
    key=["LQ_BUCKET", "H", "L", "P", "BLOCK_D"],
)
@triton.jit
def _ms_deform_attn_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                               S, Lq, H, D, L, P, LQ_BUCKET, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    qmask, d, dmask, row_stride, vbase, qh = _program_block(S, Lq, H, D, BLOCK_D, BLOCK_Q)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for lvl in range(L):
        h_l = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w_l = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts_ptr + lvl).to(tl.int32)
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
    out = out_ptr + (qh * D)[:, None] + d[None, :]
    tl.store(out, acc, mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _scatter_tap(acc_ptr, vbase, row, inside, d, dmask, row_stride, coef, g, scale, FIXED_POINT: tl.constexpr):
    """Adds ``coef * g`` [BLOCK_Q, BLOCK_D] to the value-gradient rows ``row`` in 64-bit fixed
    point (integer atomics: the sum does not depend on the order). Without FIXED_POINT (the
    benchmark's comparison only): float32 atomics, the official extension's non-deterministic way."""
    ptrs = acc_ptr + vbase + (row.to(tl.int64) * row_stride)[:, None] + d[None, :]
    if FIXED_POINT:
        tl.atomic_add(ptrs, (coef[:, None] * g * scale).to(tl.int64), mask=inside[:, None] & dmask[None, :],
                      sem="relaxed")
    else:
        tl.atomic_add(ptrs, coef[:, None] * g, mask=inside[:, None] & dmask[None, :], sem="relaxed")


@triton.autotune(configs=autotune_configs(**BACKWARD_CONFIG), key=["BLOCK_D"])
@triton.jit
def _ms_deform_attn_bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                               scale_ptr, grad_value_acc_ptr, grad_loc_ptr, grad_attn_ptr,
                               S, Lq, H, D, L, P, BLOCK_D: tl.constexpr, FIXED_POINT: tl.constexpr,
                               TILE: tl.constexpr):
    BLOCK_Q: tl.constexpr = (TILE + BLOCK_D - 1) // BLOCK_D  # powers of two: at least 1 query
    qmask, d, dmask, row_stride, vbase, qh = _program_block(S, Lq, H, D, BLOCK_D, BLOCK_Q)
    g = tl.load(grad_out_ptr + (qh * D)[:, None] + d[None, :], mask=qmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    for lvl in range(L):
        h_l = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w_l = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        start = tl.load(starts_ptr + lvl).to(tl.int32)
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
            _scatter_tap(grad_value_acc_ptr, vbase, r00, i00, d, dmask, row_stride,
                         a * gy * gx, g, scale, FIXED_POINT)
            _scatter_tap(grad_value_acc_ptr, vbase, r01, i01, d, dmask, row_stride,
                         a * gy * fx, g, scale, FIXED_POINT)
            _scatter_tap(grad_value_acc_ptr, vbase, r10, i10, d, dmask, row_stride,
                         a * fy * gx, g, scale, FIXED_POINT)
            _scatter_tap(grad_value_acc_ptr, vbase, r11, i11, d, dmask, row_stride,
                         a * fy * fx, g, scale, FIXED_POINT)


# ---------------------------------------------------------------------------- operators
def _level_starts(spatial_shapes: torch.Tensor) -> torch.Tensor:
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cumsum(sizes, 0) - sizes


def _sizes(value, sampling_locations):
    b, s, nh, d = value.shape
    lq, nl, npt = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    return b, s, nh, d, lq, nl, npt


@triton_operator("ms_deform_attn_forward")
def ms_deform_attn_forward(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor) -> torch.Tensor:
    """value [B,S,H,D], spatial_shapes int64 [L,2], sampling_locations [B,Lq,H,L,P,2],
    attention_weights [B,Lq,H,L,P] (all contiguous) -> [B,Lq,H*D] in value's dtype."""
    b, s, nh, d, lq, nl, npt = _sizes(value, sampling_locations)
    out = value.new_empty(b, lq, nh * d)
    starts = _level_starts(spatial_shapes)

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_Q"]) * nh, b)

    launch(_ms_deform_attn_fwd_kernel, grid, value, spatial_shapes, starts, sampling_locations, attention_weights,
           out, s, lq, nh, d, nl, npt, triton.next_power_of_2(lq), BLOCK_D=triton.next_power_of_2(d))
    return out


def fixed_point_scale(grad_out: torch.Tensor, attention_weights: torch.Tensor):
    """(scale, 1/scale) as float32 [1] tensors, powers of two, and whether the bound is finite.
    Every partial sum of a value gradient is at most ``max|grad_out| * max_(b,h) sum |a|``."""
    g_max = grad_out.detach().abs().amax().float()
    a_mass = attention_weights.detach().abs().float().sum(dim=(1, 3, 4)).amax()
    return fixed_point_scales(g_max * a_mass)


def _launch_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights, fixed_point: bool):
    b, s, nh, d, lq, nl, npt = _sizes(value, sampling_locations)
    grad_out = grad_out.contiguous()
    acc = torch.zeros(b, s, nh, d, dtype=torch.int64 if fixed_point else torch.float32, device=value.device)
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    scale, inv_scale, finite = fixed_point_scale(grad_out, attention_weights)
    starts = _level_starts(spatial_shapes)
    block_d = triton.next_power_of_2(d)

    def grid(meta):
        return (triton.cdiv(lq, triton.cdiv(meta["TILE"], block_d)) * nh, b)

    launch(_ms_deform_attn_bwd_kernel, grid, value, spatial_shapes, starts, sampling_locations, attention_weights,
           grad_out, scale, acc, grad_loc, grad_attn, s, lq, nh, d, nl, npt, BLOCK_D=block_d, FIXED_POINT=fixed_point)
    if not fixed_point:
        return acc.to(value.dtype), grad_loc, grad_attn
    grad_value = acc.to(torch.float32) * inv_scale
    grad_value = torch.where(finite, grad_value, float("nan")).to(value.dtype)
    return grad_value, grad_loc, grad_attn


@triton_operator("ms_deform_attn_backward")
def ms_deform_attn_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                            sampling_locations: torch.Tensor, attention_weights: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (value, sampling_locations, attention_weights) for grad_out [B,Lq,H*D], each in its
    input's dtype; deterministic (module docstring)."""
    return _launch_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights, True)


def ms_deform_attn_backward_float_atomics(grad_out, value, spatial_shapes, sampling_locations, attention_weights):
    """The same gradients with the value gradient summed by float32 atomics, as the official
    extension does: NOT deterministic, and not exposed by the op. It exists so that the benchmark
    can measure what determinism costs (an opt-in would only be offered if measurably faster)."""
    return _launch_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights, False)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)


def _backward(ctx, grad_out):
    value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward(grad_out, value, spatial_shapes, sampling_locations,
                                                              attention_weights)
    return grad_value, None, grad_loc, grad_attn


ms_deform_attn_forward.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """The fused op (inputs checked and contiguous: ``fastmaskformer.ops.ms_deform_attn``)."""
    return ms_deform_attn_forward(value, spatial_shapes, sampling_locations, attention_weights)
