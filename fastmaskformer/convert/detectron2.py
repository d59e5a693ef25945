"""Official MaskFormer release (Detectron2 checkpoints) -> fastmaskformer ``MaskFormer``.

``from_detectron2(src, cfg)`` converts a state dict or a checkpoint file for the architecture of
``cfg`` (a ``Config`` or a preset name such as ``"ade20k-150-r50"``); the number of classes and
of queries are read from the checkpoint (class head and query embedding shapes).
``convert_detectron2_file(src, out, preset)`` writes our checkpoint
``{"model": state_dict, "config": Config.to_dict()}``.

Files. The model zoo's ``model_final_*.pkl`` is a pickled dict ``{"model": {name: numpy
array}, "__author__": ..., "matching_heuristics": ...}``. Unpickling runs whatever the file
names, so ``.pkl`` files are read by an unpickler that only knows how to rebuild numpy arrays
(plus dicts, strings and numbers) and refuses anything else; pickle protocols 0 to 5 load
(protocol 5 with the arrays' data in the file, not out-of-band). Detectron2's own training
checkpoints (``.pth``, torch tensors under ``"model"``) go through
``torch.load(weights_only=True)``.

Names. The mapping is written from our side: every entry of our state dict has exactly one
official name (``detectron2_name_table``), taken from the official code:
``detectron2/modeling/backbone/resnet.py`` (``stem.conv1``, ``res{2..5}.{block}.conv{1,2,3}``,
``shortcut``, each conv's norm under ``.norm``), ``projects/DeepLab/deeplab/resnet.py`` (R101c's
``DeepLabStem``: ``stem.conv1``/``conv2``/``conv3``), ``mask_former/modeling/backbone/swin.py``
(``patch_embed``, ``layers.{i}.blocks.{j}``, patch merging at the end of stage i,
``norm{i}``), ``mask_former/modeling/heads/pixel_decoder.py`` (``adapter_{i}``/``layer_{i}``
numbered by input feature res2..res5, ``mask_features``, ``input_proj``,
``transformer.encoder``) and ``mask_former/modeling/transformer/`` (``query_embed``,
``input_proj``, ``transformer.decoder.layers.{n}.{self_attn,multihead_attn,linear1,linear2,
norm1..3}``, ``transformer.decoder.norm``, ``class_embed``, ``mask_embed.layers.{k}``).

The released files predate ``MaskFormerHead`` version 2 and store the pixel decoder directly
under ``sem_seg_head.`` (``sem_seg_head.adapter_1.weight``; HF's conversion scripts read them
so). The official head renames such keys to ``sem_seg_head.pixel_decoder.`` on load; we apply
the same rename, so both spellings convert.

Every source tensor lands in our model or is one of the explicitly ignored entries
(``_IGNORED``); every entry of our state dict is filled; shapes must match. Anything else is a
``ValueError`` naming the tensors.
"""
from __future__ import annotations

import codecs
import collections
import copy
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from ..config import Config, get_config
from ..modeling import MaskFormer, build_model
from ._common import check_converted_classes, write_checkpoint

try:  # numpy >= 2 moved the array internals to numpy._core; its pickles name that module
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- safe loading
# The only globals a pickled dict of numpy arrays refers to. Arrays pickled by numpy 1.x name
# numpy.core, by numpy 2.x numpy._core; protocol-2 pickles encode bytes through _codecs.encode;
# protocol 5 rebuilds contiguous arrays with numeric._frombuffer(buffer, dtype, shape, order)
# (numpy.frombuffer + reshape), other arrays as before with multiarray._reconstruct.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _multiarray._reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _numeric._frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
    **{(module, "scalar"): _multiarray.scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other global (``os.system``,
    ``builtins.eval``, arbitrary classes), which is what makes loading an untrusted file safe."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: a Detectron2 .pkl checkpoint holds only numpy "
                "arrays, so this file is not one or has been tampered with (torch tensors belong in a "
                ".pth file, read with torch.load(weights_only=True))"
            ) from None


