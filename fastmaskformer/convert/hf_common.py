"""Pieces shared by the Hugging Face converters (``hf`` MaskFormer, ``hf_mask2former``,
``hf_eomt``): backbone configuration and parameter names of HF's ResNet and MaskFormer-Swin
backbones, and the two-step placement of q/k/v projections into one packed tensor."""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from ..config import BackboneConfig

HF_MEAN = (0.485, 0.456, 0.406)  # ImageNet mean/std in 0-1 units, the HF image processor default
HF_STD = (0.229, 0.224, 0.225)

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



def backbone_config_from_hf(bcfg: Mapping[str, Any]) -> BackboneConfig:
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


def canonical_key(key: str) -> str:
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

def resnet_key(rest: str) -> str | None:
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


def swin_key(rest: str) -> str | None:
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
