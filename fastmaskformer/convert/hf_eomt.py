"""Hugging Face transformers EoMT (``EomtForUniversalSegmentation``, DINOv2 backbone) ->
fastmaskformer ``EoMT`` (timm DINOv2 ViT inside).

``eomt_config_from_hf(config)`` gives our ``ModelConfig``; ``eomt_state_from_hf(state, config)``
renames the parameters; ``fastmaskformer.convert.from_hf`` / ``convert --from hf`` dispatch here
on ``model_type: eomt``. HF's separate q/k/v projections are packed into timm's ``qkv``, its
SwiGLU ``gate_proj`` / ``up_proj`` into timm's packed ``fc1``; the position embedding table
[h*w, C] becomes timm's [1, h*w, C]; ``attn_mask_probs`` becomes our mask-annealing state.

HF differences we do not copy: HF's position embedding has no resampling, so it runs only at its
``image_size`` (ours resamples for other sizes, identical at that size); in eval mode HF keeps
the previous block's attention mask for a block whose probability is 0 when an earlier one is
not (a stale mask); ours never masks such a block.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from ..config import BackboneConfig, ModelConfig
from .hf_common import HF_MEAN, HF_STD, finish_state, place


def annealing_state(probs: Tensor, seed: int = 0) -> dict:
    """Our ``MaskAnnealing`` extra state for converted mask probabilities (a fresh generator)."""
    return {"seed": seed, "generator": None, "probs": [float(p) for p in probs]}

# (hidden_size, layers, heads, swiglu) of the DINOv2 ViTs -> our alias
_DINOV2 = {
    (384, 12, 6, False): "dinov2_small",
    (768, 12, 12, False): "dinov2_base",
    (1024, 24, 16, False): "dinov2_large",
    (1536, 40, 24, True): "dinov2_giant",
}

_VIT_RULES = [  # (HF name pattern, our name) of the DINOv2 ViT; "#q|k|v" / "#gate|up" parts are packed
    (r"embeddings\.cls_token", r"backbone.vit.cls_token"),
    (r"embeddings\.register_tokens", r"backbone.vit.reg_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"backbone.vit.patch_embed.proj.\1"),
    (r"layers\.(\d+)\.norm([12])\.(weight|bias)", r"backbone.vit.blocks.\1.norm\2.\3"),
    (r"layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", r"backbone.vit.blocks.\1.attn.qkv.\3#\2"),
    (r"layers\.(\d+)\.attention\.out_proj\.(weight|bias)", r"backbone.vit.blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.layer_scale([12])\.lambda1", r"backbone.vit.blocks.\1.ls\2.gamma"),
    (r"layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.\2.\3"),
    (r"layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.fc1.\3#\2"),
    (r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"backbone.vit.norm.\1"),
]
_HEAD_RULES = [  # the EoMT parts outside the ViT, shared by the DINOv2 and DINOv3 models
    (r"query\.weight", r"queries.weight"),
    (r"upscale_block\.block\.(\d+)\.(conv[12])\.(weight|bias)", r"upscale.\1.\2.\3"),
    (r"upscale_block\.block\.(\d+)\.layernorm2d\.(weight|bias)", r"upscale.\1.norm.\2"),
    (r"mask_head\.fc([123])\.(weight|bias)", r"mask_head.\1.\2"),
    (r"class_predictor\.(weight|bias)", r"class_head.\1"),
]
_SKIP = re.compile(r"criterion\.empty_weight|embeddings\.position_ids|attn_mask_probs")


def hf_value(hf_config: Any, key: str, default=None):
    """``hf_config.key`` of a HF config object or dict."""
    return hf_config.get(key, default) if isinstance(hf_config, Mapping) else getattr(hf_config, key, default)


def hf_square_size(value) -> int:
    """HF image/patch sizes may be an int or a square pair."""
    if isinstance(value, (list, tuple)):
        if value[0] != value[1]:
            raise ValueError(f"only square HF EoMT image and patch sizes convert, got {tuple(value)}")
        value = value[0]
    return int(value)


def eomt_config_from_hf(hf_config: Any, preprocessor: Mapping[str, Any] | None = None) -> ModelConfig:
    """Our ``ModelConfig`` (meta_arch eomt) from a HF ``EomtConfig`` (object or dict)."""
    if hf_value(hf_config, "model_type") != "eomt":
        raise ValueError(f"HF model_type {hf_value(hf_config, 'model_type')!r} is not 'eomt' (DINOv2 EoMT; "
                         "DINOv3 EoMT, eomt_dinov3, converts in hf_eomt_dinov3)")
    if hf_value(hf_config, "hidden_act", "gelu") != "gelu" or float(hf_value(hf_config, "layer_norm_eps", 1e-6)) != 1e-6:
        raise ValueError("only HF EoMT with GELU and LayerNorm eps 1e-6 (DINOv2, as released) converts")
    dim, depth, heads = (int(hf_value(hf_config, k)) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    swiglu = bool(hf_value(hf_config, "use_swiglu_ffn", False))
    mlp_ratio = float(hf_value(hf_config, "mlp_ratio", 4))
    name = _DINOV2.get((dim, depth, heads, swiglu)) if mlp_ratio == 4 else None
    kwargs: dict[str, Any] = {}
    if name is None:
        name = "dinov2_giant" if swiglu else "dinov2_large"
        hidden = int(dim * mlp_ratio)
        if swiglu:  # HF keeps 2/3 of the hidden size rounded up to 8; timm packs gate and up in one fc1
            hidden = 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)
        kwargs = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=(hidden + 0.5) / dim)
    kwargs["reg_tokens"] = int(hf_value(hf_config, "num_register_tokens", 4))
    if kwargs["reg_tokens"] == 4:
        del kwargs["reg_tokens"]
    return eomt_model_config(hf_config, name, kwargs, preprocessor)


def eomt_model_config(hf_config: Any, vit: str, vit_kwargs: dict, preprocessor: Mapping[str, Any] | None) -> ModelConfig:
    """Our EoMT ``ModelConfig`` around the ViT ``vit`` (alias + timm kwargs): queries, query
    blocks, classes, input and patch size from a HF EoMT config; pixel mean/std from its image
    processor (ImageNet by default)."""
    labels = hf_value(hf_config, "id2label")
    num_classes = len(labels) if labels else int(hf_value(hf_config, "num_labels"))
    mean, std = HF_MEAN, HF_STD
    if preprocessor:
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    patch = hf_square_size(hf_value(hf_config, "patch_size", 16))
    image_size = hf_square_size(hf_value(hf_config, "image_size", 640))
    return ModelConfig(
        meta_arch="eomt", backbone=BackboneConfig(name=vit, img_size=image_size, kwargs=vit_kwargs),
        num_classes=num_classes, num_queries=int(hf_value(hf_config, "num_queries")),
        num_blocks=int(hf_value(hf_config, "num_blocks")), patch_size=patch, size_divisibility=patch,
        pixel_mean=tuple(round(255.0 * m, 6) for m in mean), pixel_std=tuple(round(255.0 * s, 6) for s in std),
    )


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def head_key(key: str) -> str | None:
    """HF EoMT name outside the ViT (queries, class head, mask head, upscaling) -> ours, or None."""
    ours = _rename(key, _HEAD_RULES)
    if ours is not None and ours.startswith("mask_head."):  # HF fc1/2/3 -> our Sequential's Linear 0/2/4
        index, leaf = ours.split(".")[1:]
        ours = f"mask_head.{2 * (int(index) - 1)}.{leaf}"
    return ours


def eomt_state_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``EomtForUniversalSegmentation`` state dict -> our ``EoMT``'s, the mask-annealing state
    included (HF ``attn_mask_probs``: 1 = every query masked; a trained model: 0). Raises a
    ValueError naming HF tensors with no destination."""
    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    swiglu: dict[str, dict[str, Tensor]] = {}  # timm fc1 <- HF [gate; up]
    unknown = []
    for key, value in hf_state.items():
        if _SKIP.fullmatch(key):
            continue
        if key == "embeddings.position_embeddings.weight":
            out["backbone.vit.pos_embed"] = value[None]
            continue
        ours = head_key(key) or _rename(key, _VIT_RULES)
        if ours is None:
            unknown.append(key)
        elif ours.endswith(("#gate", "#up")):
            target_key, part = ours.split("#")
            swiglu.setdefault(target_key, {})[part] = value
        else:
            place(out, packed, ours, value)
    for target_key, parts in swiglu.items():
        if set(parts) != {"gate", "up"}:
            raise ValueError(f"incomplete SwiGLU projections for {target_key}: found {sorted(parts)}")
        out[target_key] = torch.cat([parts["gate"], parts["up"]], dim=0)
    out = finish_state(out, packed, unknown, "HF EoMT")
    out["mask_annealing._extra_state"] = annealing_state(hf_state["attn_mask_probs"])
    return out