class _NoOutOfBandBuffers:
    """The unpickler's ``buffers``: a file carries its arrays' data in-band, so a pickle that
    asks for an out-of-band buffer (protocol 5 written with a ``buffer_callback``) cannot load."""

    def __iter__(self):
        return self

    def __next__(self):
        raise pickle.UnpicklingError(
            "its arrays were pickled out-of-band (protocol 5 with a buffer_callback), so their data is "
            "not in the file; pickle the checkpoint without a buffer_callback")


def load_detectron2_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a Detectron2 checkpoint file -> ``{official name: float32 CPU tensor}``.

    ``.pkl``: the restricted unpickler (latin1 decoding, as Detectron2 uses for pickles written
    by Python 2); anything else: ``torch.load(weights_only=True)``. A top-level ``"model"``
    entry is unwrapped; a bare ``{name: array}`` dict is accepted as well.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Detectron2 checkpoint")
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            try:
                data = _NumpyOnlyUnpickler(f, encoding="latin1", buffers=_NoOutOfBandBuffers()).load()
            except (pickle.UnpicklingError, EOFError) as e:  # EOFError: a truncated download
                raise pickle.UnpicklingError(f"{path}: {e or 'file ends early'}") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from None
    return _state_from(data, str(path))


def _state_from(data: Any, source: str) -> dict[str, Tensor]:
    """Unwrap ``{"model": ...}``, convert arrays to float32 tensors, strip a DDP ``module.``."""
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{source}: expected a (non-empty) state dict or a dict with a 'model' state dict")
    state: dict[str, Tensor] = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise ValueError(f"{source}: entry {key!r} is an object array, not numbers")
            value = torch.from_numpy(np.array(value))  # copy: the array may be read-only
        if not isinstance(value, Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not an array or tensor")
        state[str(key)] = value.float() if value.is_floating_point() else value
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------- names
def _pixel_decoder_index(k: str) -> int:
    """Our lateral/output conv k (top-down: res4, res3, res2) -> official feature index
    (``adapter_{i}``/``layer_{i}`` with i = 1..4 for res2..res5)."""
    return 3 - int(k)


# (pattern on OUR name, official name builder); the first full match wins.
_Rule = tuple[str, Callable[[re.Match], str]]
_RESNET_BODY: list[_Rule] = [
    (r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(.+)",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(.+)",
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]
_BASIC_STEM: list[_Rule] = [  # detectron2 BasicStem: one 7x7 conv; timm: conv1 + bn1
    (r"backbone\.body\.conv1\.weight", lambda m: "backbone.stem.conv1.weight"),
    (r"backbone\.body\.bn1\.(.+)", lambda m: f"backbone.stem.conv1.norm.{m[1]}"),
]
_DEEP_STEM: list[_Rule] = [  # DeepLabStem conv1..3; timm deep stem: conv1 = Sequential(conv, bn, relu, ...) + bn1
    (r"backbone\.body\.conv1\.0\.weight", lambda m: "backbone.stem.conv1.weight"),
    (r"backbone\.body\.conv1\.1\.(.+)", lambda m: f"backbone.stem.conv1.norm.{m[1]}"),
    (r"backbone\.body\.conv1\.3\.weight", lambda m: "backbone.stem.conv2.weight"),
    (r"backbone\.body\.conv1\.4\.(.+)", lambda m: f"backbone.stem.conv2.norm.{m[1]}"),
    (r"backbone\.body\.conv1\.6\.weight", lambda m: "backbone.stem.conv3.weight"),
    (r"backbone\.body\.bn1\.(.+)", lambda m: f"backbone.stem.conv3.norm.{m[1]}"),
]
_SWIN: list[_Rule] = [
    (r"backbone\.body\.patch_embed\.(.+)", lambda m: f"backbone.patch_embed.{m[1]}"),
    # block names (norm1, attn.qkv, attn.proj, attn.relative_position_bias_table, norm2,
    # mlp.fc1, mlp.fc2) are the same in timm and the official code
    (r"backbone\.body\.layers_(\d)\.blocks\.(.+)", lambda m: f"backbone.layers.{m[1]}.blocks.{m[2]}"),
    # official patch merging ends stage i; timm's starts stage i+1
    (r"backbone\.body\.layers_(\d)\.downsample\.(.+)", lambda m: f"backbone.layers.{int(m[1]) - 1}.downsample.{m[2]}"),
    (r"backbone\.norms\.(\d)\.(.+)", lambda m: f"backbone.norm{m[1]}.{m[2]}"),  # D2SwinTransformer.norm{i}
]
_PIXEL_DECODER = "sem_seg_head.pixel_decoder."
_TRANSFORMER = "sem_seg_head.predictor.transformer."
_HEAD: list[_Rule] = [
    # FPN: Conv2d(norm=GN) keeps the GroupNorm as ".norm"; ours is Sequential(conv, GN[, ReLU])
    (r"pixel_decoder\.res5_conv\.0\.weight", lambda m: _PIXEL_DECODER + "layer_4.weight"),
    (r"pixel_decoder\.res5_conv\.1\.(.+)", lambda m: _PIXEL_DECODER + f"layer_4.norm.{m[1]}"),
    (r"pixel_decoder\.lateral_convs\.(\d)\.0\.weight",
     lambda m: _PIXEL_DECODER + f"adapter_{_pixel_decoder_index(m[1])}.weight"),
    (r"pixel_decoder\.lateral_convs\.(\d)\.1\.(.+)",
     lambda m: _PIXEL_DECODER + f"adapter_{_pixel_decoder_index(m[1])}.norm.{m[2]}"),
    (r"pixel_decoder\.output_convs\.(\d)\.0\.weight",
     lambda m: _PIXEL_DECODER + f"layer_{_pixel_decoder_index(m[1])}.weight"),
    (r"pixel_decoder\.output_convs\.(\d)\.1\.(.+)",
     lambda m: _PIXEL_DECODER + f"layer_{_pixel_decoder_index(m[1])}.norm.{m[2]}"),
    (r"pixel_decoder\.(mask_features|input_proj)\.(.+)", lambda m: _PIXEL_DECODER + f"{m[1]}.{m[2]}"),
    # "+6 Enc": TransformerEncoderOnly.encoder (DETR encoder layers: FFN linears unwrapped)
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.ffn\.(linear\d)\.(.+)",
     lambda m: _PIXEL_DECODER + f"transformer.encoder.layers.{m[1]}.{m[2]}.{m[3]}"),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.(self_attn|norm1|norm2)\.(.+)",
     lambda m: _PIXEL_DECODER + f"transformer.encoder.layers.{m[1]}.{m[2]}.{m[3]}"),
    (r"pixel_decoder\.encoder\.norm\.(.+)", lambda m: _PIXEL_DECODER + f"transformer.encoder.norm.{m[1]}"),
    # DETR decoder inside TransformerPredictor.transformer
    (r"predictor\.decoder\.layers\.(\d+)\.cross_attn\.(.+)",
     lambda m: _TRANSFORMER + f"decoder.layers.{m[1]}.multihead_attn.{m[2]}"),
    (r"predictor\.decoder\.layers\.(\d+)\.ffn\.(linear\d)\.(.+)",
     lambda m: _TRANSFORMER + f"decoder.layers.{m[1]}.{m[2]}.{m[3]}"),
    (r"predictor\.decoder\.layers\.(\d+)\.(self_attn|norm1|norm2|norm3)\.(.+)",
     lambda m: _TRANSFORMER + f"decoder.layers.{m[1]}.{m[2]}.{m[3]}"),
    (r"predictor\.decoder\.norm\.(.+)", lambda m: _TRANSFORMER + f"decoder.norm.{m[1]}"),
    (r"predictor\.(query_embed|input_proj|class_embed|mask_embed)\.(.+)",
     lambda m: f"sem_seg_head.predictor.{m[1]}.{m[2]}"),
]

