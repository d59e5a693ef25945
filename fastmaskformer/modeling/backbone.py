"""Backbone: a timm ``features_only`` model returning res2..res5 (strides 4..32) as NCHW.

Names (``BackboneConfig.name``) are our aliases or any timm ResNet/Swin name:

- ``resnet50`` / ``resnet101``: torchvision-style ResNet (stride in the 3x3 conv), as the
  official configs (``STRIDE_IN_1X1: False``). BatchNorm frozen by default (``FrozenBN``):
  statistics and affine parameters are buffers; every conv trains (``FREEZE_AT: 0``).
- ``resnet101c``: the official "R101c" (DeepLab ``R-103``): deep stem of three 3x3 convs
  (3->64->64->128, timm ``stem_type="deep", stem_width=64``, no avg-down) and multi-grid
  dilations (1, 2, 4) in the res5 blocks (``RES5_MULTI_GRID``) at output stride 32.
- ``swin_tiny|small|base|large``: the ImageNet Swin variants of the official configs
  (window 7 for T/S at 224, window 12 for B/L at 384), drop-path 0.3. timm returns NHWC; we add
  a LayerNorm on each output stage (the official ``D2SwinTransformer.norm{i}``) and permute.

Swin on arbitrary sizes: the official Swin pads each feature map to a multiple of the window
and shifts the *padded* map, never shrinking the window; timm shifts first and then pads, and
shrinks the window to the feature size. We build timm's Swin with ``always_partition=True``
(no shrinking) and ``strict_img_size=False`` (any size), and run its blocks through
``_PadThenShiftSwinBlock``. Like the official, the patch embedding zero-pads the input to a
multiple of the patch size (4) and patch merging pads odd maps, so any input size works (the
official COCO panoptic configs do not pad to 32).

Inputs need not be divisible by 32 (ResNet and Swin): res_k is ``ceil(H / 2^k)`` at every
stride, as in detectron2, and the pixel decoder upsamples to each lateral's size.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

from .pixel_decoder import FEATURE_NAMES

# alias -> (timm model name, extra create_model kwargs)
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet50": ("resnet50", {}),
    "resnet101": ("resnet101", {}),
    "resnet101c": ("resnet101", {"stem_type": "deep", "stem_width": 64}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {"drop_path_rate": 0.3}),
    "swin_small": ("swin_small_patch4_window7_224", {"drop_path_rate": 0.3}),
    "swin_base": ("swin_base_patch4_window12_384", {"drop_path_rate": 0.3}),
    "swin_large": ("swin_large_patch4_window12_384", {"drop_path_rate": 0.3}),
}
_RES5_MULTI_GRID = {"resnet101c": (1, 2, 4)}


class _PadThenShiftSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the official window attention order: zero-pad the (normed)
    map to a multiple of the window, cyclic-shift the padded map, mask the shifted windows
    on the padded size, attend, reverse, crop. Identical to timm when sizes divide."""

    def _attn(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        hp, wp = x.shape[1], x.shape[2]
        has_shift = any(self.shift_size)
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        mask = self.get_attn_mask(x) if has_shift else None  # (nW, wh*ww, wh*ww) for the padded size
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        windows = self.attn(windows, mask=mask).view(-1, wh, ww, c)
        x = window_reverse(windows, self.window_size, hp, wp)
        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


def resolve_backbone_name(name: str) -> tuple[str, dict[str, Any]]:
    """Alias -> (timm name, default kwargs); a timm name passes through."""
    if name in _ALIASES:
        timm_name, kwargs = _ALIASES[name]
        return timm_name, dict(kwargs)
    if name.startswith(("resnet", "swin")) and timm.is_model(name):
        return name, {}
    raise ValueError(f"unknown backbone {name!r}; use one of {sorted(_ALIASES)} or a timm resnet*/swin* name")


class Backbone(nn.Module):
    """timm feature extractor -> ``{"res2": [B,C2,H/4,W/4], ..., "res5": [B,C5,H/32,W/32]}``.

    ``channels``: dict name -> C. ``timm_kwargs`` override the alias defaults (used by the
    weight converters for non-standard depths and widths). ``pretrained`` downloads timm weights
    and is never on by default.
    """

    def __init__(self, name: str = "resnet50", pretrained: bool = False, freeze_bn: bool = True,
                 img_size: int = 512, **timm_kwargs):
        super().__init__()
        timm_name, kwargs = resolve_backbone_name(name)
        kwargs.update(timm_kwargs)
        self.is_swin = timm_name.startswith("swin")
        if pretrained and name in _RES5_MULTI_GRID:
            raise ValueError(f"{name}: timm has no ImageNet weights for this stem; load converted weights")
        if self.is_swin:
            kwargs.setdefault("img_size", img_size)
            kwargs.update(strict_img_size=False, always_partition=True)
            out_indices = (0, 1, 2, 3)
        else:
            out_indices = (1, 2, 3, 4)  # skip the stride-2 stem output
            # timm zero-initialises each block's last BN scale; frozen, that would keep every
            # residual branch dead forever when training from scratch (detectron2 inits it to 1)
            kwargs.setdefault("zero_init_last", False)
        body = timm.create_model(timm_name, pretrained=pretrained, features_only=True,
                                 out_indices=out_indices, **kwargs)
        reductions = body.feature_info.reduction()
        if list(reductions) != [4, 8, 16, 32]:
            raise ValueError(f"backbone {name!r} has strides {reductions}, expected [4, 8, 16, 32]")
        channels = body.feature_info.channels()
        self.channels = dict(zip(FEATURE_NAMES, channels))
        if self.is_swin:
            for module in body.modules():
                if isinstance(module, SwinTransformerBlock):
                    module.__class__ = _PadThenShiftSwinBlock
            body.patch_embed.dynamic_img_pad = True  # zero-pad to the patch size, as the official
            self.norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        else:
            self.norms = None
            for grid_dilation, block in zip(_RES5_MULTI_GRID.get(name, ()), body.layer4):
                block.conv2.dilation = (grid_dilation, grid_dilation)
                block.conv2.padding = (grid_dilation, grid_dilation)
            if freeze_bn:
                body = freeze_batch_norm_2d(body)
        self.body = body

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W], any H, W -> res2..res5 NCHW, res_k of size ceil(H / 2^k)."""
        feats = self.body(x)
        if self.is_swin:
            feats = [norm(f).permute(0, 3, 1, 2) for norm, f in zip(self.norms, feats)]  # NHWC -> NCHW
        return dict(zip(FEATURE_NAMES, feats))


def build_backbone(cfg) -> Backbone:
    """From a ``BackboneConfig``."""
    return Backbone(cfg.name, pretrained=cfg.pretrained, freeze_bn=cfg.freeze_bn, img_size=cfg.img_size,
                    **dict(getattr(cfg, "kwargs", None) or {}))
