"""Models: MaskFormer and the per-pixel baselines, built from a ``ModelConfig``.

``build_model(cfg.model)`` picks the architecture from ``meta_arch``:
``maskformer`` | ``mask2former`` | ``eomt`` | ``per_pixel_baseline`` | ``per_pixel_baseline_plus``.

Shared by both architectures: backbones (``backbone.py``), input handling and outputs
(``maskformer.SegmentationModel``, ``MaskFormerOutput``). Pixel decoders: ``pixel_decoder.py``
(MaskFormer's FPN, optionally "+6 Enc") and ``msdeformattn.py`` (Mask2Former's deformable one).
Transformer decoders: ``transformer.py`` (DETR, MaskFormer) and ``masked_attention_decoder.py``
(multi-scale masked attention, Mask2Former). EoMT (``eomt.py``) has neither: queries join the
last blocks of a plain ViT (``vit.py``).
"""
from __future__ import annotations

from torch import nn

from .backbone import Backbone, build_backbone
from .baselines import (
    PerPixelBaseline,
    PerPixelBaselinePlus,
    PerPixelOutput,
    build_per_pixel_baseline,
    build_per_pixel_baseline_plus,
)
from .eomt import EoMT, build_eomt
from .mask2former import Mask2Former, build_mask2former
from .masked_attention_decoder import MaskedAttentionDecoder
from .maskformer import MaskFormer, MaskFormerOutput, TransformerPredictor, build_maskformer
from .pixel_decoder import PixelDecoder
from .position_encoding import PositionEmbeddingSine
from .transformer import TransformerDecoder, TransformerEncoder

_BUILDERS = {
    "maskformer": build_maskformer,
    "mask2former": build_mask2former,
    "eomt": build_eomt,
    "per_pixel_baseline": build_per_pixel_baseline,
    "per_pixel_baseline_plus": build_per_pixel_baseline_plus,
}


def build_model(model_cfg) -> nn.Module:
    """A freshly initialised model for ``model_cfg`` (a ``fastmaskformer.config.ModelConfig``)."""
    if model_cfg.meta_arch not in _BUILDERS:
        raise ValueError(f"unknown meta_arch {model_cfg.meta_arch!r}; choose one of {sorted(_BUILDERS)}")
    return _BUILDERS[model_cfg.meta_arch](model_cfg)


def num_classes_of(model: nn.Module) -> int | None:
    """K, the classes a model predicts (its class head has K + 1 outputs, the last "no object";
    a per-pixel baseline K channels); None when ``model`` is none of ours."""
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    head = getattr(getattr(model, "predictor", None), "class_embed", None)
    return head.out_features - 1 if isinstance(head, nn.Linear) else None


__all__ = [
    "Backbone", "EoMT", "Mask2Former", "MaskFormer", "MaskedAttentionDecoder", "MaskFormerOutput", "PerPixelBaseline",
    "PerPixelBaselinePlus", "PerPixelOutput",
    "PixelDecoder", "PositionEmbeddingSine", "TransformerDecoder", "TransformerEncoder", "TransformerPredictor",
    "build_backbone", "build_eomt", "build_mask2former", "build_model", "num_classes_of",
]
