"""Mask logits / probabilities from the lazy representation, with fused resampling (DESIGN 1.1).

- ``_lowres_logits_kernel``: ``X[b, p, q] = <mask_embed[b, q, :], pixel_embed[b, :, p]>`` over the
  flattened low-res pixels p, one ``tl.dot`` tile [BLOCK_P, BLOCK_Q] per program, looping over C
  (any width: ViT features have C = 384..1536). All predictions of ``[L,B,Q,C]`` embeddings go in
  one launch, each program reading its (layer, image) of the pixel embedding (layer stride 0
  for features shared by the predictions).
  The output strides are arguments, so the same kernel writes the user-facing ``[B,Q,h,w]`` and
  the pixel-major ``[B,h*w,Q]`` layout the resampling kernels gather from (a pixel's Q logits
  are contiguous, so each bilinear tap is one coalesced row read).
- ``_resample_kernel``: bilinear resampling of X to the output size, either directly
  (``F.interpolate(size=out_size)``) or as the official post-processing does (upsample to the
  model input size, crop the padding to the image size, resize to the output size), optionally
  followed by a sigmoid. Memory: the output only.

The resampling rule is ``common.source_taps`` (PyTorch's, exactly). The logits are exact fp32
products by default (``precision="ieee"``): users read them as values, not through an argmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmaskformer.shared import interpreter_enabled

from .common import (autotune_configs, check_precision, dot, launch, pixel_major_stride, resampled, resize_scale,
                     triton_operator, upsample_scales)


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 3},
             {"BLOCK_P": 128, "BLOCK_Q": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 3},
             {"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_C": 32, "num_warps": 8, "num_stages": 3}],
        interpreter={"BLOCK_P": 1024, "BLOCK_Q": 128, "BLOCK_C": 256}),
    key=["nq", "nc", "PRECISION"],
)
@triton.jit
def _lowres_logits_kernel(e_ptr, pix_ptr, out_ptr, nq, nc, npix, batch,
                          stride_el, stride_eb, stride_eq, stride_ec, stride_pl, stride_pb, stride_pc, stride_pp,
                          stride_ob, stride_op, stride_oq, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, p, q] (strided) = sum_c pix[l, b, c, p] e[l, b, q, c] for n = l * batch + b (a
    layer stride of 0: features shared by the predictions); grid (pixel tiles, query tiles, N)."""
    pid_p, pid_q, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    layer, b = n // batch, n % batch
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pmask, qmask = p < npix, q < nq
    e_base = e_ptr + layer * stride_el + b * stride_eb
    pix_base = pix_ptr + layer * stride_pl + b * stride_pb
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for c0 in range(0, nc, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < nc
        a = tl.load(pix_base + c[None, :] * stride_pc + p[:, None] * stride_pp,
                    mask=pmask[:, None] & cmask[None, :], other=0.0)  # [P, C]
        e = tl.load(e_base + q[None, :] * stride_eq + c[:, None] * stride_ec,
                    mask=qmask[None, :] & cmask[:, None], other=0.0)  # [C, Q]
        if a.dtype != e.dtype:  # tl.dot needs one operand type
            a = a.to(tl.float32)
            e = e.to(tl.float32)
        acc = dot(a, e, acc, PRECISION, EMULATE)
    tl.store(out_ptr + n * stride_ob + p[:, None] * stride_op + q[None, :] * stride_oq, acc,
             mask=pmask[:, None] & qmask[None, :])


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_P": 128, "BLOCK_Q": 16, "num_warps": 4},
             {"BLOCK_P": 64, "BLOCK_Q": 32, "num_warps": 4},
             {"BLOCK_P": 128, "BLOCK_Q": 32, "num_warps": 8}],
        interpreter={"BLOCK_P": 4096, "BLOCK_Q": 128}),
    key=["nq", "RESIZE"],
)
@triton.jit
def _resample_kernel(x_ptr, out_ptr, nq, ldq, h, w, crop_h, crop_w, out_h, out_w, scale_y, scale_x,
                     up_y, up_x, stride_xb, stride_ob, RESIZE: tl.constexpr, SIGMOID: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[b, q, oy, ox] ([B, nq, out_h, out_w] contiguous per image) from x [B, h*w, ldq]:
    x upsampled with ``up = h / H_in``, cropped to (crop_h, crop_w) and, with RESIZE, resized
    with ``scale = crop / out``; then, with SIGMOID, the sigmoid. A direct resize is
    ``up = h / out`` without RESIZE. Grid (output pixel tiles, query tiles, B)."""
    pid_p, pid_q, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    npix = out_h * out_w
    mask = (p < npix)[:, None] & (q < nq)[None, :]
    oy, ox = p // out_w, p % out_w
    v = resampled(x_ptr + b * stride_xb, oy, ox, scale_y, scale_x, up_y, up_x, h, w, crop_h, crop_w,
                  ldq, q, mask, RESIZE, False)
    if SIGMOID:
        v = tl.sigmoid(v)
    out = out_ptr + b * stride_ob + q[None, :].to(tl.int64) * npix + p[:, None]
    tl.store(out, v.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers
def lowres_logits(mask_embed: torch.Tensor, pixel_embed: torch.Tensor, pixel_major: bool = True,
                  precision: str = "ieee", out: torch.Tensor | None = None) -> torch.Tensor:
    """mask_embed [B,Q,C] or [L,B,Q,C], pixel_embed [B,C,h,w] (shared) or [L,B,C,h,w] (per
    prediction), any float dtype, any strides -> float32 over the N = (L*)B predictions x images
    ``[N, h*w, Q]`` (pixel_major, what the resampling kernels gather: a view of
    ``[N, h*w, pixel_major_stride(Q)]`` storage, or of ``out`` [N, h*w, >= Q] when given) or
    ``[N, Q, h, w]``. One launch for all predictions; shared features get a layer stride of 0
    (nothing is expanded or copied)."""
    check_precision(precision, "lowres_logits")
    embed = mask_embed if mask_embed.dim() == 4 else mask_embed[None]  # [L, B, Q, C]
    L, B, Q, C = embed.shape
    h, w = pixel_embed.shape[-2:]
    pix = pixel_embed.reshape(*pixel_embed.shape[:-2], h * w)  # a view unless the spatial dims are strided
    stride_pl = pix.stride(0) if pix.dim() == 4 else 0
    n = L * B
    if pixel_major:
        if out is None:
            out = torch.empty(n, h * w, pixel_major_stride(Q), device=mask_embed.device, dtype=torch.float32)
        out = out[..., :Q]
        so = (out.stride(0), out.stride(1), out.stride(2))
    else:
        out = torch.empty(n, Q, h, w, device=mask_embed.device, dtype=torch.float32)
        so = (out.stride(0), 1, out.stride(1))
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(Q, meta["BLOCK_Q"]), n)

    launch(_lowres_logits_kernel, grid, embed, pix, out, Q, C, h * w, B, *embed.stride(), stride_pl,
           *pix.stride()[-3:], *so, PRECISION=precision, EMULATE=interpreter_enabled())
    return out


def _resample(x: torch.Tensor, lowres: tuple[int, int], out: torch.Tensor, crop=None,
              sigmoid: bool = False, input_size=None) -> torch.Tensor:
    """Launch ``_resample_kernel`` from pixel-major logits x [B, h*w, Q] into out [B,Q,H,W]:
    a direct resize, or with ``crop`` the official composition (upsample to ``input_size``,
    default (4h, 4w), crop, resize)."""
    B, _, Q = x.shape
    h, w = lowres
    H, W = out.shape[-2:]
    if out.numel() == 0:
        return out
    if crop is None:  # a direct resize is the upsampling step alone, to (H, W)
        crop, input_size = (H, W), (H, W)
    crop_h, crop_w = crop

    def grid(meta):
        return (triton.cdiv(H * W, meta["BLOCK_P"]), triton.cdiv(Q, meta["BLOCK_Q"]), B)

    launch(_resample_kernel, grid, x, out, Q, x.stride(1), h, w, crop_h, crop_w, H, W, resize_scale(crop_h, H),
           resize_scale(crop_w, W), *upsample_scales(lowres, input_size), x.stride(0), out.stride(0),
           RESIZE=(crop_h, crop_w) != (H, W), SIGMOID=sigmoid)
    return out


@triton_operator("resampled_masks")
def resampled_masks(mask_embed: torch.Tensor, pixel_embed: torch.Tensor, image_size: list[int],
                    output_size: list[int], input_size: list[int], sigmoid: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """mask_embed [B,Q,C] or [L,B,Q,C], pixel_embed [B,C,h,w] or [L,B,C,h,w] -> [(L,)B,Q,H,W] in
    ``out_dtype``: the low-res logits upsampled to ``input_size``, cropped to ``image_size`` and
    resized to ``output_size`` (the official post-processing; all three equal: one direct bilinear
    resize), then with ``sigmoid`` the probabilities. Only the low-res logits and the output are
    allocated."""
    lead, Q = mask_embed.shape[:-2], mask_embed.shape[-2]
    h, w = pixel_embed.shape[-2:]
    sizes = (tuple(image_size), tuple(output_size), tuple(input_size))
    if not sigmoid and out_dtype == torch.float32 and sizes == ((h, w),) * 3:
        return lowres_logits(mask_embed, pixel_embed, pixel_major=False).view(*lead, Q, h, w)
    x = lowres_logits(mask_embed, pixel_embed)  # [N, h*w, Q]
    out = torch.empty(*lead, Q, *output_size, device=x.device, dtype=out_dtype)
    _resample(x, (h, w), out.view(-1, Q, *output_size), crop=sizes[0], sigmoid=sigmoid, input_size=sizes[2])
    return out
