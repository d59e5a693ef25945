"""Mask logits from the lazy representation (DESIGN 1.1), and the resampling operator behind
``mask_logits``, ``mask_probs`` and the instance masks.

``logits[l, b, q, y, x] = <mask_embed[l, b, q, :], pixel_embed[l, b, :, y, x]>`` with per-prediction
features ``pixel_embed [L,B,C,h,w]`` (EoMT), or ``pixel_embed[b, :, y, x]`` with features shared
by every prediction ``[B,C,h,w]`` (MaskFormer, Mask2Former); one prediction is ``mask_embed
[B,Q,C]`` beside ``[B,C,h,w]``. Optionally bilinearly upsampled (align_corners=False) to
``out_size``, or resampled as the official post-processing does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_embeddings
from ._dispatch import load_kernel, resolve_impl
from ._library import reference_operator


class _UpcastProduct(torch.autograd.Function):
    """``einsum("bmc,bchw->bmhw")`` in fp32 of low-precision operands that saves the operands in
    their own dtype for the backward (which upcasts them again) instead of fp32 copies. Written
    with ``setup_context`` (and a generated vmap rule) so that ``torch.func`` transforms and
    ``opcheck`` run through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(embed: Tensor, pixels: Tensor) -> Tensor:
        return torch.einsum("bmc,bchw->bmhw", embed.float(), pixels.float())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        embed, pixels = ctx.saved_tensors
        grad = grad.float()
        grad_embed = grad_pixels = None
        if ctx.needs_input_grad[0]:
            grad_embed = torch.einsum("bmhw,bchw->bmc", grad, pixels.float()).to(embed.dtype)
        if ctx.needs_input_grad[1]:
            grad_pixels = torch.einsum("bmhw,bmc->bchw", grad, embed.float()).to(pixels.dtype)
        return grad_embed, grad_pixels


def embed_product(embed: Tensor, pixels: Tensor) -> Tensor:
    """Logit maps fp32 [B, M, h, w] of embed [B, M, C] and pixels [B, C, h, w], in fp32 from
    operands of any float dtype (the losses' references). For bf16 / fp16 operands autograd keeps
    the operands, not their fp32 copies (a per-layer fp32 copy of the pixel features per layer
    was 2.1 GB at EoMT-L 640); the values and gradients are those of the einsum of the upcasts."""
    if embed.dtype == torch.float32 and pixels.dtype == torch.float32:
        return torch.einsum("bmc,bchw->bmhw", embed, pixels)
    return _UpcastProduct.apply(embed, pixels)


def mask_logits_reference(mask_embed: Tensor, pixel_embed: Tensor, out_size=None) -> Tensor:
    """mask_embed [*,B,Q,C], pixel_embed [B,C,h,w] (shared) or [*,B,C,h,w] (per prediction) ->
    [*,B,Q,h,w] (or [*,B,Q,*out_size]), fp32."""
    logits = torch.einsum("...qc,...chw->...qhw", mask_embed.float(), pixel_embed.float())
    if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
        lead = logits.shape[:-2]
        logits = F.interpolate(logits.flatten(0, -4), size=tuple(out_size), mode="bilinear", align_corners=False)
        logits = logits.view(*lead, *logits.shape[-2:])
    return logits


@reference_operator("resampled_masks_reference", differentiable=("mask_embed", "pixel_embed"),
                    triton_twin="resampled_masks")
def resampled_masks_reference(mask_embed: Tensor, pixel_embed: Tensor, image_size: list[int], output_size: list[int],
                              input_size: list[int], sigmoid: bool, out_dtype: torch.dtype) -> Tensor:
    """mask_embed [B,Q,C] or [L,B,Q,C], pixel_embed [B,C,h,w] or [L,B,C,h,w] -> [(L,)B,Q,H,W]:
    the logits upsampled to ``input_size``, cropped to ``image_size``, resized to ``output_size``
    (all three equal: one direct resize), with ``sigmoid`` the probabilities, in ``out_dtype``."""
    logits = mask_logits_reference(mask_embed, pixel_embed, input_size)
    logits = logits[..., : image_size[0], : image_size[1]]
    if tuple(logits.shape[-2:]) != tuple(output_size):
        lead = logits.shape[:-2]
        logits = F.interpolate(logits.flatten(0, -4), size=tuple(output_size), mode="bilinear", align_corners=False)
        logits = logits.view(*lead, *logits.shape[-2:])
    return (logits.sigmoid() if sigmoid else logits).to(out_dtype)


def resampled_masks(mask_embed: Tensor, pixel_embed: Tensor, image_size, output_size, input_size, sigmoid: bool,
                    out_dtype: torch.dtype, impl: str) -> Tensor:
    """The operator behind mask_logits, mask_probs and the instance masks (arguments checked)."""
    args = (mask_embed, pixel_embed, [int(v) for v in image_size], [int(v) for v in output_size],
            [int(v) for v in input_size], bool(sigmoid), out_dtype)
    if resolve_impl(impl, mask_embed, pixel_embed, op="mask_probs") == "triton":
        load_kernel("mask_probs", "mask_probs")
        return torch.ops.fastmaskformer.resampled_masks(*args)
    return torch.ops.fastmaskformer.resampled_masks_reference(*args)


def mask_logits(mask_embed: Tensor, pixel_embed: Tensor, out_size=None, impl: str = "auto") -> Tensor:
    """Mask logits ``[B,Q,h,w]``, or bilinearly upsampled to ``out_size`` ``[B,Q,H,W]``; float32.

    mask_embed [B,Q,C] with pixel_embed [B,C,h,w]; or every prediction at once: mask_embed
    [L,B,Q,C] with pixel_embed [B,C,h,w] (shared) or [L,B,C,h,w] (prediction l reads
    pixel_embed[l]) -> ``[L,B,Q,h,w]``. For one prediction l of per-prediction features pass
    ``(mask_embed[l], pixel_embed[l])`` (``MaskFormerOutput.pred_masks`` does).
    """
    check_embeddings(mask_embed, pixel_embed)
    size = list(pixel_embed.shape[-2:] if out_size is None else out_size)
    return resampled_masks(mask_embed, pixel_embed, size, size, size, False, torch.float32, impl)
