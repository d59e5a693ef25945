"""Per-pixel classification baselines of the paper's ablations (DESIGN 2).

- ``PerPixelBaseline``: pixel decoder -> Conv1x1 to K classes at stride 4.
- ``PerPixelBaselinePlus``: adds MaskFormer's transformer decoder with Q = K queries and no
  class head; query k's "mask" (mask_embed x pixel_embed) is the logit map of class k. Every
  decoder layer is supervised (deep supervision).

Both train with per-pixel cross-entropy on logits bilinearly upsampled (align_corners False)
to the padded input size (x4 when the input is padded to /32), ignoring pixels outside every
segment (ignore label, void, padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..target import Target, pad_segment_maps, validate_targets
from .backbone import Backbone, build_backbone
from .maskformer import SegmentationModel, build_pixel_decoder, build_predictor, decoder_memory
from .pixel_decoder import PixelDecoder

_IGNORE = -1


@dataclass
class PerPixelOutput:
    """logits: [L, B, K, H/4, W/4] per-pixel class logits at stride 4; L = 1 for the plain
    baseline, the number of decoder layers for the "+" baseline (last = final)."""

    logits: Tensor

    def sem_seg_logits(self, out_size: tuple[int, int] | None = None) -> Tensor:
        """Final-layer logits upsampled (bilinear) to ``out_size``, the padded input size
        (default x4): [B, K, H, W]."""
        x = self.logits[-1]
        return _upsample(x, _input_size(x, out_size))

    def as_tuple(self) -> tuple[Tensor]:
        return (self.logits,)


def _input_size(logits: Tensor, size: tuple[int, int] | None) -> tuple[int, int]:
    """The padded input size: ``size``, or 4x the stride-4 logits [..., h, w]."""
    return tuple(size) if size is not None else (logits.shape[-2] * 4, logits.shape[-1] * 4)


def _upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, K, h, w] stride-4 logits -> float32 [B, K, H, W], bilinear to ``size``."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def semantic_label_map(targets: Sequence[Target], size: tuple[int, int]) -> Tensor:
    """Targets -> int64 [B, H, W] class ids, -1 where no segment (and in the padding)."""
    segment_maps = pad_segment_maps(targets, size).long()  # (b, H, W), -1 = none
    out = torch.full_like(segment_maps, _IGNORE)
    for i, t in enumerate(targets):
        seg = segment_maps[i]
        valid = seg >= 0
        out[i][valid] = t.labels.to(seg.device)[seg[valid]]
    return out


class _PerPixelModel(SegmentationModel):
    def losses(self, outputs: PerPixelOutput, targets: Sequence[Target],
               input_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Per-pixel CE (mean over labelled pixels) of each layer at ``input_size``, the padded
        input size (default: 4x the logits): ``loss_sem_seg`` for the final layer,
        ``loss_sem_seg_{i}`` for the earlier ones (official names)."""
        validate_targets(targets, self.num_classes)
        logits = outputs.logits
        size = _input_size(logits, input_size)
        labels = semantic_label_map([t.to(logits.device) for t in targets], size)
        losses = {}
        for layer in range(logits.shape[0]):
            loss = F.cross_entropy(_upsample(logits[layer], size), labels, ignore_index=_IGNORE)
            name = "loss_sem_seg" if layer == logits.shape[0] - 1 else f"loss_sem_seg_{layer}"
            losses[name] = loss
        return losses


class PerPixelBaseline(_PerPixelModel):
    """backbone -> PixelDecoder -> Conv1x1(mask_dim -> K)."""

    def __init__(self, backbone: Backbone, pixel_decoder: PixelDecoder, num_classes: int, mask_dim: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int = 32):
        super().__init__(pixel_mean, pixel_std, size_divisibility)
        self.num_classes = num_classes
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.classifier = nn.Conv2d(mask_dim, num_classes, kernel_size=1)
        # detectron2 "c2_msra_fill"
        nn.init.kaiming_normal_(self.classifier.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: Tensor) -> PerPixelOutput:
        """images: float [B, 3, H, W] normalised and padded -> logits [1, B, K, H/4, W/4] (ceil)."""
        pixel_embed, _ = self.pixel_decoder(self.backbone(images))
        return PerPixelOutput(self.classifier(pixel_embed)[None])


class PerPixelBaselinePlus(_PerPixelModel):
    """backbone -> PixelDecoder + TransformerPredictor with K queries and no class head."""

    def __init__(self, backbone: Backbone, pixel_decoder: PixelDecoder, predictor: nn.Module, num_classes: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int = 32):
        super().__init__(pixel_mean, pixel_std, size_divisibility)
        self.num_classes = num_classes
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, images: Tensor) -> PerPixelOutput:
        """images: float [B, 3, H, W] -> logits [L, B, K, H/4, W/4]."""
        features = self.backbone(images)
        pixel_embed, encoder_memory = self.pixel_decoder(features)
        _, mask_embed = self.predictor(decoder_memory(encoder_memory, features))
        return PerPixelOutput(torch.einsum("lbqc,bchw->lbqhw", mask_embed, pixel_embed))


def build_per_pixel_baseline(cfg) -> PerPixelBaseline:
    """From a ``ModelConfig`` (``meta_arch="per_pixel_baseline"``)."""
    backbone = build_backbone(cfg.backbone)
    return PerPixelBaseline(backbone, build_pixel_decoder(cfg, backbone), cfg.num_classes, cfg.mask_dim,
                            cfg.pixel_mean, cfg.pixel_std, cfg.size_divisibility)


def build_per_pixel_baseline_plus(cfg) -> PerPixelBaselinePlus:
    """From a ``ModelConfig``. The K class maps are the K queries' masks, so the predictor has
    K queries whatever ``num_queries`` says."""
    backbone = build_backbone(cfg.backbone)
    predictor = build_predictor(cfg, backbone, None, cfg.num_classes)
    return PerPixelBaselinePlus(backbone, build_pixel_decoder(cfg, backbone), predictor, cfg.num_classes,
                                cfg.pixel_mean, cfg.pixel_std, cfg.size_divisibility)
