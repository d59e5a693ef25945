"""Mask2Former's multi-scale deformable-attention pixel decoder (Cheng et al., CVPR 2022), issue 18.

    res5, res4, res3 --Conv1x1+GN (input proj)--> 3 levels of conv_dim channels (strides 32, 16, 8)
        --flatten, + sine PE + level embedding--> 6 deformable encoder layers (post-norm, each query
        attends to n_points points per head on every level around its reference point)
        --split back--> multi_scale_features [1/32, 1/16, 1/8]
    res2 --Conv1x1+GN (lateral) + bilinear-up(1/8 features) --Conv3x3+GN+ReLU--> 1/4 features
        --Conv1x1--> mask_features [B, mask_dim, H/4, W/4]

The official defaults (``MSDeformAttnPixelDecoder`` of facebookresearch/Mask2Former): conv_dim =
mask_dim = 256, GroupNorm(32), 6 encoder layers, 8 heads, 4 points, FFN 1024, dropout 0, common
stride 4. The deformable attention is our op ``fastmaskformer.ops.ms_deform_attn`` (Triton on
CUDA, in any float dtype; the official code casts the features to float32 because its CUDA
extension has no half path).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import ConvNorm, c2_xavier_fill
from .position_encoding import PositionEmbeddingSine

TRANSFORMER_FEATURES = ("res3", "res4", "res5")
FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): each query predicts, per head, level
    and point, an offset from its reference point (in units of that level's pixels) and a
    softmax weight over the level x point samples."""

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.impl = d_model, n_levels, n_heads, n_points, impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights, and biases that start head k's points on a
        ring in direction 2 pi k / n_heads at distances 1..n_points; uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True)[0]  # (heads, 2): onto the unit square
        grid = dirs.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor | None = None, padding_mask: Tensor | None = None,
                level_shapes: Sequence[tuple[int, int]] | None = None) -> Tensor:
        """The official module's call: query [B,Lq,C], reference_points [B,Lq,L,2] (normalised x,
        y) or [B,Lq,L,4] (boxes cx, cy, w, h: offsets scaled by half the box / n_points), value
        [B,S,C] (levels flattened), spatial_shapes int64 [L,2], level_start_index (unused: derived
        from spatial_shapes), padding_mask bool [B,S] (True = padding, its values are zeroed)
        -> [B,Lq,C]. ``level_shapes``: the same (h, w) as Python (or symbolic) ints; with them,
        ``torch.export`` on the CPU records the official ``grid_sample`` formulation (aten ops
        only: ONNX ``GridSample``, AOTInductor's own kernels) instead of our operator, so the
        exported program runs without fastmaskformer. On CUDA the Triton operator is exported
        (``triton_op``: AOTInductor compiles it into the package)."""
        b, lq, _ = query.shape
        s = value.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(b, s, heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(b, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, lq, heads, levels * points).softmax(-1)
        weights = weights.view(b, lq, heads, levels, points)
        ref = reference_points[:, :, None, :, None, :]
        if reference_points.shape[-1] == 2:  # offsets in pixels of each level: divide by (w, h)
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(offsets.dtype)
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        from ..ops import ms_deform_attn  # the op package loads triton lazily

        if level_shapes is not None and v.device.type != "cuda" and torch.compiler.is_exporting():
            from ..ops.ms_deform_attn import ms_deform_attn_grid_sample

            out = ms_deform_attn_grid_sample(v, level_shapes, locations, weights)
        else:
            out = ms_deform_attn(v, spatial_shapes, locations, weights, impl=self.impl)
        return self.output_proj(out)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + attn(x + pos, x)); x = norm2(x + FFN(x)), ReLU FFN."""

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.0, n_levels: int = 3,
                 n_heads: int = 8, n_points: int = 4, impl: str = "auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_shapes: Sequence[tuple[int, int]] | None = None) -> Tensor:
        """src, pos [B,S,C]; reference_points [B,S,L,2]; level_shapes as in ``MSDeformAttn`` -> [B,S,C]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_shapes=level_shapes)
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


