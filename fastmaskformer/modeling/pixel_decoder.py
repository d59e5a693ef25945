"""FPN pixel decoder (DESIGN 2), optionally with a transformer encoder on res5 ("+6 Enc").

    res5 --Conv3x3+GN+ReLU------------------------------------------> y (stride 32)
    res4 --Conv1x1+GN (lateral) + nearest-up(y) --Conv3x3+GN+ReLU----> y (stride 16)
    res3, res2 likewise                                              -> y (stride 4)
    y --Conv3x3 (with bias)--> pixel_embed [B, mask_dim, H/4, W/4]

With ``enc_layers > 0`` the res5 branch becomes Conv1x1 -> transformer encoder (sine PE) ->
Conv3x3+GN+ReLU, and the encoder output is also returned: it is the transformer decoder's
memory in the official "+6 Enc" configs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .position_encoding import PositionEmbeddingSine
from .transformer import TransformerEncoder

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Detectron2's "c2_xavier_fill": kaiming-uniform with a=1 (Caffe2 XavierFill), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ConvNorm(nn.Sequential):
    """Conv (no bias) + GroupNorm(32) [+ ReLU]: detectron2's ``Conv2d(norm=GN, activation)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        c2_xavier_fill(conv)
        layers = [conv, nn.GroupNorm(32, out_channels)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class PixelDecoder(nn.Module):
    """in_channels: backbone channels of res2..res5. Returns ``(pixel_embed, encoder_memory)``.

    conv_dim: FPN width (256). mask_dim: C of pixel_embed (256). enc_layers: transformer-encoder
    layers on res5 (0 = plain FPN); the encoder uses ``conv_dim`` as its width.
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256,
                 enc_layers: int = 0, nheads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = False):
        super().__init__()
        if len(in_channels) != len(FEATURE_NAMES):
            raise ValueError(f"PixelDecoder expects channels of {FEATURE_NAMES}, got {list(in_channels)}")
        c2, c3, c4, c5 = in_channels
        self.enc_layers = enc_layers
        if enc_layers > 0:
            self.input_proj = nn.Conv2d(c5, conv_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
            self.pe = PositionEmbeddingSine(conv_dim // 2, normalize=True)
            self.encoder = TransformerEncoder(enc_layers, conv_dim, nheads, dim_feedforward, dropout, pre_norm)
            self.res5_conv = ConvNorm(conv_dim, conv_dim, 3, relu=True)
        else:
            self.res5_conv = ConvNorm(c5, conv_dim, 3, relu=True)
        # lateral/output pairs for res4, res3, res2 (top-down order)
        self.lateral_convs = nn.ModuleList(ConvNorm(c, conv_dim, 1, relu=False) for c in (c4, c3, c2))
        self.output_convs = nn.ModuleList(ConvNorm(conv_dim, conv_dim, 3, relu=True) for _ in range(3))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        c2_xavier_fill(self.mask_features)

    def encode_res5(self, res5: Tensor) -> Tensor:
        """res5 [B, C5, h, w] -> encoder memory [B, conv_dim, h, w]."""
        x = self.input_proj(res5)
        b, c, h, w = x.shape
        pos = self.pe(x).flatten(2).transpose(1, 2)  # (b, hw, c)
        memory = self.encoder(x.flatten(2).transpose(1, 2), pos)  # (b, hw, c)
        return memory.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """features: res2..res5 [B, C_i, H/s_i, W/s_i] ->
        pixel_embed [B, mask_dim, H/4, W/4], encoder memory [B, conv_dim, H/32, W/32] or None."""
        memory = None
        if self.enc_layers > 0:
            memory = self.encode_res5(features["res5"])
            y = self.res5_conv(memory)
        else:
            y = self.res5_conv(features["res5"])
        for name, lateral, output in zip(("res4", "res3", "res2"), self.lateral_convs, self.output_convs):
            lat = lateral(features[name])
            y = output(lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
        return self.mask_features(y), memory
