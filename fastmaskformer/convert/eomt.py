"""The official EoMT release (tue-mps/eomt, DINOv2 models) -> fastmaskformer ``EoMT``.

The published ``pytorch_model.bin`` files hold the Lightning module's state dict: the network
under ``network.`` (``encoder.backbone.*`` = timm's ViT, ``q``, ``class_head``, ``mask_head``,
``upscale``, ``attn_mask_probs``) beside the criterion's ``criterion.empty_weight``. The
architecture (width, depth, queries, query blocks, input size) comes from a preset
(``convert --from eomt FILE --preset eomt-coco-panoptic-dinov2-large-640``), checked against the
tensors' shapes.

DINOv3 checkpoints (``configs/dinov3``) do not convert: they store *delta* weights relative to
the DINOv3 backbone (``delta_weights: True``) in transformers' ``DINOv3ViTModel`` layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..config import Config, get_config
from ..modeling import build_model
from ._common import write_checkpoint
from .hf_eomt import annealing_state

_RENAMES = [  # official prefix -> ours
    ("network.encoder.backbone.", "backbone.vit."),
    ("network.q.", "queries."),
    ("network.class_head.", "class_head."),
    ("network.mask_head.", "mask_head."),
    ("network.upscale.", "upscale."),
]
_SKIPPED = ("criterion.empty_weight", "network.encoder.pixel_mean", "network.encoder.pixel_std",
            "network.attn_mask_probs")


def eomt_state_from_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official ``network.*`` state dict (``state_dict`` of a Lightning checkpoint or the bare
    ``pytorch_model.bin``) -> ours, the mask-annealing probabilities included. Raises a
    ValueError naming tensors with no destination."""
    state = state.get("state_dict", state)
    if any(k.startswith("network.encoder.backbone.embeddings.") or ".attention.q_proj." in k for k in state):
        raise ValueError("this is a DINOv3 EoMT checkpoint (delta weights over transformers' DINOv3ViTModel); "
                         "only the DINOv2 releases convert")
    out, unknown = {}, []
    for key, value in state.items():
        key = key.replace("._orig_mod", "")  # written from a torch.compile'd network
        if key in _SKIPPED:
            continue
        for prefix, ours in _RENAMES:
            if key.startswith(prefix):
                out[ours + key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"official EoMT tensors with no fastmaskformer destination: {unknown[:8]}")
    if "network.attn_mask_probs" not in state:
        raise ValueError("not an official EoMT checkpoint: no network.attn_mask_probs")
    out["mask_annealing._extra_state"] = annealing_state(state["network.attn_mask_probs"])
    return out


def from_eomt_official(state: Mapping[str, Tensor], preset: str | Config) -> nn.Module:
    """Our ``EoMT`` of ``preset`` (a name or a ``Config``) with the official weights, in eval mode."""
    cfg = get_config(preset) if isinstance(preset, str) else preset
    if cfg.model.meta_arch != "eomt":
        raise ValueError(f"preset {cfg.name!r} is a {cfg.model.meta_arch} model, not eomt")
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
    return model.eval()


def convert_eomt_file(src: str | os.PathLike, out_path: str | os.PathLike, preset: str) -> Config:
    """Convert an official EoMT checkpoint file into our checkpoint ``{"model", "config"}``
    (written atomically); returns the preset's ``Config`` stored with it."""
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = get_config(preset)
    model = from_eomt_official({k: v.float() if v.is_floating_point() else v for k, v in
                                state.get("state_dict", state).items()}, cfg)
    write_checkpoint(out_path, model, cfg)
    return cfg
