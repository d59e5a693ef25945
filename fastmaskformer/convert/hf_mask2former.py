"""Hugging Face transformers Mask2Former -> fastmaskformer, part 1: the pixel decoder (issue 18).

``pixel_decoder_state_from_hf(state)`` renames the parameters of a ``Mask2FormerPixelDecoder``
(or of a whole ``Mask2FormerForUniversalSegmentation`` / ``Mask2FormerModel``: pass
``prefix="model.pixel_level_module.decoder."``) to our ``MSDeformAttnPixelDecoder``;
``pixel_decoder_kwargs_from_hf(config)`` gives the matching constructor arguments. The whole
model's conversion builds on these (next issue).

The two decoders compute the same function: HF's port follows the official code (input
projections res5 -> res3, level embedding added to the sine encoding, post-norm deformable
encoder layers with reference points at the pixel centres, bilinear top-down to stride 4, 1x1
mask projection).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

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
