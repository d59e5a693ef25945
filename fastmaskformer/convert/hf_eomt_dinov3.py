"""DINOv3 ViTs in transformers' layout -> timm's DINOv3 ``Eva`` (our ``dinov3_*`` ViTs), and
transformers' EoMT on DINOv3 (``EomtDinov3ForUniversalSegmentation``, model_type ``eomt_dinov3``)
-> our ``EoMT``.

transformers' DINOv3 names appear in three spellings: ``DINOv3ViTModel`` (``embeddings.*``,
``layer.{i}.*``, ``norm.*``), its EoMT (``layers.{i}.*``, ``layernorm.*``) and the official EoMT
checkpoints (``patch_embed.*``, ``blocks.{i}.*``, ``norm.*``: the official ``ViT`` renames the
modules). All three map here: separate q/k/v projections -> timm's packed ``qkv.weight`` with
``q_bias`` / ``v_bias`` (timm's key bias is a fixed zero, as in DINOv3); layer scales
``layer_scale{1,2}.lambda1`` -> ``gamma_{1,2}``; the gated MLP ``gate_proj`` / ``up_proj`` ->
timm's ``SwiGLU`` ``fc1_g`` / ``fc1_x``.

transformers' EoMT-DINOv3 runs its mask head and upscaling with the ViT's ``hidden_act``: GELU
for the released S/B/L models (as the official code, as ours); a gated (SwiGLU: SiLU) one would
have SiLU heads and does not convert. A gated DINOv3 *backbone* (H+) converts.

RoPE maps exactly: both compute DINOv3's table (patch centres normalised to [-1, 1], periods
``theta ** (4 i / head_dim)``, angle ``2 pi x / period``, rotate-half layout, prefix tokens not
rotated); transformers multiplies by ``1 / period`` where timm divides by the period: their
sin/cos tables agree to 4.5e-7 (ViT-L at 640 and 1280, float32). The training-time coordinate augmentations (``pos_embed_shift/jitter/rescale``)
become timm's ``rope_{shift,jitter,rescale}_coords``: same distributions, same draw order from
the global RNG.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from ..config import ModelConfig
from .hf_common import finish_state, place
from .hf_eomt import annealing_state, eomt_model_config, head_key, hf_value

# (hidden_size, layers, heads, intermediate_size, gated MLP) of the DINOv3 ViTs -> our alias
_DINOV3 = {
    (384, 12, 6, 1536, False): "dinov3_small",
    (768, 12, 12, 3072, False): "dinov3_base",
    (1024, 24, 16, 4096, False): "dinov3_large",
    (1280, 32, 20, 5120, True): "dinov3_huge_plus",
}
_TIMM_EPS, _TIMM_THETA, _TIMM_REGISTERS = 1e-5, 100.0, 4  # timm's vit_*_patch16_dinov3 defaults
_ROPE_AUGMENTATIONS = {"pos_embed_shift": "rope_shift_coords", "pos_embed_jitter": "rope_jitter_coords",
                       "pos_embed_rescale": "rope_rescale_coords"}

_BLOCK = r"(?:layer|model\.layer|layers|blocks)\.(\d+)\."  # model.layer: DINOv3ViTModel in memory (transformers 5)
_VIT_RULES = [  # (transformers name, relative to the ViT, timm Eva name); "#q|k|v" parts are packed
    (r"(?:embeddings|patch_embed)\.cls_token", r"cls_token"),
    (r"(?:embeddings|patch_embed)\.register_tokens", r"reg_token"),
    (r"(?:embeddings|patch_embed)\.patch_embeddings\.(weight|bias)", r"patch_embed.proj.\1"),
    (_BLOCK + r"norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_BLOCK + r"attention\.([qkv])_proj\.weight", r"blocks.\1.attn.qkv.weight#\2"),
    (_BLOCK + r"attention\.([qv])_proj\.bias", r"blocks.\1.attn.\2_bias"),
    (_BLOCK + r"attention\.k_proj\.bias", r"blocks.\1.attn.k_bias"),
    (_BLOCK + r"attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"layer_scale([12])\.lambda1", r"blocks.\1.gamma_\2"),
    (_BLOCK + r"mlp\.gate_proj\.(weight|bias)", r"blocks.\1.mlp.fc1_g.\2"),
    (_BLOCK + r"mlp\.up_proj\.(weight|bias)", r"blocks.\1.mlp.UP.\2"),
    (_BLOCK + r"mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"(?:norm|layernorm)\.(weight|bias)", r"norm.\1"),
]
_VIT_SKIP = re.compile(r"(?:embeddings|patch_embed)\.mask_token|rope_embeddings\..*")  # pretraining only / not persistent


def dinov3_vit_kwargs(hf_config: Any) -> tuple[str, dict[str, Any]]:
    """(our ViT alias, timm kwargs) for a transformers DINOv3 ViT config (``DINOv3ViTConfig`` or
    ``EomtDinov3Config``, object or dict). Raises a ValueError for what timm's ``Eva`` cannot
    express."""
    if hf_value(hf_config, "key_bias", False):
        raise ValueError("HF DINOv3 with key_bias=True does not convert: timm's DINOv3 attention has no key bias "
                         "(it would not cancel under RoPE)")
    if not hf_value(hf_config, "proj_bias", True) or not hf_value(hf_config, "mlp_bias", True):
        raise ValueError("only HF DINOv3 with proj_bias and mlp_bias (as released) converts")
    gated = bool(hf_value(hf_config, "use_gated_mlp", False))
    act = hf_value(hf_config, "hidden_act", "gelu")
    if act != ("silu" if gated else "gelu"):
        raise ValueError(f"HF DINOv3 hidden_act {act!r}: timm's DINOv3 has GELU MLPs and SiLU gated MLPs "
                         f"(use_gated_mlp={gated})")
    rope = hf_value(hf_config, "rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"HF DINOv3 rope_type {rope['rope_type']!r}: only the default DINOv3 RoPE converts")
    theta = float(rope.get("rope_theta", hf_value(hf_config, "rope_theta", _TIMM_THETA)))
    dim, depth, heads, hidden = (int(hf_value(hf_config, k)) for k in
                                 ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))
    name = _DINOV3.get((dim, depth, heads, hidden, gated))
    kwargs: dict[str, Any] = {}
    if name is None:  # a non-standard size: the alias of its MLP kind, resized
        name = "dinov3_huge_plus" if gated else "dinov3_large"
        kwargs.update(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=(hidden + 0.5) / dim)
    if hf_value(hf_config, "query_bias", True) or hf_value(hf_config, "value_bias", True):
        kwargs["qkv_bias"] = True  # timm's aliases have none (the released biases are zero); fine-tuning moves them
    eps = float(hf_value(hf_config, "layer_norm_eps", 1e-6))
    if eps != _TIMM_EPS:
        kwargs["norm_eps"] = eps
    if theta != _TIMM_THETA:
        kwargs["rope_temperature"] = theta
    registers = int(hf_value(hf_config, "num_register_tokens", _TIMM_REGISTERS))
    if registers != _TIMM_REGISTERS:
        kwargs["num_reg_tokens"] = registers
    for hf_key, timm_key in _ROPE_AUGMENTATIONS.items():
        if hf_value(hf_config, hf_key) is not None:
            kwargs[timm_key] = float(hf_value(hf_config, hf_key))
    if float(hf_value(hf_config, "drop_path_rate", 0.0)) > 0:
        kwargs["drop_path_rate"] = float(hf_value(hf_config, "drop_path_rate"))
    return name, kwargs


def dinov3_vit_key(key: str) -> str | None:
    """A transformers DINOv3 ViT name (any of the three spellings, relative to the ViT) -> timm's
    (``...#q|k|v`` for parts of the packed projection, ``mlp.UP`` for the up projection: ``fc1``
    or, beside a gate, ``fc1_x``), "" for tensors with no use here, None for a non-ViT name."""
    if _VIT_SKIP.fullmatch(key):
        return ""
    for pattern, target in _VIT_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def dinov3_vit_state(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """A DINOv3 ViT state dict in transformers' layout (keys relative to the ViT) -> timm's
    ``Eva`` names. A zero key bias is dropped (timm's is a fixed zero); a ValueError names
    tensors with no destination and a non-zero key bias."""
    gated = any(".mlp.gate_proj." in k for k in state)
    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        ours = dinov3_vit_key(key)
        if ours is None:
            unknown.append(key)
        elif ours.endswith(".attn.k_bias"):
            if value.abs().max() > 0:
                raise ValueError(f"{source}: non-zero key bias {key}: timm's DINOv3 attention has none")
        elif ours:
            place(out, packed, ours.replace(".mlp.UP.", ".mlp.fc1_x." if gated else ".mlp.fc1."), value)
    return finish_state(out, packed, unknown, source)


def eomt_dinov3_config_from_hf(hf_config: Any, preprocessor: Mapping[str, Any] | None = None) -> ModelConfig:
    """Our ``ModelConfig`` (meta_arch eomt, a ``dinov3_*`` ViT) from a HF ``EomtDinov3Config``."""
    if hf_value(hf_config, "model_type") != "eomt_dinov3":
        raise ValueError(f"HF model_type {hf_value(hf_config, 'model_type')!r} is not 'eomt_dinov3'")
    if hf_value(hf_config, "use_gated_mlp", False):
        raise ValueError("HF EoMT-DINOv3 with use_gated_mlp does not convert: its hidden_act (SiLU for DINOv3's "
                         "SwiGLU) also drives its mask head and upscaling, which are GELU in EoMT (official, ours)")
    name, kwargs = dinov3_vit_kwargs(hf_config)
    cfg = eomt_model_config(hf_config, name, kwargs, preprocessor)
    upscale = int(hf_value(hf_config, "num_upscale_blocks", 2))
    expected = max(1, int(math.log2(cfg.patch_size)) - 2)  # as our EoMT builds it
    if upscale != expected:
        raise ValueError(f"HF num_upscale_blocks={upscale}: our EoMT upscales patch {cfg.patch_size} "
                         f"to stride 4 with {expected}")
    return cfg


def eomt_dinov3_state_from_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``EomtDinov3ForUniversalSegmentation`` state dict -> our ``EoMT``'s, the mask-annealing
    state included. Raises a ValueError naming tensors with no destination."""
    vit, out, unknown = {}, {}, []
    for key, value in hf_state.items():
        if key in ("criterion.empty_weight", "attn_mask_probs"):
            continue
        ours = head_key(key)
        if ours is not None:
            out[ours] = value
        elif dinov3_vit_key(key) is not None:
            vit[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"HF EoMT-DINOv3 parameters with no fastmaskformer destination: {unknown[:8]}")
    out.update({"backbone.vit." + k: v for k, v in dinov3_vit_state(vit, "HF EoMT-DINOv3").items()})
    out["mask_annealing._extra_state"] = annealing_state(hf_state["attn_mask_probs"])
    return out


def zero_qkv_biases(state: dict[str, Tensor], vit_prefix: str = "") -> dict[str, Tensor]:
    """Fill missing timm ``q_bias`` / ``v_bias`` with zeros (a ViT without them = zero biases),
    for every block whose packed ``qkv.weight`` is present. Returns ``state``."""
    for key in [k for k in state if k.startswith(vit_prefix) and k.endswith(".attn.qkv.weight")]:
        dim = state[key].shape[1]
        for part in ("q_bias", "v_bias"):
            state.setdefault(key.replace("qkv.weight", part), torch.zeros(dim, dtype=state[key].dtype))
    return state
