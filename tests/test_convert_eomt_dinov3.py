"""DINOv3 EoMT -> our EoMT (timm's DINOv3 Eva inside), against transformers'
``EomtDinov3ForUniversalSegmentation`` (random weights; non-trivial norms, layer scales,
register tokens and q/v biases): every prediction's class and mask logits equal, masked attention
on and off, MLP and gated (SwiGLU) blocks.

- ``convert --from hf``: the transformers model itself, in memory and saved.
- ``convert --from eomt --backbone``: the official release's delta layout (transformers'
  ``DINOv3ViTModel`` names under ``network.encoder.backbone``, added to the DINOv3 backbone as the
  official loader adds them), the backbone as a transformers folder, a timm file or Meta's layout.
"""
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastmaskformer as fmf  # noqa: E402
from test_convert_hf_eomt import assert_same_predictions, run_recording  # noqa: E402
from test_eomt import nontrivial_  # noqa: E402

SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=16)


def hf_eomt_dinov3(gated=False, seed=0, **overrides):
    """A random transformers EoMT-DINOv3; ``gated``: a SwiGLU (SiLU) ViT with the official GELU
    mask head and upscaling (transformers would give them the ViT's SiLU)."""
    from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

    torch.manual_seed(seed)
    options = dict(intermediate_size=128, num_blocks=2, num_queries=6, num_labels=5, layer_norm_eps=1e-5,
                   pos_embed_rescale=None)
    if gated:
        options.update(use_gated_mlp=True, hidden_act="silu")
    config = EomtDinov3Config(**{**SIZES, **options, **overrides})
    model = EomtDinov3ForUniversalSegmentation(config).eval()
    if gated:
        for module in [model.mask_head, *model.upscale_block.block]:
            module.activation = torch.nn.GELU()
    return nontrivial_(model, seed)


def test_every_prediction_equals_transformers_with_masking():
    from fastmaskformer.convert import from_hf

    hf = hf_eomt_dinov3()
    ours = from_hf(hf)
    assert ours.backbone.vit.blocks[0].attn.q_bias is not None and ours.mask_annealing.probs == [1.0, 1.0]
    x = torch.randn(2, 3, 64, 64)
    calls = run_recording(hf, x)
    with torch.no_grad():
        out = ours(x)
    assert len(calls) == 3
    assert_same_predictions(out, calls)
    with torch.no_grad():  # the masks matter here
        hf.attn_mask_probs.zero_()
        unmasked = run_recording(hf, x)
    assert not torch.allclose(unmasked[-1][0], calls[-1][0], atol=1e-3)


def test_masking_off_equals_transformers_in_eval_and_training_with_rope_augmentation():
    """LayerNorm eps 1e-6 (EomtDinov3Config's default), RoPE period 50, and in training DINOv3's
    random RoPE rescaling (factor 2: same draw from the same global RNG)."""
    from fastmaskformer.convert import from_hf

    hf = hf_eomt_dinov3(layer_norm_eps=1e-6, pos_embed_rescale=2.0, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 50.0})
    hf.attn_mask_probs.zero_()
    ours = from_hf(hf)
    kwargs = ours.backbone.vit.blocks[0].norm1.eps, ours.backbone.vit.rope.temperature, ours.backbone.vit.rope.rescale_coords
    assert kwargs == (1e-6, 50.0, 2.0)
    x = torch.randn(1, 3, 64, 64)
    calls = run_recording(hf, x)
    with torch.no_grad():
        out = ours(x)
    assert out.class_logits.shape[0] == len(calls) == 1
    assert_same_predictions(out, calls)
    hf.train(), ours.train()
    torch.manual_seed(3)
    calls = run_recording(hf, x)
    torch.manual_seed(3)
    with torch.no_grad():
        out = ours(x)
    assert len(calls) == 3
    assert_same_predictions(out, calls)
    torch.manual_seed(4)  # another rescaling draw: a change beyond the tolerance (the augmentation is live)
    with torch.no_grad():
        assert (ours(x).pred_masks() - out.pred_masks()).abs().max() > 5e-4