# Mask2Former (mask2former/modeling/pixel_decoder/msdeformattn.py and
# transformer_decoder/mask2former_transformer_decoder.py): the deformable pixel decoder keeps its
# encoder under ``transformer.`` and its one FPN level as ``adapter_1`` / ``layer_1`` (res2; conv
# without bias + ``.norm``); the decoder's layers are three lists of sub-layers.
_M2F_PREDICTOR = "sem_seg_head.predictor."
_M2F_HEAD: list[_Rule] = [
    (r"pixel_decoder\.level_embed", lambda m: _PIXEL_DECODER + "transformer.level_embed"),
    (r"pixel_decoder\.input_proj\.(.+)", lambda m: _PIXEL_DECODER + f"input_proj.{m[1]}"),
    (r"pixel_decoder\.encoder\.(\d+)\.(.+)", lambda m: _PIXEL_DECODER + f"transformer.encoder.layers.{m[1]}.{m[2]}"),
    (r"pixel_decoder\.(lateral|output)_convs\.(\d)\.0\.weight",
     lambda m: _PIXEL_DECODER + f"{'adapter' if m[1] == 'lateral' else 'layer'}_{int(m[2]) + 1}.weight"),
    (r"pixel_decoder\.(lateral|output)_convs\.(\d)\.1\.(.+)",
     lambda m: _PIXEL_DECODER + f"{'adapter' if m[1] == 'lateral' else 'layer'}_{int(m[2]) + 1}.norm.{m[3]}"),
    (r"pixel_decoder\.mask_features\.(.+)", lambda m: _PIXEL_DECODER + f"mask_features.{m[1]}"),
    (r"predictor\.cross_attention_layers\.(\d+)\.attn\.(.+)",
     lambda m: _M2F_PREDICTOR + f"transformer_cross_attention_layers.{m[1]}.multihead_attn.{m[2]}"),
    (r"predictor\.cross_attention_layers\.(\d+)\.norm\.(.+)",
     lambda m: _M2F_PREDICTOR + f"transformer_cross_attention_layers.{m[1]}.norm.{m[2]}"),
    (r"predictor\.self_attention_layers\.(\d+)\.attn\.(.+)",
     lambda m: _M2F_PREDICTOR + f"transformer_self_attention_layers.{m[1]}.self_attn.{m[2]}"),
    (r"predictor\.self_attention_layers\.(\d+)\.norm\.(.+)",
     lambda m: _M2F_PREDICTOR + f"transformer_self_attention_layers.{m[1]}.norm.{m[2]}"),
    (r"predictor\.ffn_layers\.(\d+)\.ffn\.(linear\d)\.(.+)",
     lambda m: _M2F_PREDICTOR + f"transformer_ffn_layers.{m[1]}.{m[2]}.{m[3]}"),
    (r"predictor\.ffn_layers\.(\d+)\.norm\.(.+)",
     lambda m: _M2F_PREDICTOR + f"transformer_ffn_layers.{m[1]}.norm.{m[2]}"),
    (r"predictor\.(decoder_norm|query_feat|query_embed|level_embed|input_proj|class_embed|mask_embed)\.(.+)",
     lambda m: _M2F_PREDICTOR + f"{m[1]}.{m[2]}"),
]

