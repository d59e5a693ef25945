"""Plain ViT encoders (timm) as token sequences walked block by block: EoMT's encoder.

Names (``BackboneConfig.name``) are our aliases or a timm DINOv2/DINOv3 ViT name:

- ``dinov2_{small,base,large,giant}``: DINOv2 with 4 registers (timm
  ``vit_*_patch14_reg4_dinov2``), re-patched to ``patch_size`` 16 as the official EoMT ``ViT``
  does (timm resamples the patch embedding and the position embedding when it loads weights);
  absolute position embedding at ``img_size / patch_size`` per side, resampled for other sizes.
- ``dinov3_{small,base,large,huge_plus}``: DINOv3 (timm ``vit_*_patch16_dinov3``, its ``Eva``
  class): RoPE on the patch tokens, 4 registers, no absolute position embedding.

Weights: ``pretrained=True`` lets timm load its weights (from the hub cache when offline); a
file: ``kwargs: {pretrained_cfg_overlay: {file: PATH}}`` with ``pretrained: true``. Never
downloaded unless asked.
"""
from __future__ import annotations

from functools import partial

import timm
import torch
from timm.layers import LayerNorm
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_ALIASES = {
    "dinov2_small": "vit_small_patch14_reg4_dinov2",
    "dinov2_base": "vit_base_patch14_reg4_dinov2",
    "dinov2_large": "vit_large_patch14_reg4_dinov2",
    "dinov2_giant": "vit_giant_patch14_reg4_dinov2",
    "dinov3_small": "vit_small_patch16_dinov3",
    "dinov3_base": "vit_base_patch16_dinov3",
    "dinov3_large": "vit_large_patch16_dinov3",
    "dinov3_huge_plus": "vit_huge_plus_patch16_dinov3",
}


def resolve_vit_name(name: str) -> str:
    """Alias -> timm name; a timm DINOv2/DINOv3 ViT name passes through."""
    if name in _ALIASES:
        return _ALIASES[name]
    if name.startswith("vit_") and ("dinov2" in name or "dinov3" in name) and timm.is_model(name):
        return name
    raise ValueError(f"unknown ViT {name!r}; use one of {sorted(_ALIASES)} or a timm vit_*dinov2/dinov3 name")


class ViTEncoder(nn.Module):
    """A timm ViT seen as ``embed`` (patches + prefix tokens) and ``block(i, ...)`` (one block
    with an optional attention mask), so an architecture can insert tokens between blocks.

    ``embed_dim``: C. ``num_prefix_tokens``: class + register tokens in front of the patches.
    ``timm_kwargs`` override the timm model's arguments (depth, embed_dim, ... for converted or
    test models); ``norm_eps`` sets every LayerNorm's epsilon (timm: 1e-6 DINOv2, 1e-5 DINOv3).
    ``activation_checkpointing``: recompute each block in the backward pass (non-reentrant
    ``torch.utils.checkpoint``; the trainer's ``solver.activation_checkpointing``).
    """

    def __init__(self, name: str = "dinov2_large", img_size: int = 640, patch_size: int = 16,
                 pretrained: bool = False, norm_eps: float | None = None, **timm_kwargs):
        super().__init__()
        if norm_eps is not None:
            timm_kwargs["norm_layer"] = partial(LayerNorm, eps=float(norm_eps))
        self.vit = timm.create_model(resolve_vit_name(name), pretrained=pretrained, img_size=img_size,
                                     patch_size=patch_size, num_classes=0, dynamic_img_size=True, **timm_kwargs)
        self.patch_size = patch_size
        self.img_size = int(img_size)
        self.embed_dim = self.vit.embed_dim
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.uses_rope = getattr(self.vit, "rope", None) is not None
        self.activation_checkpointing = False

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def norm(self) -> nn.Module:
        """The ViT's final LayerNorm."""
        return self.vit.norm

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        """images [B, 3, H, W] (H, W multiples of the patch size) -> (tokens [B, P + h*w, C] with
        the P prefix tokens first, the patch grid (h, w), the RoPE table [h*w, D] or None)."""
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(f"ViT input {tuple(images.shape[-2:])} must be a multiple of the patch size "
                             f"{self.patch_size} (pad it: model.size_divisibility)")
        x = self.vit.patch_embed(images)  # (b, h, w, c): dynamic_img_size keeps the grid
        grid = (x.shape[1], x.shape[2])
        rope = None
        if self.uses_rope:
            x, rope = self.vit._pos_embed(x)
        else:
            x = self.vit._pos_embed(x)
        return self.vit.norm_pre(x), grid, rope

    def prepend_to_blocks(self, num_tokens: int, first_block: int) -> None:
        """Declare ``num_tokens`` extra tokens in front of the sequence from ``first_block`` on:
        RoPE attention rotates only the trailing patch tokens, so they join its prefix count."""
        if self.uses_rope:
            for block in self.blocks[first_block:]:
                block.attn.num_prefix_tokens = self.num_prefix_tokens + num_tokens

    def block(self, index: int, x: Tensor, attn_mask: Tensor | None, rope: Tensor | None) -> Tensor:
        """Block ``index`` on x [B, N, C]; attn_mask: bool [B, 1, N, N] (True = may attend) or None."""
        block = self.blocks[index]
        kwargs = {"attn_mask": attn_mask, **({"rope": rope} if self.uses_rope else {})}
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **kwargs)
        return block(x, **kwargs)
