"""transformers' EomtForUniversalSegmentation (DINOv2) -> our EoMT: every prediction's class and
mask logits equal (random weights, non-trivial norms, layer scales and register tokens), with
masked attention on and off, MLP and SwiGLU blocks; a saved folder converts offline."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_eomt import nontrivial_  # noqa: E402


def hf_eomt(swiglu=False, **overrides):
    from transformers import EomtConfig, EomtForUniversalSegmentation

    torch.manual_seed(0)
    config = EomtConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=16,
                        num_blocks=2, num_queries=6, num_labels=5, use_swiglu_ffn=swiglu, **overrides)
    model = nontrivial_(EomtForUniversalSegmentation(config).eval())
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.normal_()
    return model


def run_recording(hf, x):
    """HF returns only the final prediction: record every ``predict`` call (one per prediction)."""
    calls = []
    predict = hf.predict

    def recording(tokens):
        masks, classes = predict(tokens)
        calls.append((classes, masks))
        return masks, classes

    hf.predict = recording
    try:
        with torch.no_grad():
            hf(pixel_values=x)
    finally:
        del hf.predict
    return calls


def assert_same_predictions(out, calls):
    assert out.class_logits.shape[0] == len(calls)
    for layer, (classes, masks) in enumerate(calls):
        torch.testing.assert_close(out.class_logits[layer], classes, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pred_masks(layer), masks, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("swiglu", [False, True])
def test_every_prediction_equals_transformers_with_masking(swiglu):
    from fastmaskformer.convert import from_hf

    hf = hf_eomt(swiglu)
    ours = from_hf(hf)
    assert type(ours).__name__ == "EoMT" and ours.mask_annealing.probs == [1.0, 1.0]
    x = torch.randn(2, 3, 64, 64)
    calls = run_recording(hf, x)
    with torch.no_grad():
        out = ours(x)
    assert len(calls) == 3  # before each of the 2 query blocks, and the final one
    assert_same_predictions(out, calls)
    # the masks matter here: without them the final prediction differs
    with torch.no_grad():
        hf.attn_mask_probs.zero_()
        unmasked = run_recording(hf, x)
    assert not torch.allclose(unmasked[-1][0], calls[-1][0], atol=1e-3)


def test_masking_off_equals_transformers_in_eval_and_training():
    from fastmaskformer.convert import from_hf

    hf = hf_eomt()
    hf.attn_mask_probs.zero_()  # annealed: a trained model
    ours = from_hf(hf)
    assert ours.mask_annealing.probs == [0.0, 0.0]
    x = torch.randn(1, 3, 64, 64)
    calls = run_recording(hf, x)
    with torch.no_grad():
        out = ours(x)
    assert out.class_logits.shape[0] == len(calls) == 1
    assert_same_predictions(out, calls)
    hf.train(), ours.train()  # training: every block predicts (no dropout, no drop-path here)
    calls = run_recording(hf, x)
    with torch.no_grad():
        out = ours(x)
    assert len(calls) == 3
    assert_same_predictions(out, calls)


def test_saved_folder_converts_offline(tmp_path):
    from fastmaskformer.convert import convert_hf_directory, load_hf_pretrained

    hf = hf_eomt()
    hf.save_pretrained(tmp_path / "hf")
    cfg = convert_hf_directory(tmp_path / "hf", tmp_path / "eomt.pt")
    assert (cfg.model.meta_arch, cfg.model.num_blocks, cfg.model.num_queries, cfg.model.num_classes) == ("eomt", 2, 6, 5)
    assert cfg.model.backbone.kwargs["depth"] == 4 and cfg.model.backbone.img_size == 64
    x = torch.randn(1, 3, 64, 64)
    calls = run_recording(hf, x)
    ours = load_hf_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert_same_predictions(ours(x), calls)
    ckpt = torch.load(tmp_path / "eomt.pt", weights_only=True)
    import fastmaskformer as fmf

    model = fmf.build_model(fmf.Config.from_dict(ckpt["config"]).model)
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert_same_predictions(model.eval()(x), calls)


def test_unknown_keys_and_unsupported_configs_are_reported():
    from fastmaskformer.convert.hf_eomt import eomt_config_from_hf, eomt_state_from_hf

    hf = hf_eomt()
    state = dict(hf.state_dict())
    state["layers.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        eomt_state_from_hf(state)
    config = hf.config.to_dict()
    with pytest.raises(ValueError, match="GELU and LayerNorm eps"):
        eomt_config_from_hf({**config, "layer_norm_eps": 1e-5})
    with pytest.raises(ValueError, match="eomt_dinov3"):
        eomt_config_from_hf({**config, "model_type": "eomt_dinov3"})
