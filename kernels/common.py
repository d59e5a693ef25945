"""Pieces shared by the kernels: autotune config lists, the precision-aware ``tl.dot``, the
bilinear resampling rule (taps and weights) every resampling kernel uses, the 4-tap rule of
sampling at points (``point_sample``), and the fixed-point scale of deterministic atomics.

Resampling follows PyTorch's ``upsample_bilinear2d`` with ``align_corners=False`` and no explicit
scale factor: ``src = max(scale * (dst + 0.5) - 0.5, 0)`` with ``scale = in / out`` rounded to
float32, ``i0 = floor(src)``, ``i1 = i0 + (i0 < in - 1)``, ``l1 = src - i0``, ``l0 = 1 - l1``.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from fastmaskformer.shared import ON_TRITON_OPERATOR, OP_NAMESPACE, interpreter_enabled

# input_precision of fp32 tl.dot: "ieee" (exact fp32 products, CUDA cores), "tf32" (tensor
# cores, operands rounded to a 10-bit mantissa), "tf32x3" (three tf32 products, ~fp32 accuracy).
# "bf16" (operands rounded to bf16, 7-bit mantissa, fp32 accumulation) is offered where only an
# argmax is returned.
PRECISIONS = ("ieee", "tf32", "tf32x3")


def check_precision(precision: str, op: str, allowed=PRECISIONS) -> str:
    if precision not in allowed:
        raise ValueError(f"{op}: precision must be one of {allowed}, got {precision!r}")
    return precision


# ---------------------------------------------------------------------------- operators
def triton_operator(name: str, schema: str | None = None):
    """Register the decorated function, which launches Triton kernels through :func:`launch`, as
    the operator ``fastmaskformer::<name>`` (no argument is mutated).

    On GPUs it is a ``torch.library.triton_op``: ``torch.compile`` and ``torch.export`` see the
    kernels through ``wrap_triton`` and the function itself is the fake (meta) implementation.
    Under the CPU interpreter ``wrap_triton`` cannot trace the interpreted kernels, so the
    operator is an opaque ``torch.library.custom_op`` whose fake implementation is the same
    function with every launch skipped (``launch`` does nothing on fake tensors).
    """
    def register(fn):
        qualname = f"{OP_NAMESPACE}::{name}"
        if interpreter_enabled():
            op = torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)
            op.register_fake(fn)
        else:
            op = torch.library.triton_op(qualname, fn, mutates_args=(), schema=schema)
        for hook in ON_TRITON_OPERATOR:
            hook(name)
        return op
    return register


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` inside a :func:`triton_operator`: through
    ``wrap_triton`` on GPUs (a graph node under tracing); under the interpreter directly, and not
    at all on fake tensors (tracing needs only the output shapes)."""
    if not interpreter_enabled():
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    elif not any(isinstance(a, torch.Tensor) and (is_fake(a) or a.device.type == "meta") for a in args):
        kernel[grid](*args, **kwargs)


def autotune_configs(gpu: list[dict], interpreter: dict) -> list[triton.Config]:
    """GPU configs (block sizes plus optional "num_warps" / "num_stages") or, under the
    interpreter, the one big-block config: multi-config autotune fails there and its cost grows
    with the number of programs, not with the block size."""
    configs = []
    for c in ([interpreter] if interpreter_enabled() else gpu):
        c = dict(c)
        warps, stages = c.pop("num_warps", 4), c.pop("num_stages", 1)
        configs.append(triton.Config(c, num_warps=warps, num_stages=stages))
    return configs


def resize_scale(src: int, dst: int) -> float:
    """PyTorch's bilinear scale ``in / out`` as a float32 value (passed exactly to kernels)."""
    return float(np.float32(src) / np.float32(dst))