# Official entries with no counterpart in our state dict, on purpose.
_IGNORED = re.compile(
    r"pixel_mean|pixel_std"  # input normalisation: from our config (checked against it)
    r"|criterion\.empty_weight"  # the loss's class weights (no-object 0.1), rebuilt by our criterion
    r"|.*\.num_batches_tracked"  # BatchNorm step counter; frozen BN does not use it
    r"|backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index"  # fixed index, timm rebuilds it
)


def _rules_for(our_keys: set[str]) -> list[_Rule]:
    if any(k.startswith("backbone.norms.") for k in our_keys):
        backbone = _SWIN
    elif "backbone.body.conv1.0.weight" in our_keys:
        backbone = _DEEP_STEM + _RESNET_BODY
    else:
        backbone = _BASIC_STEM + _RESNET_BODY
    return backbone + (_M2F_HEAD if "predictor.query_feat.weight" in our_keys else _HEAD)


def detectron2_name_table(model: MaskFormer) -> dict[str, str]:
    """``{official Detectron2 name: our state-dict name}`` for every entry of ``model``'s state
    dict (BatchNorm step counters excepted: frozen BatchNorm has none, and a training one keeps
    its own). The official names are the current code's (``sem_seg_head.pixel_decoder.*``)."""
    from ..modeling import Mask2Former

    if not isinstance(model, (MaskFormer, Mask2Former)):
        raise TypeError(f"Detectron2 conversion targets MaskFormer or Mask2Former, got {type(model).__name__}")
    our_keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    rules = _rules_for(our_keys)
    table: dict[str, str] = {}
    for key in sorted(our_keys):
        for pattern, official in rules:
            m = re.fullmatch(pattern, key)
            if m:
                table[official(m)] = key
                break
        else:  # our model grew a parameter this converter does not know: a bug here, not in the file
            raise RuntimeError(f"no official Detectron2 name for our parameter {key!r}; update convert/detectron2.py")
    return table


