"""MaskFormer (paper Fig. 2): backbone -> pixel decoder -> transformer decoder -> heads.

The model returns the lazy representation of the mask logits (DESIGN 1.1): per-layer class
logits and mask embeddings plus one per-pixel embedding map. ``logits[l, b, q, y, x] =
<mask_embed[l, b, q], pixel_embed[b, :, y, x]>`` is formed by each consumer inside its own
kernel; ``MaskFormerOutput.pred_masks()`` materialises the final layer for users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.loader import padded_size
from .backbone import Backbone, build_backbone
from .pixel_decoder import PixelDecoder, c2_xavier_fill
from .position_encoding import PositionEmbeddingSine
from .transformer import TransformerDecoder


@dataclass
class MaskFormerOutput:
    """class_logits: [L, B, Q, K+1] (last class = "no object"), every prediction (decoder layer),
    last = final. mask_embed: [L, B, Q, C]. pixel_embed: [B, C, h, w] shared by every prediction
    (MaskFormer, Mask2Former), or [L, B, C, h, w] when each prediction has its own pixel
    features (EoMT: prediction l's logits are ``<mask_embed[l], pixel_embed[l]>``); (h, w) =
    (ceil(H/4), ceil(W/4)) for the padded input size H, W (exactly H/4, W/4 when the input is
    padded to /32; not when size_divisibility is 0: then give the ops the real input size).
    Every op taking pixel_embed accepts both forms; inference reads the final prediction."""

    class_logits: Tensor
    mask_embed: Tensor
    pixel_embed: Tensor

    def pred_masks(self, layer: int = -1) -> Tensor:
        """Mask logits of one prediction: [B, Q, h, w] (float32)."""
        from ..ops import mask_logits  # the op package imports triton lazily; keep model import light

        pixel_embed = self.pixel_embed[layer] if self.pixel_embed.dim() == 5 else self.pixel_embed
        return mask_logits(self.mask_embed[layer], pixel_embed)

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        """(class_logits, mask_embed, pixel_embed), for code that needs plain tensors."""
        return self.class_logits, self.mask_embed, self.pixel_embed


class MLP(nn.Module):
    """Linear layers with ReLU between them (not after the last): the mask embedding head."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TransformerPredictor(nn.Module):
    """Memory feature -> per-layer query embeddings -> class logits and mask embeddings.

    in_channels: channels of the memory feature (res5, or the pixel decoder's encoder output).
    A Conv1x1 projects it to ``hidden_dim`` only when the widths differ (official: with the
    "+6 Enc" pixel decoder the 256-channel encoder output is used as is).
    num_classes: K, or None for no class head (PerPixelBaseline+ reads the masks as classes).
    """

    def __init__(self, in_channels: int, num_classes: int | None, num_queries: int = 100,
                 hidden_dim: int = 256, mask_dim: int = 256, nheads: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, dec_layers: int = 6, pre_norm: bool = False):
        super().__init__()
        self.pe = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        if in_channels != hidden_dim:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.decoder = TransformerDecoder(dec_layers, hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1) if num_classes is not None else None
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """x: [B, C_in, h, w] -> class_logits [L, B, Q, K+1] (or None), mask_embed [L, B, Q, C]."""
        src = self.input_proj(x)
        pos = self.pe(src).flatten(2).transpose(1, 2)  # (b, hw, d)
        memory = src.flatten(2).transpose(1, 2)  # (b, hw, d)
        query_pos = self.query_embed.weight[None].expand(x.shape[0], -1, -1)  # (b, q, d)
        hs = self.decoder(memory, pos, query_pos)  # (l, b, q, d)
        class_logits = self.class_embed(hs) if self.class_embed is not None else None
        return class_logits, self.mask_embed(hs)


class SegmentationModel(nn.Module):
    """Shared input handling: normalisation constants and ``preprocess``.

    ``panoptic_confident_pixels``: the architecture's official panoptic segment rule. False
    (MaskFormer): a segment is every pixel its query wins; True (Mask2Former, EoMT): only the won
    pixels where the query's mask probability is >= 0.5, the rest void
    (``ops.panoptic_inference(confident_pixels=)``)."""

    panoptic_confident_pixels = False

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)
        if size_divisibility < 0:
            raise ValueError(f"model.size_divisibility must be >= 0 (0: no padding to a multiple), got {size_divisibility}")
        self.size_divisibility = size_divisibility

    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """images: list of uint8 (or float 0-255) [3, H_i, W_i] ->
        (float32 [B, 3, Hp, Wp] normalised, zero-padded bottom/right to the largest image rounded
        up to ``size_divisibility`` (0: not rounded, as the official COCO panoptic models),
        image_sizes [(H_i, W_i)]). Padding comes after normalisation, so it reads as the mean.
        ``batch.shape[-2:]`` is the input size the inference ops and the loss need."""
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} must be [3, H, W], got shape {tuple(img.shape)}")
        sizes = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        batch = self.pixel_mean.new_zeros(len(images), 3, *padded_size(sizes, self.size_divisibility))
        for i, img in enumerate(images):
            h, w = sizes[i]
            img = img.to(self.pixel_mean.device, non_blocking=True).float()
            batch[i, :, :h, :w] = (img - self.pixel_mean) / self.pixel_std
        return batch, sizes


