"""fastmaskformer: MaskFormer with fused Triton kernels and a batched C++ Hungarian solver.

Public API (DESIGN 1.4)::

    import fastmaskformer as fmf
    cfg = fmf.get_config("ade20k-150-r50")
    model = fmf.build_model(cfg.model)
    out = model(images)                      # class_logits, mask_embed, pixel_embed
    fmf.ops.matching_cost(...), fmf.ops.mask_loss(...), fmf.ops.semantic_inference(...)
"""
from __future__ import annotations

import importlib

from .config import Config, get_config, list_presets

__version__ = "0.1.0"

_LAZY = {
    "ops": ("fastmaskformer.ops", None),
    "convert": ("fastmaskformer.convert", None),
    "evaluation": ("fastmaskformer.evaluation", None),
    "data": ("fastmaskformer.data", None),
    "engine": ("fastmaskformer.engine", None),
    "losses": ("fastmaskformer.losses", None),
    "modeling": ("fastmaskformer.modeling", None),
    "build_model": ("fastmaskformer.modeling", "build_model"),
    "MaskFormer": ("fastmaskformer.modeling", "MaskFormer"),
    "MaskFormerOutput": ("fastmaskformer.modeling", "MaskFormerOutput"),
    "SetCriterion": ("fastmaskformer.losses", "SetCriterion"),
    "HungarianMatcher": ("fastmaskformer.losses", "HungarianMatcher"),
    "Target": ("fastmaskformer.target", "Target"),
}


def __getattr__(name):
    # Heavy submodules (torch, timm, triton) load on first use, not on `import fastmaskformer`.
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastmaskformer' has no attribute {name!r}")


__all__ = ["Config", "get_config", "list_presets", *_LAZY]