def _canonical(key: str) -> str:
    """Release-file spelling -> current official spelling: the rename of the official
    ``MaskFormerHead._load_from_state_dict`` for checkpoints older than head version 2."""
    head = "sem_seg_head."
    if key.startswith(head) and not key.startswith((head + "predictor.", _PIXEL_DECODER)):
        return _PIXEL_DECODER + key[len(head):]
    return key


# ----------------------------------------------------------------------------- conversion
def _layer_count(keys, prefix: str) -> int:
    found = {int(m[1]) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _config_for(state: Mapping[str, Tensor], cfg: Config | str) -> Config:
    """The conversion's config: ``cfg`` (a copy) with the checkpoint's number of classes and
    queries. Structural differences the checkpoint shows get a targeted error here."""
    cfg = get_config(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)  # never edit the caller's
    model_cfg = cfg.model
    if model_cfg.meta_arch not in ("maskformer", "mask2former"):
        raise ValueError(f"Detectron2 conversion builds MaskFormer or Mask2Former, config has "
                         f"meta_arch={model_cfg.meta_arch!r}")
    m2f_key = _M2F_PREDICTOR + "query_feat.weight"
    if (m2f_key in state) != (model_cfg.meta_arch == "mask2former"):
        raise ValueError(f"checkpoint is a {'Mask2Former' if m2f_key in state else 'MaskFormer'} model, config "
                         f"{cfg.name!r} has meta_arch={model_cfg.meta_arch!r}")
    for needed in ("sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.query_embed.weight"):
        if needed not in state:
            raise ValueError(f"not a MaskFormer checkpoint: no {needed!r}")
    num_classes = state["sem_seg_head.predictor.class_embed.weight"].shape[0] - 1  # last row = "no object"
    if num_classes != model_cfg.num_classes:
        warnings.warn(f"checkpoint has {num_classes} classes, config {cfg.name!r} has {model_cfg.num_classes}: "
                      f"the model gets {num_classes} (check that the config's dataset matches)", stacklevel=3)
    model_cfg.num_classes = num_classes
    model_cfg.num_queries = state["sem_seg_head.predictor.query_embed.weight"].shape[0]

    is_swin = any(k.startswith("backbone.patch_embed.") for k in state)
    if is_swin != model_cfg.backbone.name.startswith("swin"):
        raise ValueError(f"checkpoint has a {'Swin' if is_swin else 'ResNet'} backbone, config "
                         f"{cfg.name!r} has backbone {model_cfg.backbone.name!r}")
    if model_cfg.meta_arch == "mask2former":
        # dec_layers counts predictions (layers + 1); the pixel decoder's encoder depth is a kwarg.
        enc = _layer_count(state, _PIXEL_DECODER + "transformer.encoder.layers.")
        model_cfg.pixel_decoder_kwargs = {**model_cfg.pixel_decoder_kwargs, "enc_layers": enc}
        counts = {"model.dec_layers": (_layer_count(state, _M2F_PREDICTOR + "transformer_ffn_layers.") + 1,
                                       model_cfg.dec_layers)}
    else:
        counts = {
            "model.dec_layers": (_layer_count(state, _TRANSFORMER + "decoder.layers."), model_cfg.dec_layers),
            "model.enc_layers": (_layer_count(state, _PIXEL_DECODER + "transformer.encoder.layers."),
                                 model_cfg.enc_layers),
        }
    for key, (found, configured) in counts.items():
        if found != configured:
            raise ValueError(f"checkpoint has {found} layers where config {cfg.name!r} has {key}={configured}")
    if _layer_count(state, _TRANSFORMER + "encoder.layers."):
        raise ValueError("checkpoint has transformer encoder layers inside the predictor "
                         "(MODEL.MASK_FORMER.ENC_LAYERS > 0): not supported")
    return cfg


def _check_normalisation(state: Mapping[str, Tensor], cfg: Config) -> None:
    for name in ("pixel_mean", "pixel_std"):
        if name in state:
            ours = torch.tensor(getattr(cfg.model, name), dtype=torch.float32)
            theirs = state[name].flatten()
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-3):
                warnings.warn(f"checkpoint {name} {theirs.tolist()} differs from the config's {ours.tolist()}; "
                              "the model keeps the config's", stacklevel=3)