def test_saved_folder_converts_offline(tmp_path):
    from fastmaskformer.convert import convert_hf_directory

    hf = hf_eomt_dinov3()
    hf.save_pretrained(tmp_path / "hf")
    cfg = convert_hf_directory(tmp_path / "hf", tmp_path / "eomt.pt")
    assert (cfg.model.backbone.name, cfg.model.num_blocks, cfg.model.num_classes) == ("dinov3_large", 2, 5)
    ckpt = torch.load(tmp_path / "eomt.pt", weights_only=True)
    model = fmf.build_model(fmf.Config.from_dict(ckpt["config"]).model)
    model.load_state_dict(ckpt["model"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_same_predictions(model.eval()(x), run_recording(hf, x))


def test_standard_sizes_map_to_the_aliases_and_unsupported_configs_are_reported():
    from transformers import EomtDinov3Config

    from fastmaskformer.convert.hf_eomt_dinov3 import (
        dinov3_vit_state, eomt_dinov3_config_from_hf, eomt_dinov3_state_from_hf,
    )

    large = EomtDinov3Config(layer_norm_eps=1e-5, num_labels=133).to_dict()  # the released ViT-L defaults
    cfg = eomt_dinov3_config_from_hf(large)
    assert (cfg.backbone.name, cfg.backbone.kwargs) == ("dinov3_large", {"qkv_bias": True, "rope_rescale_coords": 2.0})
    assert (cfg.num_queries, cfg.num_blocks, cfg.num_classes, cfg.backbone.img_size) == (200, 4, 133, 640)
    for bad, match in [({"key_bias": True}, "key_bias"), ({"hidden_act": "relu"}, "hidden_act"),
                       ({"mlp_bias": False}, "mlp_bias"), ({"num_upscale_blocks": 3}, "num_upscale_blocks"),
                       ({"model_type": "eomt"}, "not 'eomt_dinov3'"),
                       ({"use_gated_mlp": True, "hidden_act": "silu"}, "GELU in EoMT")]:
        with pytest.raises(ValueError, match=match):
            eomt_dinov3_config_from_hf({**large, **bad})
    state = dict(hf_eomt_dinov3().state_dict())
    with pytest.raises(ValueError, match="mystery"):
        eomt_dinov3_state_from_hf({**state, "layers.0.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="non-zero key bias"):
        dinov3_vit_state({"layer.0.attention.k_proj.bias": torch.ones(4)}, "x")
    with pytest.raises(ValueError, match="incomplete q/k/v"):
        eomt_dinov3_state_from_hf({k: v for k, v in state.items() if k != "layers.1.attention.k_proj.weight"})


# ----------------------------------------------------------------------------- official delta weights
def dinov3_backbone(hf, seed=1):
    """A transformers DINOv3ViTModel of ``hf``'s ViT: the 'pretrained' backbone, other weights."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
              "intermediate_size", "layer_norm_eps", "use_gated_mlp", "hidden_act", "num_register_tokens")
    config = DINOv3ViTConfig(**{k: getattr(hf.config, k) for k in fields}, pos_embed_rescale=None)
    torch.manual_seed(seed)
    return nontrivial_(DINOv3ViTModel(config).eval(), seed)


def official_delta(hf, base) -> dict:
    """``hf`` (the 'fine-tuned' network) as an official delta checkpoint over ``base``: the
    Lightning module's names, backbone and buffers minus what the official loader adds back."""
    base_state = {k.replace("model.layer.", "layer."): v for k, v in base.state_dict().items()}  # as saved
    heads = [("query.", "network.q."), ("class_predictor.", "network.class_head."),
             ("mask_head.fc1.", "network.mask_head.0."), ("mask_head.fc2.", "network.mask_head.2."),
             ("mask_head.fc3.", "network.mask_head.4.")]
    delta = {"criterion.empty_weight": torch.ones(6), "network.attn_mask_probs": hf.attn_mask_probs - 1.0,
             "network.encoder.pixel_mean": torch.zeros(1, 3, 1, 1), "network.encoder.pixel_std": torch.zeros(1, 3, 1, 1)}
    for key, value in hf.state_dict().items():
        if key.startswith(("embeddings.", "layers.", "layernorm.")):
            base_key = key.replace("layers.", "layer.", 1).replace("layernorm.", "norm.")
            official = re.sub(r"^embeddings\.", "patch_embed.", key).replace("layers.", "blocks.", 1)
            official = official.replace("layernorm.", "norm.")
            delta["network.encoder.backbone." + official] = value - base_state[base_key]
        elif key.startswith("upscale_block.block."):
            delta["network.upscale." + key[len("upscale_block.block."):].replace("layernorm2d", "norm")] = value
        else:
            for hf_prefix, prefix in heads:
                if key.startswith(hf_prefix):
                    delta[prefix + key[len(hf_prefix):]] = value
    return delta


def dinov3_tiny_preset(hf, gated=False):
    cfg = fmf.get_config("eomt-coco-panoptic-dinov3-s-640-2x")
    m = cfg.model
    m.backbone.name = "dinov3_huge_plus" if gated else "dinov3_small"
    m.backbone.kwargs = dict(embed_dim=64, depth=4, num_heads=2, mlp_ratio=(hf.config.intermediate_size + 0.5) / 64)
    m.backbone.img_size, m.num_blocks, m.num_queries, m.num_classes = 64, 2, 6, 5
    m.mask_annealing_start = m.mask_annealing_end = ()
    return cfg


@pytest.mark.parametrize("gated", [False, True])
def test_official_delta_weights_plus_a_transformers_backbone_equal_transformers(gated, tmp_path):
    from fastmaskformer.convert import convert_eomt_file, from_eomt_official
    from fastmaskformer.convert.eomt import load_dinov3_backbone

    hf, x = hf_eomt_dinov3(gated), torch.randn(2, 3, 64, 64)
    base = dinov3_backbone(hf)
    base.save_pretrained(tmp_path / "dinov3")
    delta = official_delta(hf, base)
    state, config = load_dinov3_backbone(tmp_path / "dinov3")
    ours = from_eomt_official(delta, dinov3_tiny_preset(hf, gated), state, config)
    assert ours.mask_annealing.probs == [1.0, 1.0]  # 1 + (1 - 1)
    with torch.no_grad():
        assert_same_predictions(ours(x), run_recording(hf, x))
        hf.attn_mask_probs.zero_()  # a trained model: delta -1, masking off
    ours = from_eomt_official(official_delta(hf, base), dinov3_tiny_preset(hf, gated), state, config)
    assert ours.mask_annealing.probs == [0.0, 0.0]
    with torch.no_grad():
        assert_same_predictions(ours(x), run_recording(hf, x))
    # the file path: the backbone as a weights file, the checkpoint as Lightning writes it
    torch.save({"state_dict": official_delta(hf, base)}, tmp_path / "delta.ckpt")
    import fastmaskformer.config as config_module

    preset = dinov3_tiny_preset(hf, gated)
    config_module._PRESETS["test-eomt-dinov3-tiny"] = lambda: preset
    try:
        cfg = convert_eomt_file(tmp_path / "delta.ckpt", tmp_path / "ours.pt", "test-eomt-dinov3-tiny",
                                tmp_path / "dinov3" / "model.safetensors")
    finally:
        del config_module._PRESETS["test-eomt-dinov3-tiny"]
    assert cfg.model.backbone.kwargs["qkv_bias"] is True
    ckpt = torch.load(tmp_path / "ours.pt", weights_only=True)
    model = fmf.build_model(fmf.Config.from_dict(ckpt["config"]).model)
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert_same_predictions(model.eval()(x), run_recording(hf, x))


def test_timm_and_meta_backbone_layouts_give_the_same_weights():
    """The backbone as timm's Eva state dict and in Meta's original names (storage_tokens, ls1.gamma,
    qkv.bias) converts to what the transformers layout gives."""
    from fastmaskformer.convert import from_eomt_official

    hf = hf_eomt_dinov3()
    hf.attn_mask_probs.zero_()
    base = dinov3_backbone(hf)
    delta, cfg = official_delta(hf, base), dinov3_tiny_preset(hf)
    reference = from_eomt_official(delta, cfg, base.state_dict()).state_dict()
    timm_state = {k[len("backbone.vit."):]: v - official_vit_delta(delta, k) for k, v in reference.items()
                  if k.startswith("backbone.vit.")}
    from_timm = from_eomt_official(delta, cfg, timm_state).state_dict()
    meta = {k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"): v
            for k, v in timm_state.items() if not k.endswith(("q_bias", "v_bias"))}
    for i in range(4):  # Meta's packed q/k/v bias (k's zero)
        q, v = timm_state[f"blocks.{i}.attn.q_bias"], timm_state[f"blocks.{i}.attn.v_bias"]
        meta[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    from_meta = from_eomt_official(delta, cfg, meta).state_dict()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(from_timm[key], value, msg=key)
            torch.testing.assert_close(from_meta[key], value, msg=key)


def official_vit_delta(delta, our_key):
    """The delta the converter added to our ViT tensor ``our_key`` (packed like ours)."""
    from fastmaskformer.convert.hf_eomt_dinov3 import dinov3_vit_state

    prefix = "network.encoder.backbone."
    vit = dinov3_vit_state({k[len(prefix):]: v for k, v in delta.items() if k.startswith(prefix)}, "delta")
    return vit[our_key[len("backbone.vit."):]]


def test_delta_errors_name_the_problem(tmp_path):
    from fastmaskformer.convert import eomt_dinov3_state_from_official, from_eomt_official
    from fastmaskformer.convert.eomt import dinov3_backbone_state, eomt_state_from_official, load_dinov3_backbone

    hf = hf_eomt_dinov3()
    base = dinov3_backbone(hf)
    delta, cfg = official_delta(hf, base), dinov3_tiny_preset(hf)
    with pytest.raises(ValueError, match="holds delta weights: give the DINOv3 backbone"):
        from_eomt_official(delta, cfg)
    with pytest.raises(ValueError, match="DINOv3 EoMT checkpoint"):
        eomt_state_from_official(delta)
    dinov2 = {k.replace(".attention.q_proj.", ".attn.qkv.").replace("patch_embed.patch_embeddings", "patch_embed.proj"): v
              for k, v in delta.items()}
    with pytest.raises(ValueError, match="not a DINOv3 EoMT checkpoint"):
        eomt_dinov3_state_from_official(dinov2, base.state_dict())
    with pytest.raises(ValueError, match="full weights: convert them without a backbone"):
        from_eomt_official(dinov2, cfg, base.state_dict())
    with pytest.raises(ValueError, match="needs an eomt-\\*-dinov3-\\* preset"):
        from_eomt_official(delta, "eomt-coco-panoptic-dinov2-s-640", base.state_dict())
    wide = dinov3_backbone(hf_eomt_dinov3(hidden_size=128))
    with pytest.raises(ValueError, match="does not fit this checkpoint"):
        from_eomt_official(delta, cfg, wide.state_dict())
    shallow = {k: v for k, v in base.state_dict().items() if "layer.3." not in k}
    with pytest.raises(ValueError, match="the backbone has no"):
        from_eomt_official(delta, cfg, shallow)
    with pytest.raises(ValueError, match="not ImageNet's"):
        from_eomt_official({**delta, "network.encoder.pixel_mean": torch.ones(1, 3, 1, 1)}, cfg, base.state_dict())
    with pytest.raises(ValueError, match="not a DINOv3 ViT state dict"):
        dinov3_backbone_state({"backbone.weight": torch.zeros(1)}, None)
    with pytest.raises(FileNotFoundError, match="no such DINOv3 backbone"):
        load_dinov3_backbone(tmp_path / "missing.safetensors")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "dinov2"}')
    with pytest.raises(ValueError, match="expected 'dinov3_vit'"):
        load_dinov3_backbone(tmp_path / "other")


def test_cli_convert_with_backbone(tmp_path, capsys):
    from fastmaskformer.cli import main

    hf = hf_eomt_dinov3()
    base = dinov3_backbone(hf)
    torch.save(official_delta(hf, base), tmp_path / "pytorch_model.bin")
    assert main(["convert", "--from", "eomt", str(tmp_path / "pytorch_model.bin"), "--out", str(tmp_path / "o.pt"),
                 "--preset", "eomt-coco-panoptic-dinov3-s-640-2x"]) != 0
    assert "give the DINOv3 backbone" in capsys.readouterr().err
    base.save_pretrained(tmp_path / "dinov3")
    assert main(["convert", "--from", "eomt", str(tmp_path / "pytorch_model.bin"), "--out", str(tmp_path / "o.pt"),
                 "--preset", "eomt-coco-panoptic-dinov3-s-640-2x", "--backbone", str(tmp_path / "dinov3")]) != 0
    assert "does not fit" in capsys.readouterr().err  # a ViT-S preset, a 64-wide backbone
    assert main(["convert", "--from", "hf", str(tmp_path / "dinov3"), "--out", str(tmp_path / "o.pt"),
                 "--backbone", str(tmp_path / "dinov3")]) != 0
    assert "--backbone is for --from eomt" in capsys.readouterr().err