class MaskFormer(SegmentationModel):
    """backbone -> PixelDecoder -> TransformerPredictor. See ``build_model`` for the wiring."""

    def __init__(self, backbone: Backbone, pixel_decoder: PixelDecoder, predictor: TransformerPredictor,
                 pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 pixel_std: Sequence[float] = (58.395, 57.12, 57.375), size_divisibility: int = 32):
        super().__init__(pixel_mean, pixel_std, size_divisibility)
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, images: Tensor) -> MaskFormerOutput:
        """images: float [B, 3, H, W], normalised and padded (``preprocess``); any H, W."""
        features = self.backbone(images)
        pixel_embed, encoder_memory = self.pixel_decoder(features)
        class_logits, mask_embed = self.predictor(decoder_memory(encoder_memory, features))
        return MaskFormerOutput(class_logits, mask_embed, pixel_embed)


def decoder_memory(encoder_memory, features) -> Tensor:
    """What the transformer decoder attends to: the pixel decoder's encoder output (the FPN's
    "+6 Enc" res5 encoder; the deformable decoder's stride-32 level, the official
    ``transformer_encoder`` in-feature) or else res5."""
    if isinstance(encoder_memory, (list, tuple)):
        return encoder_memory[0]
    return encoder_memory if encoder_memory is not None else features["res5"]


def build_pixel_decoder(cfg, backbone: Backbone) -> nn.Module:
    """From a ``ModelConfig`` and the backbone's channels: ``pixel_decoder`` "fpn" (MaskFormer's
    FPN, optionally with ``enc_layers``) or "msdeformattn" (Mask2Former's deformable-attention
    decoder; ``pixel_decoder_kwargs`` override its official defaults)."""
    channels = list(backbone.channels.values())
    kind = getattr(cfg, "pixel_decoder", "fpn")
    if kind == "msdeformattn":
        from .msdeformattn import MSDeformAttnPixelDecoder

        return MSDeformAttnPixelDecoder(channels, cfg.conv_dim, cfg.mask_dim, **getattr(cfg, "pixel_decoder_kwargs", {}))
    if kind != "fpn":
        raise ValueError(f"unknown pixel_decoder {kind!r}; choose 'fpn' or 'msdeformattn'")
    return PixelDecoder(channels, cfg.conv_dim, cfg.mask_dim, cfg.enc_layers, cfg.nheads, cfg.dim_feedforward,
                        cfg.dropout, cfg.pre_norm)


def build_predictor(cfg, backbone: Backbone, num_classes: int | None, num_queries: int) -> TransformerPredictor:
    """The decoder reads res5, or the pixel decoder's encoder output when ``enc_layers > 0``."""
    encoded = cfg.enc_layers > 0 or getattr(cfg, "pixel_decoder", "fpn") == "msdeformattn"
    in_channels = cfg.conv_dim if encoded else backbone.channels["res5"]
    return TransformerPredictor(in_channels, num_classes, num_queries, cfg.hidden_dim, cfg.mask_dim, cfg.nheads,
                                cfg.dim_feedforward, cfg.dropout, cfg.dec_layers, cfg.pre_norm)


def build_maskformer(cfg) -> MaskFormer:
    """From a ``ModelConfig``."""
    backbone = build_backbone(cfg.backbone)
    return MaskFormer(backbone, build_pixel_decoder(cfg, backbone),
                      build_predictor(cfg, backbone, cfg.num_classes, cfg.num_queries),
                      cfg.pixel_mean, cfg.pixel_std, cfg.size_divisibility)
