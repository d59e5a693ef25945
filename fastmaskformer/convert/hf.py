"""Hugging Face transformers MaskFormer -> fastmaskformer ``MaskFormer``.

``from_hf(hf_model)`` converts an in-memory ``MaskFormerForInstanceSegmentation``;
``load_hf_pretrained(dir)`` reads a saved model directory (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``, optional ``preprocessor_config.json``) offline
and without importing transformers; ``convert_hf_directory(dir, out)`` writes our checkpoint
``{"model": state_dict, "config": Config.to_dict()}``.

Supported backbones: HF ``ResNetBackbone`` (bottleneck blocks, stride in the 3x3 conv: mapped
onto timm's ResNet, BatchNorm becomes frozen with HF's running statistics) and
``MaskFormerSwinBackbone`` (the released checkpoints: mapped onto timm's Swin; q/k/v are
concatenated into timm's ``qkv``; HF's per-stage ``hidden_states_norms`` are our per-stage
LayerNorms). Parameter names of transformers 5.x (``o_proj``, ``mlp.fc1``) and 4.x
(``out_proj``, ``fc1``) are both accepted.

HF differences (DESIGN 3) - behaviour of the HF port that we do NOT copy:

- auxiliary loss is off by default, and with it on HF feeds the *normalised* state to the next
  decoder layer and returns 6 auxiliary predictions that include the zero decoder input;
  ours always returns every layer (``[L, ...]``) and the next layer gets the raw state;
- attention-probability dropout is 0 in HF (0.1 officially and here);
- BatchNorm in the HF ResNet trains (frozen here, official);
- the HF loss divides ``num_masks`` by the world size twice; labels are padded with 255.

With HF's auxiliary loss off and eval-mode BatchNorm, the converted model gives the same
``class_queries_logits`` (= our ``class_logits[-1]``) and ``masks_queries_logits`` (= our
``pred_masks()``) and the same final-layer loss.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..config import Config, ModelConfig
from ..modeling import build_model
from ._common import fitting_dataset, write_checkpoint
from .hf_common import (
    HF_MEAN, HF_STD, backbone_config_from_hf, canonical_key, finish_state, place, resnet_key, swin_key,
)
from .hf_eomt import eomt_config_from_hf, eomt_state_from_hf
from .hf_eomt_dinov3 import eomt_dinov3_config_from_hf, eomt_dinov3_state_from_hf
from .hf_mask2former import mask2former_config_from_hf, mask2former_state_from_hf

_MODEL_TYPES = ("maskformer", "mask2former", "eomt", "eomt_dinov3")

# ----------------------------------------------------------------------------- configuration
def model_config_from_hf(hf_config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> ModelConfig:
    """Our ``ModelConfig`` from a HF ``MaskFormerConfig`` as a dict (``config.json``)."""
    dcfg = hf_config["decoder_config"]
    if "id2label" in hf_config:
        num_classes = len(hf_config["id2label"])
    else:
        num_classes = int(hf_config["num_labels"])
    mean, std = HF_MEAN, HF_STD
    if preprocessor:
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    return ModelConfig(
        meta_arch="maskformer",
        backbone=backbone_config_from_hf(hf_config["backbone_config"]),
        num_classes=num_classes,
        num_queries=int(dcfg["num_queries"]),
        hidden_dim=int(dcfg["d_model"]),
        mask_dim=int(hf_config.get("mask_feature_size", 256)),
        conv_dim=int(hf_config.get("fpn_feature_size", 256)),
        nheads=int(dcfg["decoder_attention_heads"]),
        dim_feedforward=int(dcfg["decoder_ffn_dim"]),
        dropout=float(dcfg.get("dropout", 0.1)),
        dec_layers=int(dcfg["decoder_layers"]),
        enc_layers=0,
        pre_norm=False,
        pixel_mean=tuple(round(255.0 * m, 6) for m in mean),  # HF rescales to 0-1 first
        pixel_std=tuple(round(255.0 * s, 6) for s in std),
    )


# ----------------------------------------------------------------------------- weights
_DECODER_LAYER_RULES = [  # inside "decoder.layers.{i}." -> "predictor.decoder.layers.{i}."
    ("self_attn.out_proj", "self_attn.out_proj"),
    ("encoder_attn.out_proj", "cross_attn.out_proj"),
    ("self_attn_layer_norm", "norm1"),
    ("encoder_attn_layer_norm", "norm2"),
    ("fc1", "ffn.linear1"),
    ("fc2", "ffn.linear2"),
    ("final_layer_norm", "norm3"),
]


def _head_key(key: str) -> str | None:
    """Pixel decoder, transformer module and heads (backbone-independent); q/k/v projections
    give "<packed in_proj key>#<q|k|v>"."""
    rules = [
        (r"model\.pixel_level_module\.decoder\.fpn\.stem\.(\d)\.(.+)", "pixel_decoder.res5_conv.\\1.\\2"),
        (r"model\.pixel_level_module\.decoder\.fpn\.layers\.(\d)\.proj\.(\d)\.(.+)",
         "pixel_decoder.lateral_convs.\\1.\\2.\\3"),
        (r"model\.pixel_level_module\.decoder\.fpn\.layers\.(\d)\.block\.(\d)\.(.+)",
         "pixel_decoder.output_convs.\\1.\\2.\\3"),
        (r"model\.pixel_level_module\.decoder\.mask_projection\.(.+)", "pixel_decoder.mask_features.\\1"),
        (r"model\.transformer_module\.queries_embedder\.(.+)", "predictor.query_embed.\\1"),
        (r"model\.transformer_module\.input_projection\.(.+)", "predictor.input_proj.\\1"),
        (r"model\.transformer_module\.decoder\.layernorm\.(.+)", "predictor.decoder.norm.\\1"),
        (r"class_predictor\.(.+)", "predictor.class_embed.\\1"),
        (r"mask_embedder\.(\d)\.0\.(.+)", "predictor.mask_embed.layers.\\1.\\2"),
    ]
    for pattern, target in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target)
    m = re.fullmatch(r"model\.transformer_module\.decoder\.layers\.(\d+)\.(.+)", key)
    if m:
        prefix, inner = f"predictor.decoder.layers.{m.group(1)}.", m.group(2)
        qkv = re.fullmatch(r"(self_attn|encoder_attn)\.(q|k|v)_proj\.(weight|bias)", inner)
        if qkv:
            attn = "self_attn" if qkv.group(1) == "self_attn" else "cross_attn"
            return f"{prefix}{attn}.in_proj_{qkv.group(3)}#{qkv.group(2)}"
        for hf, ours in _DECODER_LAYER_RULES:
            if inner.startswith(hf + "."):
                return prefix + ours + inner[len(hf):]
    return None


_SKIP = re.compile(
    r"criterion\.empty_weight|.*num_batches_tracked|.*relative_position_index"
    r"|model\.pixel_level_module\.encoder\.model\.layernorm\..*"  # Swin's final norm: unused by the backbone
)


def convert_state_dict(hf_state: Mapping[str, Tensor], backbone_kind: str) -> dict[str, Tensor]:
    """HF ``MaskFormerForInstanceSegmentation`` state dict -> ours. backbone_kind: resnet | swin.

    Raises a ValueError naming any HF tensor that has no destination (nothing is dropped
    silently); q/k/v projections are concatenated in q, k, v order (``nn.MultiheadAttention``'s
    ``in_proj`` and timm's ``qkv``).
    """
    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    unknown = []
    backbone_prefix = "model.pixel_level_module.encoder."
    for raw_key, value in hf_state.items():
        key = canonical_key(raw_key)
        if _SKIP.fullmatch(key):
            continue
        if key.startswith(backbone_prefix):
            rest = key[len(backbone_prefix):]
            ours = resnet_key(rest) if backbone_kind == "resnet" else swin_key(rest)
        else:
            ours = _head_key(key)
        if ours is None:
            unknown.append(raw_key)
            continue
        place(out, packed, ours, value)
    return finish_state(out, packed, unknown, "HF")


def _load_into(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"HF conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


def _convert(hf_config: Mapping[str, Any], hf_state: Mapping[str, Tensor],
             preprocessor: Mapping[str, Any] | None = None) -> tuple[ModelConfig, nn.Module]:
    """Dispatch on the HF ``model_type``: maskformer (here), mask2former, eomt, eomt_dinov3."""
    kind = hf_config.get("model_type")
    if kind in ("eomt", "eomt_dinov3"):
        config_from_hf, state_from_hf = ((eomt_config_from_hf, eomt_state_from_hf) if kind == "eomt" else
                                         (eomt_dinov3_config_from_hf, eomt_dinov3_state_from_hf))
        model_cfg = config_from_hf(hf_config, preprocessor)
        return model_cfg, _load_into(build_model(model_cfg), state_from_hf(hf_state))
    if kind == "mask2former":
        model_cfg = mask2former_config_from_hf(hf_config, preprocessor)
        backbone = "swin" if model_cfg.backbone.name.startswith("swin") else "resnet"
        return model_cfg, _load_into(build_model(model_cfg), mask2former_state_from_hf(hf_state, backbone))
    model_cfg = model_config_from_hf(hf_config, preprocessor)
    backbone = "swin" if model_cfg.backbone.name.startswith("swin") else "resnet"
    return model_cfg, _load_into(build_model(model_cfg), convert_state_dict(hf_state, backbone))


# ----------------------------------------------------------------------------- public API
def from_hf(hf_model) -> nn.Module:
    """A ``transformers.MaskFormerForInstanceSegmentation`` (in memory) -> our ``MaskFormer``, a
    ``Mask2FormerForUniversalSegmentation`` (ResNet or Swin backbone) -> our ``Mask2Former``, or an
    ``EomtForUniversalSegmentation`` (DINOv2) / ``EomtDinov3ForUniversalSegmentation`` -> our ``EoMT``, with the same weights, in eval mode
    on the CPU, float32."""
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in hf_model.state_dict().items()}
    _, model = _convert(hf_model.config.to_dict(), state)
    return model.eval()


def _read_hf_directory(src_dir: str | os.PathLike) -> tuple[dict, dict[str, Tensor], dict | None]:
    src = Path(src_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a saved HF MaskFormer directory)")
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("model_type") not in _MODEL_TYPES:
        raise ValueError(f"{config_path}: model_type {hf_config.get('model_type')!r}, expected one of {_MODEL_TYPES}")
    shards = sorted(src.glob("model*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(shard)))
    elif (src / "pytorch_model.bin").is_file():
        state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{src}: no model*.safetensors or pytorch_model.bin")
    pre_path = src / "preprocessor_config.json"
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    return hf_config, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, preprocessor


def load_hf_pretrained(src_dir: str | os.PathLike) -> nn.Module:
    """Read a saved HF MaskFormer, Mask2Former or EoMT directory offline (transformers is not needed) -> ``MaskFormer``
    (or ``Mask2Former``, ``EoMT``) in eval mode. Normalisation constants come from ``preprocessor_config.json`` when present."""
    hf_config, state, preprocessor = _read_hf_directory(src_dir)
    return _convert(hf_config, state, preprocessor)[1].eval()


def convert_hf_directory(src_dir: str | os.PathLike, out_path: str | os.PathLike) -> Config:
    """Convert a saved HF MaskFormer, Mask2Former or EoMT directory into our checkpoint ``{"model", "config"}`` at
    ``out_path`` (written atomically: temporary file in the same folder, then ``os.replace``).
    Returns the ``Config`` stored with it (model section from HF, the dataset whose label space has
    its number of classes, other sections default)."""
    hf_config, state, preprocessor = _read_hf_directory(src_dir)
    model_cfg, model = _convert(hf_config, state, preprocessor)
    cfg = Config(model=model_cfg, name=f"hf-{Path(src_dir).resolve().name}")
    cfg.data.dataset = fitting_dataset(cfg, cfg.name)  # a 133-class model: coco-panoptic, not the default
    write_checkpoint(out_path, model, cfg)
    return cfg
