"""Official MaskFormer (Detectron2) checkpoints -> fastmaskformer.

Real model-zoo files cannot be downloaded here, so the tests write them: our model's weights are
renamed to the official names by a table written in this file (independently of the converter:
the ResNet part follows the official ``tools/convert-torchvision-to-d2.py`` replacement rules,
the rest the official module names), pickled as Detectron2 does (numpy arrays under "model"),
converted back, and the outputs compared. The official R50 name set is pinned by names
transcribed from the official code.
"""
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from fastmaskformer.config import Config, get_config
from fastmaskformer.convert import (
    convert_detectron2_file,
    detectron2_name_table,
    from_detectron2,
    load_detectron2_checkpoint,
)
from fastmaskformer.data.metadata import LabelSpaceError
from fastmaskformer.modeling import build_model

torch.set_num_threads(2)
NUM_CLASSES, NUM_QUERIES = 5, 7
BN = ("weight", "bias", "running_mean", "running_var")

BACKBONES = {  # small versions of the official backbones
    "r50": ("resnet50", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}),
    "r101c": ("resnet101c", {"layers": [1, 1, 2, 1], "channels": [8, 16, 32, 64], "stem_width": 16}),
    "swin": ("swin_tiny", {"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 4}),
}


def _small_config(backbone: str, enc_layers: int = 0) -> Config:
    cfg = get_config("ade20k-150-r50")
    m = cfg.model
    m.backbone.name, m.backbone.kwargs = BACKBONES[backbone]
    m.backbone.freeze_bn = backbone != "swin"
    m.backbone.img_size = 64
    m.num_classes, m.num_queries = NUM_CLASSES, NUM_QUERIES
    m.hidden_dim = m.mask_dim = m.conv_dim = 32
    m.nheads, m.dim_feedforward, m.dec_layers, m.enc_layers = 4, 64, 2, enc_layers
    return cfg


def _random_model(cfg: Config, seed: int = 0):
    """Our model with every weight and statistic moved off its initialisation."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    return model


def test_convert_file_of_another_label_space(tmp_path):
    """A 5-class checkpoint under a preset whose dataset has 150 classes: one line naming both,
    nothing written (a predict or export of such a file would index past the label space)."""
    cfg = _small_config("r50")
    _write_pkl(tmp_path / "model_final_abc.pkl", _official_state(_random_model(cfg)))
    out = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the class-count warning of the model-only API
        with pytest.raises(LabelSpaceError, match="checkpoint .*model_final_abc.pkl has 5 classes but dataset "
                                                  "ade20k-150 has 150"):
            convert_detectron2_file(tmp_path / "model_final_abc.pkl", out, cfg)
    assert not out.exists()


# ----------------------------------------------------------------------------- official names
_DEEP_STEM = {  # timm deep stem (Sequential conv, bn, relu, ...) -> DeepLabStem conv1..3
    "conv1.0": "stem.conv1", "conv1.1": "stem.conv1.norm", "conv1.3": "stem.conv2",
    "conv1.4": "stem.conv2.norm", "conv1.6": "stem.conv3", "bn1": "stem.conv3.norm",
}
_HEAD = [  # (our prefix, official prefix); indices of adapter_/layer_ count res2..res5 as 1..4
    ("pixel_decoder.res5_conv.0.", "sem_seg_head.pixel_decoder.layer_4."),
    ("pixel_decoder.res5_conv.1.", "sem_seg_head.pixel_decoder.layer_4.norm."),
    *[(f"pixel_decoder.lateral_convs.{k}.0.", f"sem_seg_head.pixel_decoder.adapter_{i}.") for k, i in
      zip(range(3), (3, 2, 1))],
    *[(f"pixel_decoder.lateral_convs.{k}.1.", f"sem_seg_head.pixel_decoder.adapter_{i}.norm.") for k, i in
      zip(range(3), (3, 2, 1))],
    *[(f"pixel_decoder.output_convs.{k}.0.", f"sem_seg_head.pixel_decoder.layer_{i}.") for k, i in
      zip(range(3), (3, 2, 1))],
    *[(f"pixel_decoder.output_convs.{k}.1.", f"sem_seg_head.pixel_decoder.layer_{i}.norm.") for k, i in
      zip(range(3), (3, 2, 1))],
    ("pixel_decoder.mask_features.", "sem_seg_head.pixel_decoder.mask_features."),
    ("pixel_decoder.input_proj.", "sem_seg_head.pixel_decoder.input_proj."),
    ("pixel_decoder.encoder.", "sem_seg_head.pixel_decoder.transformer.encoder."),
    ("predictor.decoder.", "sem_seg_head.predictor.transformer.decoder."),
    ("predictor.", "sem_seg_head.predictor."),
]


def _official_name(ours: str, deep_stem: bool) -> str:
    if ours.startswith("backbone.body.") and "layers_" not in ours and "patch_embed" not in ours:
        k = ours[len("backbone.body."):]
        for timm_name, d2_name in _DEEP_STEM.items():
            if deep_stem and k.startswith(timm_name + "."):
                return "backbone." + d2_name + k[len(timm_name):]
        # tools/convert-torchvision-to-d2.py, inverted onto timm's (= torchvision's) names
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        return "backbone." + k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    if ours.startswith("backbone."):  # Swin
        m = re.fullmatch(r"backbone\.body\.layers_(\d)\.downsample\.(.+)", ours)
        if m:
            return f"backbone.layers.{int(m[1]) - 1}.downsample.{m[2]}"
        m = re.fullmatch(r"backbone\.norms\.(\d)\.(.+)", ours)
        if m:
            return f"backbone.norm{m[1]}.{m[2]}"
        return re.sub(r"^backbone\.body\.layers_(\d)\.", r"backbone.layers.\1.", ours).replace("body.", "")
    for prefix, official in _HEAD:
        if ours.startswith(prefix):
            rest = ours[len(prefix):]
            rest = rest.replace("cross_attn.", "multihead_attn.").replace("ffn.", "")
            return official + rest
    raise AssertionError(f"test table has no official name for {ours}")


def _official_state(model, release_layout: bool = False) -> dict:
    """Our weights under official names, as numpy arrays. release_layout: the model-zoo files'
    pre-v2 head spelling ``sem_seg_head.adapter_1`` (no ``pixel_decoder.``)."""
    state = model.state_dict()
    deep_stem = "backbone.body.conv1.0.weight" in state
    out = {}
    for k, v in state.items():
        name = _official_name(k, deep_stem)
        if release_layout:
            name = name.replace("sem_seg_head.pixel_decoder.", "sem_seg_head.")
        out[name] = v.detach().numpy().copy()
    return out


def _write_pkl(path, state: dict, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    with open(path, "wb") as f:  # as the model zoo's files: numpy arrays, author, heuristics flag
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f,
                    protocol=protocol)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _assert_same_outputs(a, b):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for t1, t2 in zip(oa.as_tuple(), ob.as_tuple()):
        assert torch.equal(t1, t2)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("backbone,enc_layers,release_layout", [
    ("r50", 0, False), ("r50", 0, True), ("r101c", 1, True), ("swin", 0, True),
])
def test_pkl_roundtrip(tmp_path, backbone, enc_layers, release_layout):
    cfg = _small_config(backbone, enc_layers)
    ours = _random_model(cfg)
    state = _official_state(ours, release_layout)
    state["pixel_mean"] = np.array(cfg.model.pixel_mean, np.float32).reshape(3, 1, 1)
    state["criterion.empty_weight"] = np.ones(NUM_CLASSES + 1, np.float32)
    if backbone == "swin":  # the official checkpoints carry this buffer; it is ignored
        state["backbone.layers.0.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), np.int64)
    _write_pkl(tmp_path / "model_final.pkl", state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching classes and normalisation: no warning
        converted = from_detectron2(tmp_path / "model_final.pkl", cfg)
    _assert_same_weights(ours, converted)
    _assert_same_outputs(ours, converted)


def test_pth_and_in_memory(tmp_path):
    cfg = _small_config("r50")
    ours = _random_model(cfg, seed=1)
    state = _official_state(ours)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "iteration": 3}, tmp_path / "m.pth")
    _assert_same_weights(ours, from_detectron2(tmp_path / "m.pth", cfg))
    _assert_same_weights(ours, from_detectron2({"model": state}, cfg))
    ddp = {"module." + k: v for k, v in state.items()}  # saved from a DistributedDataParallel wrapper
    _assert_same_weights(ours, from_detectron2(ddp, cfg))


def test_classes_and_queries_from_checkpoint():
    ours = _random_model(_small_config("r50"))
    cfg = _small_config("r50")
    cfg.model.num_classes, cfg.model.num_queries = 150, 100
    with pytest.warns(UserWarning, match="checkpoint has 5 classes"):
        converted = from_detectron2(_official_state(ours), cfg)
    assert converted.predictor.class_embed.out_features == NUM_CLASSES + 1
    assert converted.predictor.query_embed.num_embeddings == NUM_QUERIES
    assert cfg.model.num_classes == 150  # the caller's config is not modified
    _assert_same_weights(ours, converted)


def test_convert_file(tmp_path):
    cfg = _small_config("r101c", enc_layers=1)
    cfg.model.num_classes, cfg.data.dataset = 19, "cityscapes"  # classes of the config's dataset
    ours = _random_model(cfg)
    _write_pkl(tmp_path / "model_final_abc.pkl", _official_state(ours))
    out = tmp_path / "out" / "model.pt"
    saved_cfg = convert_detectron2_file(tmp_path / "model_final_abc.pkl", out, cfg)
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    rebuilt_cfg = Config.from_dict(ckpt["config"])
    assert rebuilt_cfg.model == saved_cfg.model == cfg.model
    rebuilt = build_model(rebuilt_cfg.model).eval()
    rebuilt.load_state_dict(ckpt["model"])
    _assert_same_outputs(ours, rebuilt)


# ----------------------------------------------------------------------------- official names
# Transcribed from the official code: detectron2/modeling/backbone/resnet.py (BasicStem,
# BottleneckBlock, ResNet "res{i}"), mask_former/modeling/heads/pixel_decoder.py,
# mask_former/modeling/transformer/{transformer,transformer_predictor}.py.
TRANSCRIBED_R50 = [
    "backbone.stem.conv1.weight", "backbone.stem.conv1.norm.weight", "backbone.stem.conv1.norm.running_var",
    "backbone.res2.0.shortcut.weight", "backbone.res2.0.shortcut.norm.bias", "backbone.res2.0.conv1.weight",
    "backbone.res2.2.conv3.norm.running_mean", "backbone.res4.5.conv2.weight", "backbone.res5.0.conv3.weight",
    "sem_seg_head.pixel_decoder.adapter_1.weight", "sem_seg_head.pixel_decoder.adapter_3.norm.bias",
    "sem_seg_head.pixel_decoder.layer_1.weight", "sem_seg_head.pixel_decoder.layer_4.norm.weight",
    "sem_seg_head.pixel_decoder.mask_features.bias",
    "sem_seg_head.predictor.query_embed.weight", "sem_seg_head.predictor.input_proj.weight",
    "sem_seg_head.predictor.transformer.decoder.layers.0.self_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer.decoder.layers.5.multihead_attn.out_proj.bias",
    "sem_seg_head.predictor.transformer.decoder.layers.3.linear1.weight",
    "sem_seg_head.predictor.transformer.decoder.layers.2.norm3.bias",
    "sem_seg_head.predictor.transformer.decoder.norm.weight",
    "sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.mask_embed.layers.2.bias",
]


def _official_r50_name_set() -> set:
    """Every tensor of the official R50 MaskFormer (ADE20K-150 config), from the module structure."""
    names = {"backbone.stem.conv1.weight", *(f"backbone.stem.conv1.norm.{p}" for p in BN)}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            for conv in ("conv1", "conv2", "conv3", "shortcut")[: 4 if b == 0 else 3]:
                names |= {f"backbone.res{stage}.{b}.{conv}.weight", *(f"backbone.res{stage}.{b}.{conv}.norm.{p}"
                                                                      for p in BN)}
    pd = "sem_seg_head.pixel_decoder."
    for conv in ("adapter_1", "adapter_2", "adapter_3", "layer_1", "layer_2", "layer_3", "layer_4"):
        names |= {pd + conv + ".weight", pd + conv + ".norm.weight", pd + conv + ".norm.bias"}
    pr = "sem_seg_head.predictor."
    for module in ("input_proj", "class_embed", "mask_embed.layers.0", "mask_embed.layers.1", "mask_embed.layers.2",
                   "transformer.decoder.norm"):
        names |= {f"{pr}{module}.weight", f"{pr}{module}.bias"}
    names |= {pd + "mask_features.weight", pd + "mask_features.bias", pr + "query_embed.weight"}
    for n in range(6):
        layer = f"{pr}transformer.decoder.layers.{n}."
        for attn in ("self_attn", "multihead_attn"):
            names |= {layer + attn + s for s in (".in_proj_weight", ".in_proj_bias", ".out_proj.weight",
                                                 ".out_proj.bias")}
        names |= {f"{layer}{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3")
                  for p in ("weight", "bias")}
    return names


def test_official_r50_names():
    table = detectron2_name_table(build_model(get_config("ade20k-150-r50").model))
    assert set(TRANSCRIBED_R50) <= set(table)
    assert set(table) == _official_r50_name_set()
    assert table["sem_seg_head.pixel_decoder.adapter_1.weight"] == "pixel_decoder.lateral_convs.2.0.weight"  # res2
    assert table["sem_seg_head.pixel_decoder.layer_4.weight"] == "pixel_decoder.res5_conv.0.weight"


def test_deep_stem_and_encoder_names():
    table = detectron2_name_table(build_model(_small_config("r101c", enc_layers=1).model))
    for name in ("backbone.stem.conv1.weight", "backbone.stem.conv2.norm.running_mean", "backbone.stem.conv3.weight",
                 "backbone.stem.conv3.norm.bias", "sem_seg_head.pixel_decoder.input_proj.weight",
                 "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.in_proj_weight",
                 "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear2.bias"):
        assert name in table, name
    assert "sem_seg_head.predictor.input_proj.weight" not in table  # 256-channel encoder memory: no projection


# ----------------------------------------------------------------------------- pickle protocol 5
def test_protocol5_model_zoo_pickle(tmp_path):
    cfg = _small_config("r50")
    ours = _random_model(cfg, seed=2)
    path = tmp_path / "model_final.pkl"
    _write_pkl(path, _official_state(ours, release_layout=True), protocol=5)
    assert b"_frombuffer" in path.read_bytes()  # numpy's protocol-5 array rebuild
    _assert_same_weights(ours, from_detectron2(path, cfg))


def _other_numpy_module_name(data: bytes) -> bytes:
    """The same protocol-5 pickle as written by the other numpy major version, whose module is
    numpy.core.numeric (1.x) instead of numpy._core.numeric (2.x) or the reverse. A small pickle
    is one frame, so only the frame length changes with the name."""
    names = [b"numpy.core.numeric", b"numpy._core.numeric"]
    opcodes = [b"\x8c" + bytes([len(n)]) + n for n in names]  # SHORT_BINUNICODE
    old = 0 if opcodes[0] in data else 1
    assert data[:3] == b"\x80\x05\x95" and len(data) == 11 + int.from_bytes(data[3:11], "little")
    body = data[11:].replace(opcodes[old], opcodes[1 - old])
    assert names[1 - old] in body
    return data[:3] + len(body).to_bytes(8, "little") + body


def test_protocol5_array_layouts_from_numpy_1_and_2(tmp_path):
    arrays = {"contiguous": np.arange(6, dtype=np.float32).reshape(2, 3),
              "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              "strided": np.arange(10, dtype=np.int64)[::2], "zero_d": np.array(1.5, np.float32),
              "readonly": np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), np.float32)}
    data = pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}, protocol=5)
    for name, payload in (("this_numpy.pkl", data), ("other_numpy.pkl", _other_numpy_module_name(data))):
        (tmp_path / name).write_bytes(payload)
        state = load_detectron2_checkpoint(tmp_path / name)
        assert state.keys() == arrays.keys()
        for k, a in arrays.items():
            assert torch.equal(state[k], torch.from_numpy(np.array(a)).float()), (name, k)


def test_protocol5_out_of_band_buffers_are_refused(tmp_path):
    buffers = []
    data = pickle.dumps({"model": {"w": np.ones((4, 4), np.float32)}}, protocol=5, buffer_callback=buffers.append)
    assert buffers  # the array's data is not in the pickle
    path = tmp_path / "out_of_band.pkl"
    path.write_bytes(data)
    with pytest.raises(pickle.UnpicklingError, match=r"out_of_band.pkl: its arrays were pickled out-of-band"):
        load_detectron2_checkpoint(path)


# ----------------------------------------------------------------------------- bad input
class _Evil:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("call,refused", [(os.system, r"(posix|nt)\.system"), (np.load, r"numpy\.load")])
def test_malicious_pickle_is_refused(tmp_path, protocol, call, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final_evil.pkl"
    with open(path, "wb") as f:
        weights = {"backbone.stem.conv1.weight": np.ones(3, np.float32), "backbone.stem.conv1.bias": _Evil(
            call, f"touch {marker}" if call is os.system else str(marker))}
        pickle.dump({"model": weights, "__author__": "x"}, f, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=rf"model_final_evil.pkl: refusing to unpickle {refused}"):
        load_detectron2_checkpoint(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def r50_state():
    return _official_state(_random_model(_small_config("r50")))


def test_missing_tensor(r50_state):
    state = dict(r50_state)
    del state["backbone.res3.0.conv2.norm.running_var"]
    with pytest.raises(ValueError, match=r"missing from the checkpoint: backbone\.res3\.0\.conv2\.norm\.running_var"):
        from_detectron2(state, _small_config("r50"))


def test_extra_tensor(r50_state):
    state = dict(r50_state, **{"sem_seg_head.predictor.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"no fastmaskformer destination: sem_seg_head\.predictor\.extra\.weight"):
        from_detectron2(state, _small_config("r50"))


def test_misshaped_tensor(r50_state):
    state = dict(r50_state, **{"sem_seg_head.pixel_decoder.adapter_2.weight": np.zeros((32, 7, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"adapter_2\.weight -> pixel_decoder\.lateral_convs\.1\.0\.weight: "
                                         r"checkpoint \(32, 7, 1, 1\), model \(32, 64, 1, 1\)"):
        from_detectron2(state, _small_config("r50"))


def test_architecture_mismatch(r50_state):
    with pytest.raises(ValueError, match="ResNet backbone.*swin_tiny"):
        from_detectron2(r50_state, _small_config("swin"))
    with pytest.raises(ValueError, match="model.enc_layers=1"):
        from_detectron2(r50_state, _small_config("r50", enc_layers=1))
    with pytest.raises(ValueError, match="not a MaskFormer checkpoint"):
        from_detectron2({"backbone.stem.conv1.weight": np.zeros(1, np.float32)}, _small_config("r50"))


def test_normalisation_mismatch_warns(r50_state):
    state = dict(r50_state, pixel_std=np.ones((3, 1, 1), np.float32))
    with pytest.warns(UserWarning, match="pixel_std"):
        from_detectron2(state, _small_config("r50"))
