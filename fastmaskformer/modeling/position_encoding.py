"""Sine positional encoding of a feature map (DETR / MaskFormer, DESIGN 2).

MaskFormer never passes a padding mask, so every position is "valid": the cumulative sums of
DETR's masked formulation reduce to ``1..H`` and ``1..W`` and the encoding does not depend on
the image contents or on the batch, only on the feature-map size.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """``pos[b, :, y, x] = [sin/cos(y' / T^(2i/F)) ..., sin/cos(x' / T^(2i/F)) ...]``.

    num_pos_feats: F, channels per axis (the output has 2F channels: y first, then x).
    temperature: T. normalize: divide the 1-based coordinate by the axis length (+1e-6) and
    multiply by ``scale`` (2 pi), so the encoding spans the same range at any resolution.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _axis(self, length: int, device) -> Tensor:
        """Encoding of one axis: ``[length, F]``, interleaved sin (even) / cos (odd)."""
        coord = torch.arange(1, length + 1, dtype=torch.float32, device=device)
        if self.normalize:
            coord = coord / (coord[-1:] + 1e-6) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        angles = coord[:, None] / dim_t  # (length, F)
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, *, H, W] (only its size is used) -> pos: [B, 2F, H, W] in x's dtype."""
        b, _, h, w = x.shape
        pos_y = self._axis(h, x.device)[:, None, :].expand(h, w, self.num_pos_feats)  # (h, w, F)
        pos_x = self._axis(w, x.device)[None, :, :].expand(h, w, self.num_pos_feats)  # (h, w, F)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)  # (2F, h, w)
        return pos.to(x.dtype)[None].expand(b, -1, -1, -1)
