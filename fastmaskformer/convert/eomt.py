"""The official EoMT releases (tue-mps/eomt) -> fastmaskformer ``EoMT``.

The published ``pytorch_model.bin`` files hold the Lightning module's state dict: the network
under ``network.`` (``encoder.backbone.*`` = the ViT, ``q``, ``class_head``, ``mask_head``,
``upscale``, ``attn_mask_probs``, ``encoder.pixel_mean/std``) beside the criterion's
``criterion.empty_weight``. The architecture (width, depth, queries, query blocks, input size)
comes from a preset (``convert --from eomt FILE --preset eomt-coco-panoptic-dinov2-l-640``),
checked against the tensors' shapes.

DINOv2 checkpoints (``configs/dinov2``) hold the weights themselves, the ViT in timm's layout.

DINOv3 checkpoints (``configs/dinov3``, ``delta_weights: True``) hold *deltas*, the ViT in
transformers' ``DINOv3ViTModel`` layout, and need the DINOv3 backbone they were fine-tuned from
(``--backbone``; :func:`load_dinov3_backbone` lists the accepted formats). The official loader
(``LightningModule.__init__`` with ``delta_weights`` and ``ckpt_path``) adds the file to the
network it has just built, on every tensor: the backbone's weights under
``network.encoder.backbone``, zeros for every other parameter (``_zero_init_outside_encoder``),
the buffers' initial values (``attn_mask_probs`` ones, ``pixel_mean/std`` ImageNet's). We add the
same: weights = backbone + delta for the ViT, delta for the heads, 1 + delta for the
mask-annealing probabilities; the pixel mean/std must come out as ImageNet's (the presets').
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..config import Config, get_config
from ..modeling import build_model
from ._common import write_checkpoint
from .hf_common import HF_MEAN, HF_STD
from .hf_eomt import annealing_state
from .hf_eomt_dinov3 import dinov3_vit_kwargs, dinov3_vit_state, zero_qkv_biases

_BACKBONE = "network.encoder.backbone."
_HEAD_RENAMES = [  # official prefix -> ours, outside the ViT
    ("network.q.", "queries."),
    ("network.class_head.", "class_head."),
    ("network.mask_head.", "mask_head."),
    ("network.upscale.", "upscale."),
]
_PIXEL_STATS = {"network.encoder.pixel_mean": HF_MEAN, "network.encoder.pixel_std": HF_STD}
_SKIPPED = ("criterion.empty_weight", "network.attn_mask_probs", *_PIXEL_STATS)


def is_dinov3_checkpoint(state: Mapping[str, Tensor]) -> bool:
    """An official DINOv3 EoMT state dict (its ViT in transformers' layout: delta weights)."""
    return any(k.startswith(_BACKBONE + "patch_embed.patch_embeddings.") or ".attention.q_proj." in k for k in state)


def _official_items(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The network's tensors of a Lightning checkpoint or a bare state dict, compile prefixes removed."""
    state = state.get("state_dict", state)
    if "network.attn_mask_probs" not in state:
        raise ValueError("not an official EoMT checkpoint: no network.attn_mask_probs")
    return {k.replace("._orig_mod", ""): v for k, v in state.items()}  # written from a torch.compile'd network


def _head_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parts outside the ViT, renamed; a ValueError names tensors with no destination."""
    out, unknown = {}, []
    for key, value in state.items():
        if key in _SKIPPED or key.startswith(_BACKBONE):
            continue
        for prefix, ours in _HEAD_RENAMES:
            if key.startswith(prefix):
                out[ours + key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"official EoMT tensors with no fastmaskformer destination: {unknown[:8]}")
    return out


def eomt_state_from_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official DINOv2 ``network.*`` state dict (``state_dict`` of a Lightning checkpoint or the
    bare ``pytorch_model.bin``) -> ours, the mask-annealing probabilities included. Raises a
    ValueError naming tensors with no destination."""
    state = _official_items(state)
    if is_dinov3_checkpoint(state):
        raise ValueError("this is a DINOv3 EoMT checkpoint (delta weights over transformers' DINOv3ViTModel): "
                         "convert it with the DINOv3 backbone it was fine-tuned from (eomt_dinov3_state_from_official, "
                         "convert --backbone FILE)")
    out = _head_state(state)
    out.update({"backbone.vit." + k[len(_BACKBONE):]: v for k, v in state.items() if k.startswith(_BACKBONE)})
    out["mask_annealing._extra_state"] = annealing_state(state["network.attn_mask_probs"])
    return out


def eomt_dinov3_state_from_official(delta: Mapping[str, Tensor], backbone: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official DINOv3 EoMT delta state dict + its DINOv3 ViT (timm ``Eva`` names, e.g. from
    :func:`dinov3_backbone_state`) -> our state: ViT = backbone + delta, heads = delta,
    mask-annealing probabilities = 1 + delta (as the official loader adds them). Raises a
    ValueError for a backbone that lacks a tensor of the checkpoint or has another shape, and for
    pixel statistics that do not come out as ImageNet's."""
    delta = _official_items(delta)
    if not is_dinov3_checkpoint(delta):
        raise ValueError("not a DINOv3 EoMT checkpoint (its ViT is in timm's layout: a DINOv2 release, full weights; "
                         "convert it without a backbone)")
    vit_delta = dinov3_vit_state({k[len(_BACKBONE):]: v for k, v in delta.items() if k.startswith(_BACKBONE)},
                                 "official EoMT-DINOv3 checkpoint")
    base = zero_qkv_biases(dict(backbone))  # a backbone without q/v biases has zero ones
    missing = [k for k in vit_delta if k not in base]
    if missing:
        raise ValueError(f"the backbone has no {missing[:4]} (+{max(0, len(missing) - 4)} more): it is not the DINOv3 ViT "
                         f"of this checkpoint")
    mismatched = [f"{k}: backbone {tuple(base[k].shape)} vs checkpoint {tuple(v.shape)}"
                  for k, v in vit_delta.items() if base[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"the backbone does not fit this checkpoint (another DINOv3 size?): {mismatched[:4]}")
    out = _head_state(delta)
    out.update({"backbone.vit." + k: base[k].float() + v.float() for k, v in vit_delta.items()})
    for key, initial in _PIXEL_STATS.items():
        if key in delta:
            value = torch.tensor(initial) + delta[key].float().flatten()
            if not torch.allclose(value, torch.tensor(initial), atol=1e-6):
                raise ValueError(f"{key} comes out as {value.tolist()}, not ImageNet's {list(initial)} (the presets')")
    out["mask_annealing._extra_state"] = annealing_state(1.0 + delta["network.attn_mask_probs"].float())
    return out


def load_dinov3_backbone(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """The DINOv3 backbone file for DINOv3 EoMT delta weights -> (its state dict as stored, its
    transformers config or None). Accepted: a transformers ``DINOv3ViTModel`` folder
    (``config.json`` + ``model.safetensors``, e.g. ``facebook/dinov3-vitl16-pretrain-lvd1689m``
    downloaded) or its weights file; timm's ``vit_*_patch16_dinov3`` weights (``.safetensors`` /
    ``.pth``); Meta's original DINOv3 ``.pth`` (timm's loader maps it)."""
    path, config = Path(path), None
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            if config.get("model_type") != "dinov3_vit":
                raise ValueError(f"{path / 'config.json'}: model_type {config.get('model_type')!r}, expected "
                                 f"'dinov3_vit' (a transformers DINOv3ViTModel)")
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not files:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (sharded backbones: merge them)")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DINOv3 backbone file or folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict"):
            state = state.get(wrapper, state) if isinstance(state.get(wrapper), Mapping) else state
    return state, config


def dinov3_backbone_state(state: Mapping[str, Tensor], vit: nn.Module) -> dict[str, Tensor]:
    """A DINOv3 ViT state dict in any accepted layout -> timm ``Eva`` names of ``vit`` (the timm
    model the converted EoMT holds). A ValueError when it is none of them."""
    if any(k.startswith(("embeddings.", "layer.0.", "model.layer.0.")) for k in state):
        return dinov3_vit_state(state, "DINOv3 backbone")
    if "storage_tokens" in state or "cls_token" in state:
        from timm.models.eva import checkpoint_filter_fn  # Meta's names -> timm's; timm's pass through

        return checkpoint_filter_fn(dict(state), vit)
    raise ValueError(f"not a DINOv3 ViT state dict (expected transformers' embeddings.* / layer.N.*, timm's "
                     f"cls_token / blocks.N.*, or Meta's storage_tokens); first keys: {list(state)[:4]}")


def _dinov3_vit_kwargs(cfg: Config, delta: Mapping[str, Tensor], backbone_config: Mapping | None) -> dict:
    """The preset's ViT kwargs for a DINOv3 checkpoint: q/v biases when it has them (fine-tuning
    moves transformers' q/v biases; timm's aliases have none), and the backbone config's
    LayerNorm eps, RoPE period, registers and training-time RoPE augmentations when it comes
    with one (``pos_embed_rescale: 2.0`` in the released DINOv3 ViTs: the official training
    rescales RoPE coordinates)."""
    kwargs = dict(cfg.model.backbone.kwargs or {})
    if any(k.endswith((".attention.q_proj.bias", ".attention.v_proj.bias")) for k in delta):
        kwargs["qkv_bias"] = True
    if backbone_config is not None:  # the architecture stays the preset's: the tensors' shapes check it
        extra = dinov3_vit_kwargs(backbone_config)[1]
        kwargs.update({k: v for k, v in extra.items() if k not in ("embed_dim", "depth", "num_heads", "mlp_ratio")})
    return kwargs


def _convert_official(state: Mapping[str, Tensor], cfg: Config, backbone: Mapping[str, Tensor] | None,
                      backbone_config: Mapping | None) -> tuple[Config, nn.Module]:
    cfg = copy.deepcopy(cfg)
    if cfg.model.meta_arch != "eomt":
        raise ValueError(f"preset {cfg.name!r} is a {cfg.model.meta_arch} model, not eomt")
    state = _official_items(state)
    if is_dinov3_checkpoint(state):
        if backbone is None:
            raise ValueError("this DINOv3 EoMT checkpoint holds delta weights: give the DINOv3 backbone it was "
                             "fine-tuned from (convert --backbone FILE_OR_FOLDER, e.g. a downloaded "
                             "facebook/dinov3-vitl16-pretrain-lvd1689m)")
        if not cfg.model.backbone.name.startswith("dinov3"):
            raise ValueError(f"preset {cfg.name!r} has a {cfg.model.backbone.name} ViT; this DINOv3 checkpoint needs "
                             f"an eomt-*-dinov3-* preset")
        cfg.model.backbone.kwargs = _dinov3_vit_kwargs(cfg, state, backbone_config)
        model = build_model(cfg.model)
        converted = eomt_dinov3_state_from_official(state, dinov3_backbone_state(backbone, model.backbone.vit))
    else:
        if backbone is not None:
            raise ValueError("DINOv2 EoMT checkpoints hold the full weights: convert them without a backbone")
        model = build_model(cfg.model)
        converted = eomt_state_from_official(state)
    ours = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs preset {tuple(ours[k].shape)}" for k, v in converted.items()
                  if k in ours and isinstance(v, Tensor) and v.shape != ours[k].shape]
    if mismatched:
        raise ValueError(f"checkpoint does not fit preset {cfg.name!r}: {mismatched[:4]}")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit preset {cfg.name!r}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return cfg, model.eval()


def from_eomt_official(state: Mapping[str, Tensor], preset: str | Config, backbone: Mapping[str, Tensor] | None = None,
                       backbone_config: Mapping | None = None) -> nn.Module:
    """Our ``EoMT`` of ``preset`` (a name or a ``Config``) with the official weights, in eval mode.
    DINOv3 checkpoints need ``backbone``: the DINOv3 ViT's state dict in any layout
    :func:`load_dinov3_backbone` accepts, with its transformers config if it has one."""
    cfg = get_config(preset) if isinstance(preset, str) else preset
    return _convert_official(state, cfg, backbone, backbone_config)[1]


def convert_eomt_file(src: str | os.PathLike, out_path: str | os.PathLike, preset: str,
                      backbone: str | os.PathLike | None = None) -> Config:
    """Convert an official EoMT checkpoint file (DINOv3: with its ``backbone`` file or folder) into
    our checkpoint ``{"model", "config"}`` (written atomically); returns the ``Config`` stored with
    it (the preset's, with the ViT options the weights need)."""
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    base, base_config = load_dinov3_backbone(backbone) if backbone is not None else (None, None)
    cfg, model = _convert_official({k: v.float() if v.is_floating_point() else v for k, v in
                                    state.get("state_dict", state).items()}, get_config(preset), base, base_config)
    write_checkpoint(out_path, model, cfg)
    return cfg
