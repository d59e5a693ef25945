"""Hugging Face transformers Mask2Former -> fastmaskformer.

``pixel_decoder_state_from_hf(state)`` renames the parameters of a ``Mask2FormerPixelDecoder``
(or of a whole ``Mask2FormerForUniversalSegmentation`` / ``Mask2FormerModel``: pass
``prefix="model.pixel_level_module.decoder."``) to our ``MSDeformAttnPixelDecoder``;
``pixel_decoder_kwargs_from_hf(config)`` gives the matching constructor arguments.
``mask2former_state_from_hf`` / ``mask2former_config_from_hf`` convert a whole
``Mask2FormerForUniversalSegmentation`` (ResNet backbone: the rules of ``hf.py``; Swin: the
``SwinBackbone`` names below; the masked-attention decoder: below); ``fastmaskformer.convert.from_hf`` dispatches here.

The two decoders compute the same function: HF's port follows the official code (input
projections res5 -> res3, level embedding added to the sine encoding, post-norm deformable
encoder layers with reference points at the pixel centres, bilinear top-down to stride 4, 1x1
mask projection).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

from ..config import ModelConfig
from .hf_common import (
    HF_MEAN, HF_STD, backbone_config_from_hf, canonical_key, finish_state, place, resnet_key, swin_key,
)

# (HF name pattern, our name); \1.. are the pattern's groups.
_PIXEL_DECODER_RULES = [
    (r"level_embed", r"level_embed"),
    (r"input_projections\.(\d+)\.([01])\.(weight|bias)", r"input_proj.\1.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     r"encoder.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.\1.linear1.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.\1.linear2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.\1.norm2.\2"),
    (r"mask_projection\.(weight|bias)", r"mask_features.\1"),
]
# HF numbers the FPN convs from the highest resolution (adapter_1 / layer_1 = res2); ours run
# top-down (lowest resolution first), so index = levels - k.
_FPN = re.compile(r"(adapter|layer)_(\d+)\.([01])\.(weight|bias)")


def pixel_decoder_state_from_hf(hf_state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our ``MSDeformAttnPixelDecoder`` state dict from HF ``Mask2FormerPixelDecoder`` parameters
    (keys under ``prefix``; others are ignored). Raises on a decoder key it does not know."""
    items = {k[len(prefix):]: v for k, v in hf_state.items() if k.startswith(prefix)}
    fpn_levels = len({m.group(2) for k in items if (m := _FPN.fullmatch(k))})
    out, unknown = {}, []
    for key, value in items.items():
        m = _FPN.fullmatch(key)
        if m:
            kind, k, sub, param = m.groups()
            ours = "lateral_convs" if kind == "adapter" else "output_convs"
            out[f"{ours}.{fpn_levels - int(k)}.{sub}.{param}"] = value
            continue
        for pattern, target in _PIXEL_DECODER_RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        more = " ..." if len(unknown) > 8 else ""
        raise KeyError(f"Mask2Former pixel decoder: no mapping for {unknown[:8]}{more}")
    return out


