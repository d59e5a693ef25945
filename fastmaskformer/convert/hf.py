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
from torch import Tensor

from ..config import BackboneConfig, Config, ModelConfig
from ..modeling import MaskFormer, build_model
from ._common import fitting_dataset, write_checkpoint

_HF_MEAN = (0.485, 0.456, 0.406)  # ImageNet mean/std in 0-1 units, the HF image processor default
_HF_STD = (0.229, 0.224, 0.225)

# (depths, widths) of the standard ResNets -> our alias
_RESNETS = {
    ((3, 4, 6, 3), (256, 512, 1024, 2048), 64): "resnet50",
    ((3, 4, 23, 3), (256, 512, 1024, 2048), 64): "resnet101",
}
# (embed_dim, depths, num_heads, window) of the official Swins -> our alias
_SWINS = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24), 7): "swin_tiny",
    (96, (2, 2, 18, 2), (3, 6, 12, 24), 7): "swin_small",
    (128, (2, 2, 18, 2), (4, 8, 16, 32), 12): "swin_base",
    (192, (2, 2, 18, 2), (6, 12, 24, 48), 12): "swin_large",
}
_SWIN_DROP_PATH = 0.3  # the alias default (official)


# ----------------------------------------------------------------------------- configuration
def _backbone_config(bcfg: Mapping[str, Any]) -> BackboneConfig:
    kind = bcfg.get("model_type")
    if kind == "resnet":
        if bcfg.get("layer_type", "bottleneck") != "bottleneck" or bcfg.get("downsample_in_bottleneck", False) \
                or bcfg.get("downsample_in_first_stage", False) or bcfg.get("hidden_act", "relu") != "relu":
            raise ValueError("only bottleneck ResNets with the stride in the 3x3 conv (torchvision style) convert")
        depths, widths = tuple(bcfg["depths"]), tuple(bcfg["hidden_sizes"])
        stem = int(bcfg.get("embedding_size", 64))
        name = _RESNETS.get((depths, widths, stem))
        if name is not None:
            return BackboneConfig(name=name, freeze_bn=True)
        if stem != 64:
            raise ValueError(f"HF ResNet embedding_size={stem}: timm's 7x7 stem always has 64 channels")
        # timm's bottleneck has 4x expansion: stage width = hidden_size / 4
        kwargs = {"layers": list(depths), "channels": [w // 4 for w in widths]}
        return BackboneConfig(name="resnet50", freeze_bn=True, kwargs=kwargs)
    if kind in ("maskformer-swin", "swin"):
        if bcfg.get("use_absolute_embeddings", False) or int(bcfg.get("patch_size", 4)) != 4:
            raise ValueError("only Swin with patch size 4 and no absolute position embedding converts")
        key = (int(bcfg["embed_dim"]), tuple(bcfg["depths"]), tuple(bcfg["num_heads"]), int(bcfg["window_size"]))
        image_size = bcfg.get("image_size", 224)
        image_size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
        kwargs: dict[str, Any] = {}
        drop_path = float(bcfg.get("drop_path_rate", _SWIN_DROP_PATH))
        if drop_path != _SWIN_DROP_PATH:
            kwargs["drop_path_rate"] = drop_path
        if float(bcfg.get("mlp_ratio", 4.0)) != 4.0:
            kwargs["mlp_ratio"] = float(bcfg["mlp_ratio"])
        if not bcfg.get("qkv_bias", True):
            kwargs["qkv_bias"] = False
        name = _SWINS.get(key)
        if name is None:
            name = "swin_tiny"
            kwargs.update(embed_dim=key[0], depths=list(key[1]), num_heads=list(key[2]), window_size=key[3])
        return BackboneConfig(name=name, freeze_bn=False, img_size=image_size, kwargs=kwargs)
    raise ValueError(f"unsupported HF backbone model_type {kind!r} (resnet or maskformer-swin)")


def model_config_from_hf(hf_config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> ModelConfig:
    """Our ``ModelConfig`` from a HF ``MaskFormerConfig`` as a dict (``config.json``)."""
    dcfg = hf_config["decoder_config"]
    if "id2label" in hf_config:
        num_classes = len(hf_config["id2label"])
    else:
        num_classes = int(hf_config["num_labels"])
    mean, std = _HF_MEAN, _HF_STD
    if preprocessor:
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    return ModelConfig(
        meta_arch="maskformer",
        backbone=_backbone_config(hf_config["backbone_config"]),
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
def _canonical(key: str) -> str:
    """transformers 5.x in-memory names -> the 4.x names the rules below use."""
    return key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.")


_SWIN_BLOCK_RULES = [  # inside "model.encoder.layers.{i}.blocks.{j}." -> "layers_{i}.blocks.{j}."
    ("layernorm_before", "norm1"),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.output.dense", "attn.proj"),
    ("layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
]

_DECODER_LAYER_RULES = [  # inside "decoder.layers.{i}." -> "predictor.decoder.layers.{i}."
    ("self_attn.out_proj", "self_attn.out_proj"),
    ("encoder_attn.out_proj", "cross_attn.out_proj"),
    ("self_attn_layer_norm", "norm1"),
    ("encoder_attn_layer_norm", "norm2"),
    ("fc1", "ffn.linear1"),
    ("fc2", "ffn.linear2"),
    ("final_layer_norm", "norm3"),
]


def _resnet_key(rest: str) -> str | None:
    """``rest`` follows "model.pixel_level_module.encoder." (HF ResNetBackbone) -> timm ResNet."""
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(.+)", rest)
    if m:
        return f"backbone.body.{'conv1' if m.group(1) == 'convolution' else 'bn1'}.{m.group(2)}"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.(convolution|normalization)"
                     r"\.(.+)", rest)
    if m is None:
        return None
    stage, block, which, conv_index, part, leaf = m.groups()
    if which == "shortcut":
        name = "downsample." + ("0" if part == "convolution" else "1")
    else:  # HF layer.0/1/2 = timm conv1/2/3 (+ bn1/2/3)
        name = ("conv" if part == "convolution" else "bn") + str(int(conv_index) + 1)
    return f"backbone.body.layer{int(stage) + 1}.{block}.{name}.{leaf}"


def _swin_key(rest: str) -> str | None:
    """``rest`` follows "model.pixel_level_module.encoder."; q/k/v give "<packed key>#<q|k|v>"."""
    if rest.startswith("hidden_states_norms."):
        return "backbone.norms." + rest[len("hidden_states_norms."):]
    m = re.fullmatch(r"model\.embeddings\.patch_embeddings\.projection\.(.+)", rest)
    if m:
        return "backbone.body.patch_embed.proj." + m.group(1)
    m = re.fullmatch(r"model\.embeddings\.norm\.(.+)", rest)
    if m:
        return "backbone.body.patch_embed.norm." + m.group(1)
    m = re.fullmatch(r"model\.encoder\.layers\.(\d+)\.downsample\.(.+)", rest)
    if m:  # HF merges patches at the end of stage i, timm at the start of stage i+1
        return f"backbone.body.layers_{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    m = re.fullmatch(r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", rest)
    if m:
        prefix = f"backbone.body.layers_{m.group(1)}.blocks.{m.group(2)}."
        inner = m.group(3)
        qkv = re.fullmatch(r"attention\.self\.(query|key|value)\.(weight|bias)", inner)
        if qkv:
            return f"{prefix}attn.qkv.{qkv.group(2)}#{qkv.group(1)[0]}"
        for hf, ours in _SWIN_BLOCK_RULES:
            if inner == hf or inner.startswith(hf + "."):
                return prefix + ours + inner[len(hf):]
    return None


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
        key = _canonical(raw_key)
        if _SKIP.fullmatch(key):
            continue
        if key.startswith(backbone_prefix):
            rest = key[len(backbone_prefix):]
            ours = _resnet_key(rest) if backbone_kind == "resnet" else _swin_key(rest)
        else:
            ours = _head_key(key)
        if ours is None:
            unknown.append(raw_key)
            continue
        place(out, packed, ours, value)
    return finish_state(out, packed, unknown, "HF")


def place(out: dict, packed: dict, ours: str, value: Tensor) -> None:
    """Put one converted tensor at our key; ``target#q|k|v`` parts wait in ``packed`` for
    :func:`finish_state` to join them into one in-projection."""
    if "#" in ours:
        target, part = ours.split("#")
        packed.setdefault(target, {})[part] = value
    else:
        out[ours] = value


def finish_state(out: dict, packed: dict, unknown: list, source: str) -> dict[str, Tensor]:
    """ValueError for keys with no destination; q/k/v parts joined; the converted state."""
    if unknown:
        raise ValueError(f"{source} parameters with no fastmaskformer destination: {unknown[:8]}"
                         + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    for target, parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete q/k/v projections for {target}: found {sorted(parts)}")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _load_into(model: MaskFormer, state: dict[str, Tensor]) -> MaskFormer:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"HF conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


def _convert(hf_config: Mapping[str, Any], hf_state: Mapping[str, Tensor],
             preprocessor: Mapping[str, Any] | None = None) -> tuple[ModelConfig, MaskFormer]:
    if hf_config.get("model_type") == "mask2former":
        from .hf_mask2former import mask2former_config_from_hf, mask2former_state_from_hf

        model_cfg = mask2former_config_from_hf(hf_config, preprocessor)
        kind = "swin" if model_cfg.backbone.name.startswith("swin") else "resnet"
        return model_cfg, _load_into(build_model(model_cfg), mask2former_state_from_hf(hf_state, kind))
    model_cfg = model_config_from_hf(hf_config, preprocessor)
    kind = "swin" if model_cfg.backbone.name.startswith("swin") else "resnet"
    model = build_model(model_cfg)
    return model_cfg, _load_into(model, convert_state_dict(hf_state, kind))


# ----------------------------------------------------------------------------- public API
def from_hf(hf_model) -> MaskFormer:
    """A ``transformers.MaskFormerForInstanceSegmentation`` (in memory) -> our ``MaskFormer``, or a
    ``Mask2FormerForUniversalSegmentation`` (ResNet or Swin backbone) -> our ``Mask2Former``, with the
    same weights, in eval mode on the CPU, float32."""
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
    if hf_config.get("model_type") != "maskformer":
        raise ValueError(f"{config_path}: model_type {hf_config.get('model_type')!r}, expected 'maskformer'")
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


def load_hf_pretrained(src_dir: str | os.PathLike) -> MaskFormer:
    """Read a saved HF MaskFormer directory offline (transformers is not needed) -> ``MaskFormer``
    in eval mode. Normalisation constants come from ``preprocessor_config.json`` when present."""
    hf_config, state, preprocessor = _read_hf_directory(src_dir)
    return _convert(hf_config, state, preprocessor)[1].eval()


def convert_hf_directory(src_dir: str | os.PathLike, out_path: str | os.PathLike) -> Config:
    """Convert a saved HF MaskFormer directory into our checkpoint ``{"model", "config"}`` at
    ``out_path`` (written atomically: temporary file in the same folder, then ``os.replace``).
    Returns the ``Config`` stored with it (model section from HF, the dataset whose label space has
    its number of classes, other sections default)."""
    hf_config, state, preprocessor = _read_hf_directory(src_dir)
    model_cfg, model = _convert(hf_config, state, preprocessor)
    cfg = Config(model=model_cfg, name=f"hf-{Path(src_dir).resolve().name}")
    cfg.data.dataset = fitting_dataset(cfg, cfg.name)  # a 133-class model: coco-panoptic, not the default
    write_checkpoint(out_path, model, cfg)
    return cfg