def _convert(source: Mapping[str, Tensor], cfg: Config | str) -> tuple[Config, MaskFormer]:
    state: dict[str, Tensor] = {}
    for key, value in source.items():
        canonical = _canonical(key)
        if canonical in state:
            raise ValueError(f"checkpoint holds {canonical!r} twice (as {key!r} and in its current spelling)")
        state[canonical] = value
    cfg = _config_for(state, cfg)
    _check_normalisation(state, cfg)
    model = build_model(cfg.model)
    table = detectron2_name_table(model)
    ours = model.state_dict()

    unknown = sorted(k for k in state if k not in table and not _IGNORED.fullmatch(k))
    missing = sorted(k for k in table if k not in state)
    if unknown or missing:
        raise ValueError(
            "Detectron2 checkpoint does not match the config's architecture:"
            + (f"\n  checkpoint tensors with no fastmaskformer destination: {_listing(unknown)}" if unknown else "")
            + (f"\n  official tensors missing from the checkpoint: {_listing(missing)}" if missing else "")
        )
    converted = {}
    mismatched = []
    for official, key in table.items():
        value = state[official]
        if value.shape != ours[key].shape:
            mismatched.append(f"{official} -> {key}: checkpoint {tuple(value.shape)}, model {tuple(ours[key].shape)}")
        converted[key] = value.to(ours[key].dtype)
    if mismatched:
        raise ValueError("shape mismatch:\n  " + "\n  ".join(mismatched))
    model.load_state_dict(converted, strict=False)  # strict would demand num_batches_tracked of a training BN
    return cfg, model.eval()


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------- public API
def from_detectron2(state_dict_or_path: Mapping[str, Any] | str | os.PathLike, cfg: Config | str) -> MaskFormer:
    """Official MaskFormer weights -> our ``MaskFormer`` (eval mode, CPU, float32).

    state_dict_or_path: a checkpoint file (``.pkl`` model zoo or ``.pth``), or an in-memory state
    dict (numpy arrays or tensors; a ``{"model": ...}`` wrapper is unwrapped).
    cfg: the architecture, a ``Config`` or a preset name; the number of classes and queries come
    from the checkpoint. Raises ``ValueError`` naming every tensor that does not fit.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state = load_detectron2_checkpoint(state_dict_or_path)
    else:
        state = _state_from(state_dict_or_path, "state dict")
    return _convert(state, cfg)[1]


def convert_detectron2_file(src_path: str | os.PathLike, out_path: str | os.PathLike,
                            preset: Config | str) -> Config:
    """Convert an official checkpoint file into our checkpoint ``{"model", "config"}`` at
    ``out_path`` (written atomically). Returns the stored ``Config``: ``preset`` with the
    checkpoint's number of classes and queries. Raises LabelSpaceError when those classes are not
    the preset's dataset's (nothing written)."""
    cfg, model = _convert(load_detectron2_checkpoint(src_path), preset)
    check_converted_classes(cfg, src_path)
    logger.info("converted %s (%d classes, %d queries) -> %s", src_path, cfg.model.num_classes,
                cfg.model.num_queries, out_path)
    write_checkpoint(out_path, model, cfg)
    return cfg