def pixel_decoder_kwargs_from_hf(hf_config: Any) -> dict:
    """``MSDeformAttnPixelDecoder`` keyword arguments (besides in_channels) for a
    ``Mask2FormerConfig`` (object or dict). HF's encoder uses 4 points per head and level."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
    return dict(conv_dim=get("feature_size"), mask_dim=get("mask_feature_size"), enc_layers=get("encoder_layers"),
                nheads=get("num_attention_heads"), dim_feedforward=get("encoder_feedforward_dim"),
                dropout=get("dropout", 0.0), n_points=4, common_stride=get("common_stride", 4))


# The transformer module (HF ``Mask2FormerTransformerModule``) -> our ``MaskedAttentionDecoder``
# (``predictor.``). HF's self-attention has separate q/k/v projections ("#q" parts are packed
# into ``in_proj``); its cross-attention is already an ``nn.MultiheadAttention``.
_DECODER_RULES = [
    (r"queries_embedder\.weight", r"query_embed.weight"),
    (r"queries_features\.weight", r"query_feat.weight"),
    (r"level_embed\.weight", r"level_embed.weight"),
    (r"input_projections\.(\d)\.(weight|bias)", r"input_proj.\1.\2"),
    (r"decoder\.layernorm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(weight|bias)", r"mask_embed.layers.\1.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"self_attention_layers.\1.attn.in_proj_\3#\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"self_attention_layers.\1.attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"self_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias)", r"cross_attention_layers.\1.attn.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(weight|bias)", r"cross_attention_layers.\1.attn.out_proj.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)", r"cross_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"ffn_layers.\1.ffn.linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"ffn_layers.\1.ffn.linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"ffn_layers.\1.norm.\2"),
]
_SKIP = re.compile(r"criterion\.empty_weight|.*num_batches_tracked")


_SWIN_BACKBONE_BLOCK = [  # transformers 5 SwinBackbone block names -> timm
    (r"attention\.([qkv])_proj\.(weight|bias)", r"attn.qkv.\2#\1"),
    (r"attention\.o_proj\.(.+)", r"attn.proj.\1"),
    (r"attention\.relative_position_bias\.relative_position_bias_table", r"attn.relative_position_bias_table"),
    (r"layernorm_before\.(.+)", r"norm1.\1"),
    (r"layernorm_after\.(.+)", r"norm2.\1"),
    (r"mlp\.(fc[12])\.(.+)", r"mlp.\1.\2"),
]


def _swin_backbone_key(rest: str) -> str | None:
    """``rest`` follows "model.pixel_level_module.encoder." (HF ``SwinBackbone``) -> timm Swin;
    "" for entries with no counterpart (the unused final norm, fixed index buffers)."""
    m = re.fullmatch(r"hidden_states_norms\.stage(\d)\.(.+)", rest)
    if m:
        return f"backbone.norms.{int(m.group(1)) - 1}.{m.group(2)}"
    if re.fullmatch(r"swin\.layernorm\..+|.*relative_position_index", rest):
        return ""
    m = re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", rest)
    if m:
        for pattern, target in _SWIN_BACKBONE_BLOCK:
            if re.fullmatch(pattern, m.group(3)):
                return f"backbone.body.layers_{m.group(1)}.blocks.{m.group(2)}." + re.sub(pattern, target, m.group(3))
    if rest.startswith("swin."):  # embeddings and patch merging: the MaskFormer-Swin rules apply
        return swin_key("model." + rest[len("swin."):])
    return None


def mask2former_state_from_hf(hf_state: Mapping[str, Tensor], backbone_kind: str = "resnet") -> dict[str, Tensor]:
    """A ``Mask2FormerForUniversalSegmentation`` state dict -> our ``Mask2Former``'s. Raises a
    ValueError naming HF tensors with no destination (nothing is dropped silently)."""
    if backbone_kind not in ("resnet", "swin"):
        raise ValueError(f"backbone_kind must be 'resnet' or 'swin', got {backbone_kind!r}")
    enc, dec, tm = "model.pixel_level_module.encoder.", "model.pixel_level_module.decoder.", "model.transformer_module."
    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    unknown = []
    pixel = {k: v for k, v in hf_state.items() if k.startswith(dec)}
    out.update({"pixel_decoder." + k: v for k, v in pixel_decoder_state_from_hf(pixel, prefix=dec).items()})
    for raw_key, value in hf_state.items():
        key = raw_key if raw_key.startswith(enc) else canonical_key(raw_key)  # backbone rules take raw names
        if raw_key in pixel or _SKIP.fullmatch(key):
            continue
        ours = None
        if key.startswith(enc):
            rest = key[len(enc):]
            ours = resnet_key(rest) if backbone_kind == "resnet" else _swin_backbone_key(rest)
            if ours == "":
                continue
        elif key.startswith("class_predictor."):
            ours = "predictor.class_embed." + key[len("class_predictor."):]
        elif key.startswith(tm):
            rest = key[len(tm):]
            for pattern, target in _DECODER_RULES:
                if re.fullmatch(pattern, rest):
                    ours = "predictor." + re.sub(pattern, target, rest)
                    break
        if ours is None:
            unknown.append(raw_key)
        else:
            place(out, packed, ours, value)
    return finish_state(out, packed, unknown, "HF Mask2Former")


def mask2former_config_from_hf(hf_config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None):
    """Our ``ModelConfig`` (meta_arch mask2former) from a HF ``Mask2FormerConfig`` as a dict."""

    if hf_config.get("enforce_input_projection", False):
        raise ValueError("HF Mask2Former with enforce_input_projection=True is not supported (official: False)")
    num_classes = len(hf_config["id2label"]) if "id2label" in hf_config else int(hf_config["num_labels"])
    mean, std = HF_MEAN, HF_STD
    if preprocessor:
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    kwargs = pixel_decoder_kwargs_from_hf(hf_config)
    conv_dim, mask_dim = kwargs.pop("conv_dim"), kwargs.pop("mask_dim")
    return ModelConfig(
        meta_arch="mask2former", pixel_decoder="msdeformattn", pixel_decoder_kwargs=kwargs,
        backbone=backbone_config_from_hf(hf_config["backbone_config"]), num_classes=num_classes,
        num_queries=int(hf_config["num_queries"]), hidden_dim=int(hf_config["hidden_dim"]), mask_dim=int(mask_dim),
        conv_dim=int(conv_dim), nheads=int(hf_config["num_attention_heads"]),
        dim_feedforward=int(hf_config["dim_feedforward"]), dropout=float(hf_config.get("dropout", 0.0)),
        dec_layers=int(hf_config["decoder_layers"]), enc_layers=0, pre_norm=bool(hf_config.get("pre_norm", False)),
        pixel_mean=tuple(round(255.0 * m, 6) for m in mean), pixel_std=tuple(round(255.0 * s, 6) for s in std),
    )
