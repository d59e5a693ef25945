"""Mask logits / probabilities from the lazy representation, with fused resampling (DESIGN 1.1).

Two kernels and the shared resampling helpers the inference kernels (``semantic.py``,
``panoptic.py``) build on:

- ``_lowres_logits_kernel``: ``X[b, p, q] = <mask_embed[b, q, :], pixel_embed[b, :, p]>`` over the
  flattened low-res pixels p, one ``tl.dot`` tile [BLOCK_P, BLOCK_Q] per program, looping over C.
  The output strides are arguments, so the same kernel writes the user-facing ``[B,Q,h,w]`` and
  the pixel-major ``[B,h*w,Q]`` layout the resampling kernels gather from (a pixel's Q logits
  are contiguous, so each bilinear tap is one coalesced row read).
- ``_resample_kernel``: bilinear resampling of X to the output size, either directly
  (``F.interpolate(size=out_size)``) or composed as the official post-processing does (upsample
  to the padded input (4h, 4w), crop the padding to the image size, resize to the output size),
  optionally followed by a sigmoid. Memory: the output only.

Resampling follows PyTorch's ``upsample_bilinear2d`` with ``align_corners=False`` and no
explicit scale factor: ``src = max(scale * (dst + 0.5) - 0.5, 0)`` with ``scale = in / out``
rounded to float32, ``i0 = floor(src)``, ``i1 = i0 + (i0 < in - 1)``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

def interpreting() -> bool:
    """True when kernels run through the Triton interpreter (CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(gpu: list[dict], interpreter: dict) -> list[triton.Config]:
    """GPU configs ({block sizes..., "num_warps"}) or, under the interpreter, the one big-block
    config: multi-config autotune fails there and its cost grows with the number of programs."""
    chosen = [interpreter] if interpreting() else gpu
    configs = []
    for c in chosen:
        c = dict(c)
        warps = c.pop("num_warps", 4)
        configs.append(triton.Config(c, num_warps=warps))
    return configs


def resize_scale(src: int, dst: int) -> float:
    """PyTorch's bilinear scale ``in / out`` as a float32 value (passed exactly to kernels)."""
    return float(np.float32(src) / np.float32(dst))


# ---------------------------------------------------------------------------- jit helpers
@triton.jit
def source_taps(dst, scale, in_size):
    """Bilinear (align_corners=False) taps of integer destination indices ``dst`` [P]:
    (i0, i1, l0, l1) with value = l0 * v[i0] + l1 * v[i1]."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0, so truncation is floor
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = src - i0.to(tl.float32)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def bilinear_logits(x_ptr, ty, tx, scale_y, scale_x, h, w, nq, q, mask):
    """Bilinear sample of the pixel-major low-res logits ``x_ptr`` [h*w, nq] at destination
    pixels (ty, tx) [P] of a grid with ``scale = h / dst_h``: returns [P, Q] for queries q [Q]."""
    y0, y1, ly0, ly1 = source_taps(ty, scale_y, h)
    x0, x1, lx0, lx1 = source_taps(tx, scale_x, w)
    cols = q[None, :]
    v00 = tl.load(x_ptr + ((y0 * w + x0) * nq)[:, None] + cols, mask=mask, other=0.0)
    v01 = tl.load(x_ptr + ((y0 * w + x1) * nq)[:, None] + cols, mask=mask, other=0.0)
    v10 = tl.load(x_ptr + ((y1 * w + x0) * nq)[:, None] + cols, mask=mask, other=0.0)
    v11 = tl.load(x_ptr + ((y1 * w + x1) * nq)[:, None] + cols, mask=mask, other=0.0)
    # Same nesting as PyTorch's kernel: rows outer, columns inner.
    return (ly0[:, None] * (lx0[:, None] * v00 + lx1[:, None] * v01)
            + ly1[:, None] * (lx0[:, None] * v10 + lx1[:, None] * v11))


@triton.jit
def composed_logits(x_ptr, oy, ox, scale_y, scale_x, h, w, crop_h, crop_w, nq, q, mask):
    """Official post-processing of logits at output pixels (oy, ox) [P]: upsample the low-res
    logits [h*w, nq] to (4h, 4w), crop to (crop_h, crop_w), resize with ``scale = crop / out``.
    Both steps are linear, so each output value is 4 resize taps of 4 upsampling taps each."""
    ty0, ty1, wy0, wy1 = source_taps(oy, scale_y, crop_h)
    tx0, tx1, wx0, wx1 = source_taps(ox, scale_x, crop_w)
    # Upsampling from the stride-4 grid to the padded input: scale = h / (4h) = 0.25 exactly.
    v00 = bilinear_logits(x_ptr, ty0, tx0, 0.25, 0.25, h, w, nq, q, mask)
    v01 = bilinear_logits(x_ptr, ty0, tx1, 0.25, 0.25, h, w, nq, q, mask)
    v10 = bilinear_logits(x_ptr, ty1, tx0, 0.25, 0.25, h, w, nq, q, mask)
    v11 = bilinear_logits(x_ptr, ty1, tx1, 0.25, 0.25, h, w, nq, q, mask)
    return (wy0[:, None] * (wx0[:, None] * v00 + wx1[:, None] * v01)
            + wy1[:, None] * (wx0[:, None] * v10 + wx1[:, None] * v11))


# ---------------------------------------------------------------------------- kernels
@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_C": 32, "num_warps": 4},
             {"BLOCK_P": 128, "BLOCK_Q": 64, "BLOCK_C": 32, "num_warps": 4},
             {"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_C": 32, "num_warps": 8}],
        interpreter={"BLOCK_P": 1024, "BLOCK_Q": 128, "BLOCK_C": 256}),
    key=["nq", "nc"],
)
@triton.jit
def _lowres_logits_kernel(e_ptr, pix_ptr, out_ptr, nq, nc, npix,
                          stride_eb, stride_eq, stride_ec, stride_pb, stride_pc, stride_pp,
                          stride_ob, stride_op, stride_oq, PRECISION: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, p, q] (strided) = sum_c pix[b, c, p] e[b, q, c]; grid (pixel tiles, query tiles, B)."""
    pid_p, pid_q, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pmask, qmask = p < npix, q < nq
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for c0 in range(0, nc, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < nc
        # Upcast before the dot: the reference is fp32, and bf16 dots are wrong under the interpreter.
        a = tl.load(pix_ptr + b * stride_pb + c[None, :] * stride_pc + p[:, None] * stride_pp,
                    mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # [P, C]
        e = tl.load(e_ptr + b * stride_eb + q[None, :] * stride_eq + c[:, None] * stride_ec,
                    mask=qmask[None, :] & cmask[:, None], other=0.0).to(tl.float32)  # [C, Q]
        acc = tl.dot(a, e, acc, input_precision=PRECISION)
    tl.store(out_ptr + b * stride_ob + p[:, None] * stride_op + q[None, :] * stride_oq, acc,
             mask=pmask[:, None] & qmask[None, :])


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_P": 128, "BLOCK_Q": 16, "num_warps": 4},
             {"BLOCK_P": 256, "BLOCK_Q": 16, "num_warps": 4},
             {"BLOCK_P": 128, "BLOCK_Q": 32, "num_warps": 8}],
        interpreter={"BLOCK_P": 4096, "BLOCK_Q": 128}),
    key=["nq", "COMPOSED"],
)
@triton.jit
def _resample_kernel(x_ptr, out_ptr, nq, h, w, crop_h, crop_w, out_h, out_w, scale_y, scale_x,
                     stride_xb, stride_ob, COMPOSED: tl.constexpr, SIGMOID: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[b, q, oy, ox] ([B, nq, out_h, out_w] contiguous per image) from x [B, h*w, nq].

    COMPOSED: upsample to (4h, 4w), crop to (crop_h, crop_w), resize (scale = crop / out);
    else a direct bilinear resize (scale = h / out). SIGMOID applies the sigmoid after resampling.
    Grid (output pixel tiles, query tiles, B).
    """
    pid_p, pid_q, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    npix = out_h * out_w
    mask = (p < npix)[:, None] & (q < nq)[None, :]
    oy, ox = p // out_w, p % out_w
    x_ptr += b * stride_xb
    if COMPOSED:
        v = composed_logits(x_ptr, oy, ox, scale_y, scale_x, h, w, crop_h, crop_w, nq, q, mask)
    else:
        v = bilinear_logits(x_ptr, oy, ox, scale_y, scale_x, h, w, nq, q, mask)
    if SIGMOID:
        v = tl.sigmoid(v)
    out = out_ptr + b * stride_ob + q[None, :].to(tl.int64) * npix + p[:, None]
    tl.store(out, v.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers
def lowres_logits(mask_embed: torch.Tensor, pixel_embed: torch.Tensor, pixel_major: bool = True,
                  precision: str = "ieee") -> torch.Tensor:
    """mask_embed [B,Q,C], pixel_embed [B,C,h,w] (any float dtype, any strides) -> float32
    ``[B, h*w, Q]`` (pixel_major, what the resampling kernels gather) or ``[B, Q, h, w]``."""
    B, Q, C = mask_embed.shape
    h, w = pixel_embed.shape[-2:]
    pix = pixel_embed.reshape(B, C, h * w)  # a view unless the spatial dims are non-contiguous
    if pixel_major:
        out = torch.empty(B, h * w, Q, device=mask_embed.device, dtype=torch.float32)
        so = (out.stride(0), out.stride(1), out.stride(2))
    else:
        out = torch.empty(B, Q, h, w, device=mask_embed.device, dtype=torch.float32)
        so = (out.stride(0), 1, out.stride(1))
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(Q, meta["BLOCK_Q"]), B)

    _lowres_logits_kernel[grid](mask_embed, pix, out, Q, C, h * w, *mask_embed.stride(),
                                *pix.stride(), *so, PRECISION=precision)
    return out


def _resample(x: torch.Tensor, lowres: tuple[int, int], out: torch.Tensor, crop=None,
              sigmoid: bool = False) -> torch.Tensor:
    """Launch ``_resample_kernel`` from pixel-major logits x [B, h*w, Q] into out [B,Q,H,W]."""
    B, _, Q = x.shape
    h, w = lowres
    H, W = out.shape[-2:]
    if out.numel() == 0:
        return out
    if crop is None:
        crop_h, crop_w, scales = h, w, (resize_scale(h, H), resize_scale(w, W))
    else:
        crop_h, crop_w = crop
        scales = (resize_scale(crop_h, H), resize_scale(crop_w, W))

    def grid(meta):
        return (triton.cdiv(H * W, meta["BLOCK_P"]), triton.cdiv(Q, meta["BLOCK_Q"]), B)

    _resample_kernel[grid](x, out, Q, h, w, crop_h, crop_w, H, W, *scales, x.stride(0),
                           out.stride(0), COMPOSED=crop is not None, SIGMOID=sigmoid)
    return out


def mask_logits(mask_embed: torch.Tensor, pixel_embed: torch.Tensor, out_size=None) -> torch.Tensor:
    """mask_embed [B,Q,C], pixel_embed [B,C,h,w] -> float32 [B,Q,h,w], or bilinearly upsampled
    (align_corners=False) to ``out_size`` [B,Q,H,W]; the upsampling reads the low-res logits
    [B, h*w, Q] directly, so nothing but them and the output is allocated."""
    h, w = pixel_embed.shape[-2:]
    if out_size is None or tuple(out_size) == (h, w):
        return lowres_logits(mask_embed, pixel_embed, pixel_major=False)
    B, Q = mask_embed.shape[:2]
    x = lowres_logits(mask_embed, pixel_embed)  # [B, h*w, Q]
    out = torch.empty(B, Q, *out_size, device=x.device, dtype=torch.float32)
    return _resample(x, (h, w), out)


def resized_mask_logits(mask_embed: torch.Tensor, pixel_embed: torch.Tensor, image_size,
                        output_size) -> torch.Tensor:
    """One image: mask_embed [q,C], pixel_embed [C,h,w] -> float32 logits [q, H, W]: upsampled
    to the padded input (4h, 4w), cropped to ``image_size``, resized to ``output_size``."""
    h, w = pixel_embed.shape[-2:]
    x = lowres_logits(mask_embed[None], pixel_embed[None])
    out = torch.empty(1, mask_embed.shape[0], *output_size, device=x.device, dtype=torch.float32)
    return _resample(x, (h, w), out, crop=tuple(image_size))[0]


def mask_probs(mask_embed: torch.Tensor, pixel_embed: torch.Tensor, image_sizes=None,
               output_sizes=None, out_dtype: torch.dtype = torch.float32):
    """Sigmoid mask probabilities in ``out_dtype`` (float32 or bfloat16).

    Without sizes: ``[B,Q,h,w]`` at the stride-4 resolution. With ``image_sizes`` and/or
    ``output_sizes`` (one (h_i, w_i) / (H_i, W_i) per image; missing image sizes = the full
    padded input, missing output sizes = the image sizes): a list of ``[Q, H_i, W_i]``, the
    logits resampled as the official post-processing does, then the sigmoid.
    """
    B, Q = mask_embed.shape[:2]
    h, w = pixel_embed.shape[-2:]
    x = lowres_logits(mask_embed, pixel_embed)  # [B, h*w, Q]
    if image_sizes is None and output_sizes is None:
        out = torch.empty(B, Q, h, w, device=x.device, dtype=out_dtype)
        return _resample(x, (h, w), out, sigmoid=True)
    image_sizes = [(4 * h, 4 * w)] * B if image_sizes is None else image_sizes
    output_sizes = image_sizes if output_sizes is None else output_sizes
    results = []
    for b in range(B):
        out = torch.empty(1, Q, *output_sizes[b], device=x.device, dtype=out_dtype)
        results.append(_resample(x[b:b + 1], (h, w), out, crop=tuple(image_sizes[b]), sigmoid=True)[0])
    return results