def reference_points(shapes: Sequence[tuple[int, int]], batch: int, device, dtype) -> Tensor:
    """Pixel centres of every level, normalised: [B, S, L, 2] (x, y), the same point for every
    level (no padding masks: valid ratios are 1)."""
    points = []
    for h, w in shapes:
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        points.append(torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], -1).reshape(h * w, 2))
    ref = torch.cat(points, 0)  # (s, 2)
    return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)


class MSDeformAttnPixelDecoder(nn.Module):
    """in_channels: backbone channels of res2..res5. ``forward(features)`` returns
    ``(mask_features [B, mask_dim, H/4, W/4], multi_scale_features)``, the latter the encoder's
    outputs at strides 32, 16, 8 (each [B, conv_dim, h_l, w_l]), which Mask2Former's decoder
    attends to; ``multi_scale_features[0]`` (stride 32) is also what a MaskFormer decoder reads
    (the official ``transformer_encoder`` in-feature)."""

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256, enc_layers: int = 6,
                 nheads: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0, n_points: int = 4,
                 common_stride: int = 4, impl: str = "auto"):
        super().__init__()
        if len(in_channels) != len(FEATURE_STRIDES):
            raise ValueError(f"MSDeformAttnPixelDecoder expects channels of res2..res5, got {list(in_channels)}")
        channels = dict(zip(FEATURE_STRIDES, in_channels))
        self.n_levels = len(TRANSFORMER_FEATURES)
        # Input projections, lowest resolution first (res5, res4, res3), as the level order.
        self.input_proj = nn.ModuleList()
        for name in TRANSFORMER_FEATURES[::-1]:
            conv = nn.Conv2d(channels[name], conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(32, conv_dim)))
        self.pe = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(self.n_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.encoder = nn.ModuleList(
            MSDeformAttnEncoderLayer(conv_dim, dim_feedforward, dropout, self.n_levels, nheads, n_points, impl)
            for _ in range(enc_layers))
        for layer in self.encoder:  # official: xavier on every matrix, then MSDeformAttn's own init
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        # FPN levels below the transformer's finest stride (8) down to common_stride (4): res2.
        finest = FEATURE_STRIDES[TRANSFORMER_FEATURES[0]]
        self.fpn_features = [n for n, s in FEATURE_STRIDES.items() if common_stride <= s < finest][::-1]
        self.lateral_convs = nn.ModuleList(ConvNorm(channels[n], conv_dim, 1, relu=False) for n in self.fpn_features)
        self.output_convs = nn.ModuleList(ConvNorm(conv_dim, conv_dim, 3, relu=True) for _ in self.fpn_features)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """features: res2..res5 [B, C_i, H/s_i, W/s_i] -> (mask_features, [1/32, 1/16, 1/8 maps])."""
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, TRANSFORMER_FEATURES[::-1]):
            x = proj(features[name])
            srcs.append(x)
            pos.append(self.pe(x))
        b, c = srcs[0].shape[:2]
        shapes = [tuple(x.shape[-2:]) for x in srcs]
        # torch.tensor (not as_tensor) keeps symbolic sizes symbolic under torch.export
        spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=srcs[0].device)
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)  # (b, s, c)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1).to(p.dtype)
                              for i, p in enumerate(pos)], 1)
        ref = reference_points(shapes, b, src.device, src.dtype)
        for layer in self.encoder:
            src = layer(src, pos_flat, ref, spatial_shapes, shapes)
        multi_scale = [y.transpose(1, 2).reshape(b, c, h, w)
                       for y, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)]
        y = multi_scale[-1]
        for name, lateral, output in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            lat = lateral(features[name])
            y = output(lat + F.interpolate(y, size=lat.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_features(y), multi_scale