def pixel_major_stride(num_queries: int) -> int:
    """Row stride of pixel-major low-res logits [h*w, Q]: Q rounded up to a multiple of 16 so that
    every row starts 64-byte aligned and Triton can vectorise the row gathers."""
    return -(-num_queries // 16) * 16


def upsample_scales(lowres, input_size=None) -> tuple[float, float]:
    """Scales of the upsampling from the stride-4 grid (h, w) to the model input size (default
    (4h, 4w): exactly 0.25)."""
    h, w = lowres
    H, W = (4 * h, 4 * w) if input_size is None else input_size
    return resize_scale(h, H), resize_scale(w, W)


# ---------------------------------------------------------------------------- jit helpers
@triton.jit
def _tf32(x):
    """x rounded toward zero to tf32 (10-bit mantissa), as the tensor cores read fp32 operands."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _bf16(x):
    """x rounded to the nearest bf16 (ties to even), kept in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. PRECISION applies to fp32 operands; 16-bit operands
    use their exact products. EMULATE (the CPU interpreter, whose tl.dot is exact fp32 and wrong
    on bf16): upcast, and model the tf32 roundings explicitly so CPU tests see GPU numerics."""
    if EMULATE:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if PRECISION == "tf32":
            return tl.dot(_tf32(a), _tf32(b), acc)
        elif PRECISION == "tf32x3":
            a_hi = _tf32(a)
            b_hi = _tf32(b)
            acc = tl.dot(_tf32(a - a_hi), b_hi, acc)
            acc = tl.dot(a_hi, _tf32(b - b_hi), acc)
            return tl.dot(a_hi, b_hi, acc)
        elif PRECISION == "bf16":
            return tl.dot(_bf16(a), _bf16(b), acc)
        else:
            return tl.dot(a, b, acc)
    elif PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def source_taps(dst, scale, in_size):
    """Bilinear (align_corners=False) taps of integer destination indices ``dst``:
    (i0, i1, l0, l1) with value = l0 * v[i0] + l1 * v[i1]. Indices past the output (masked
    lanes) are clamped inside [0, in_size) so their loads stay in bounds."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = tl.minimum(src - i0.to(tl.float32), 1.0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def bilinear_rows(x_ptr, ty, tx, scale_y, scale_x, h, w, ldq, q, mask):
    """Bilinear sample of pixel-major low-res values ``x_ptr`` [h*w, ldq] at destination pixels
    (ty, tx) [P] of a grid with ``scale = h / dst_h``: [P, Q] for queries q [Q]. Each tap is
    one contiguous row; a row stride ``ldq`` that is a multiple of 16 (pixel_major_stride)
    lets Triton vectorise the gathers."""
    y0, y1, ly0, ly1 = source_taps(ty, scale_y, h)
    x0, x1, lx0, lx1 = source_taps(tx, scale_x, w)
    cols = q[None, :]
    top = ly0[:, None] * (lx0[:, None] * tl.load(x_ptr + ((y0 * w + x0) * ldq)[:, None] + cols, mask=mask, other=0.0)
                          + lx1[:, None] * tl.load(x_ptr + ((y0 * w + x1) * ldq)[:, None] + cols, mask=mask, other=0.0))
    # Same nesting as PyTorch's kernel: rows outer, columns inner.
    return top + ly1[:, None] * (
        lx0[:, None] * tl.load(x_ptr + ((y1 * w + x0) * ldq)[:, None] + cols, mask=mask, other=0.0)
        + lx1[:, None] * tl.load(x_ptr + ((y1 * w + x1) * ldq)[:, None] + cols, mask=mask, other=0.0))


@triton.jit
def resampled(x_ptr, oy, ox, scale_y, scale_x, up_y, up_x, h, w, crop_h, crop_w, ldq, q, mask,
              RESIZE: tl.constexpr, SIGMOID_FIRST: tl.constexpr):
    """Official post-processing at output pixels (oy, ox) [P] -> [P, Q]: the low-res logits
    [h*w, ldq] upsampled to the model input (``up = h / H_in``), optionally passed through a
    sigmoid (SIGMOID_FIRST: before the resize, as semantic inference does), cropped to (crop_h,
    crop_w) and resized (``scale = crop / out``). Without RESIZE the output grid is the cropped
    grid (crop == out: the resize is the identity and is skipped, 4 gathers instead of 16)."""
    if RESIZE:
        ty0, ty1, wy0, wy1 = source_taps(oy, scale_y, crop_h)
        tx0, tx1, wx0, wx1 = source_taps(ox, scale_x, crop_w)
        v00 = bilinear_rows(x_ptr, ty0, tx0, up_y, up_x, h, w, ldq, q, mask)
        v01 = bilinear_rows(x_ptr, ty0, tx1, up_y, up_x, h, w, ldq, q, mask)
        if SIGMOID_FIRST:
            v00 = tl.sigmoid(v00)
            v01 = tl.sigmoid(v01)
        top = wy0[:, None] * (wx0[:, None] * v00 + wx1[:, None] * v01)
        v10 = bilinear_rows(x_ptr, ty1, tx0, up_y, up_x, h, w, ldq, q, mask)
        v11 = bilinear_rows(x_ptr, ty1, tx1, up_y, up_x, h, w, ldq, q, mask)
        if SIGMOID_FIRST:
            v10 = tl.sigmoid(v10)
            v11 = tl.sigmoid(v11)
        return top + wy1[:, None] * (wx0[:, None] * v10 + wx1[:, None] * v11)
    else:
        v = bilinear_rows(x_ptr, oy, ox, up_y, up_x, h, w, ldq, q, mask)
        if SIGMOID_FIRST:
            v = tl.sigmoid(v)
        return v


@triton.jit
def point_taps(pts_ptr, ps, p_ok, h, w):
    """detectron2's ``point_sample`` (``grid_sample``, align_corners=False, zeros outside) at the
    points ``ps`` [P] of ``pts_ptr`` ([*, 2] fp32, x then y in [0, 1]) on an h x w grid: the 4
    flat tap indices (clamped inside the grid) and weights (zero outside the grid and for masked
    points), in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1) of ``ops.point_loss.segment_taps``."""
    px = tl.load(pts_ptr + ps * 2, mask=p_ok, other=0.0)
    py = tl.load(pts_ptr + ps * 2 + 1, mask=p_ok, other=0.0)
    fx = px * w - 0.5
    fy = py * h - 0.5
    x0f = tl.floor(fx)
    y0f = tl.floor(fy)
    ax = fx - x0f
    ay = fy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    okx0 = (x0 >= 0) & (x0 < w)
    okx1 = (x1 >= 0) & (x1 < w)
    oky0 = (y0 >= 0) & (y0 < h)
    oky1 = (y1 >= 0) & (y1 < h)
    w00 = tl.where(oky0 & okx0 & p_ok, (1.0 - ax) * (1.0 - ay), 0.0)
    w01 = tl.where(oky0 & okx1 & p_ok, ax * (1.0 - ay), 0.0)
    w10 = tl.where(oky1 & okx0 & p_ok, (1.0 - ax) * ay, 0.0)
    w11 = tl.where(oky1 & okx1 & p_ok, ax * ay, 0.0)
    cx0 = tl.minimum(tl.maximum(x0, 0), w - 1)
    cx1 = tl.minimum(tl.maximum(x1, 0), w - 1)
    cy0 = tl.minimum(tl.maximum(y0, 0), h - 1)
    cy1 = tl.minimum(tl.maximum(y1, 0), h - 1)
    return cy0 * w + cx0, cy0 * w + cx1, cy1 * w + cx0, cy1 * w + cx1, w00, w01, w10, w11


# ---------------------------------------------------------------------------- deterministic atomics
# Fixed-point headroom: partial sums stay below 2^FIXED_POINT_BITS <= 2^61 < 2^63.
FIXED_POINT_BITS = 61


def fixed_point_scales(bound: torch.Tensor):
    """Scale of a 64-bit fixed-point accumulation whose every partial sum is at most ``bound``
    (0-d tensor) in absolute value: (scale, 1/scale) as float32 [1] tensors, powers of two
    (``2^61 / bound`` rounded down: no overflow, resolution ``2^-60 bound``), and whether the bound
    is finite. Contributions ``(v * scale).to(int64)`` added with integer atomics give the same
    sum in any order: bit-identical results run to run. Computed on the device (no host sync)."""
    finite = torch.isfinite(bound)
    exponent = FIXED_POINT_BITS - torch.floor(torch.log2(bound)) - 1  # bound < 2^(floor(log2)+1)
    exponent = torch.where(finite, exponent, 0.0).clamp(-120.0, 120.0)
    return torch.exp2(exponent).reshape(1), torch.exp2(-exponent).reshape(1), finite


# ---------------------------------------------------------------------------- launch sizing
_ASSUMED_MULTIPROCESSORS = [1]


def multiprocessor_count(device) -> int:
    """SMs of a CUDA ``device`` (grids are sized to fill them); elsewhere (interpreter, the
    ahead-of-time check) the count set by :func:`assume_multiprocessors`, 1 by default."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _ASSUMED_MULTIPROCESSORS[-1]


@contextlib.contextmanager
def assume_multiprocessors(count: int):
    """Size grids of non-CUDA launches for a GPU with ``count`` SMs (the AOT check records the
    launches an H100 would see)."""
    _ASSUMED_MULTIPROCESSORS.append(int(count))
    try:
        yield
    finally:
        _ASSUMED_MULTIPROCESSORS.pop()
