"""Mask2Former (Cheng et al., CVPR 2022): backbone -> deformable pixel decoder -> masked-attention
transformer decoder -> the same heads and the same lazy outputs as MaskFormer.

Everything but the two decoders is shared with MaskFormer (``SegmentationModel`` input handling,
backbones, ``MaskFormerOutput``, every op, loss, inference and engine path); the pixel decoder is
``MSDeformAttnPixelDecoder`` (``msdeformattn.py``), the transformer decoder
``MaskedAttentionDecoder`` (``masked_attention_decoder.py``).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .backbone import Backbone, build_backbone
from .masked_attention_decoder import MaskedAttentionDecoder
from .maskformer import MaskFormerOutput, SegmentationModel, build_pixel_decoder


class Mask2Former(SegmentationModel):
    """``forward(images)`` -> ``MaskFormerOutput`` with L = dec_layers predictions (official 10)."""

    panoptic_confident_pixels = True  # official Mask2Former panoptic_inference

    def __init__(self, backbone: Backbone, pixel_decoder, predictor: MaskedAttentionDecoder,
                 pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 pixel_std: Sequence[float] = (58.395, 57.12, 57.375), size_divisibility: int = 32):
        super().__init__(pixel_mean, pixel_std, size_divisibility)
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, images: Tensor) -> MaskFormerOutput:
        """images: float [B, 3, H, W], normalised and padded (``preprocess``)."""
        features = self.backbone(images)
        pixel_embed, multi_scale = self.pixel_decoder(features)  # [B,C,H/4,W/4], [1/32, 1/16, 1/8]
        class_logits, mask_embed = self.predictor(multi_scale, pixel_embed)
        return MaskFormerOutput(class_logits, mask_embed, pixel_embed)


def build_mask2former(cfg) -> Mask2Former:
    """From a ``ModelConfig`` (``meta_arch: mask2former``). The pixel decoder must be
    ``msdeformattn`` (the official one); ``dec_layers`` counts predictions (official 10)."""
    if getattr(cfg, "pixel_decoder", "fpn") != "msdeformattn":
        raise ValueError("meta_arch mask2former needs model.pixel_decoder=msdeformattn (its decoder attends to "
                         f"three feature levels), got {cfg.pixel_decoder!r}")
    backbone = build_backbone(cfg.backbone)
    predictor = MaskedAttentionDecoder(cfg.conv_dim, cfg.num_classes, cfg.num_queries, cfg.hidden_dim, cfg.mask_dim,
                                       cfg.nheads, cfg.dim_feedforward, cfg.dec_layers, cfg.dropout)
    return Mask2Former(backbone, build_pixel_decoder(cfg, backbone), predictor, cfg.pixel_mean, cfg.pixel_std,
                       cfg.size_divisibility)
