"""MSDeformAttnPixelDecoder (issue 18): equal to transformers' Mask2FormerPixelDecoder after the
weight mapping, selectable by config, and the same on the Triton op (interpreter)."""
import pytest
import torch

from fastmaskformer.convert.hf_mask2former import pixel_decoder_kwargs_from_hf, pixel_decoder_state_from_hf
from fastmaskformer.modeling.msdeformattn import MSDeformAttnPixelDecoder

CHANNELS = [16, 24, 40, 48]  # res2..res5


def _features(batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, c, size // s, size // s, generator=g)
            for (name, s), c in zip({"res2": 4, "res3": 8, "res4": 16, "res5": 32}.items(), CHANNELS)}


def _hf_decoder(layers=2):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

    config = transformers.Mask2FormerConfig(feature_size=64, mask_feature_size=32, encoder_layers=layers,
                                            num_attention_heads=4, encoder_feedforward_dim=96, backbone_config=None)
    hf = Mask2FormerPixelDecoder(config, feature_channels=CHANNELS).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere (HF leaves level_embed uninitialised)
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5))
            if "layer_norm" in name or name.endswith(".1.weight"):
                p.add_(1.0)
    return config, hf


def test_matches_hf_mask2former_pixel_decoder():
    config, hf = _hf_decoder()
    ours = MSDeformAttnPixelDecoder(CHANNELS, **pixel_decoder_kwargs_from_hf(config)).eval()
    ours.load_state_dict(pixel_decoder_state_from_hf(hf.state_dict()), strict=True)
    feats = _features()
    with torch.no_grad():
        want = hf([feats[k] for k in ("res2", "res3", "res4", "res5")])
        mask_features, multi_scale = ours(feats)
    assert mask_features.shape == (2, 32, 16, 16)
    assert [tuple(x.shape) for x in multi_scale] == [(2, 64, 2, 2), (2, 64, 4, 4), (2, 64, 8, 8)]
    torch.testing.assert_close(mask_features, want.mask_features, atol=1e-4, rtol=1e-4)
    for x, y in zip(multi_scale, want.multi_scale_features):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_state_mapping_with_prefix_and_unknown_keys():
    _, hf = _hf_decoder(layers=1)
    state = {f"model.pixel_level_module.decoder.{k}": v for k, v in hf.state_dict().items()}
    state["model.other.weight"] = torch.zeros(1)
    mapped = pixel_decoder_state_from_hf(state, prefix="model.pixel_level_module.decoder.")
    assert "lateral_convs.0.0.weight" in mapped and "encoder.0.norm2.bias" in mapped
    with pytest.raises(KeyError, match="no mapping"):
        pixel_decoder_state_from_hf({"encoder.layers.0.bogus.weight": torch.zeros(1)})


def test_triton_op_inside_decoder_matches_reference():
    torch.manual_seed(0)
    ours = MSDeformAttnPixelDecoder(CHANNELS, conv_dim=32, mask_dim=32, enc_layers=1, nheads=2,
                                    dim_feedforward=64).eval()
    feats = _features(batch=1, size=64)
    with torch.no_grad():
        want = ours(feats)
        for layer in ours.encoder:
            layer.self_attn.impl = "triton"
        got = ours(feats)
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_official_defaults_and_selection_by_config():
    from fastmaskformer.config import ModelConfig
    from fastmaskformer.modeling.maskformer import build_pixel_decoder

    class _Backbone:
        channels = dict(zip(("res2", "res3", "res4", "res5"), (256, 512, 1024, 2048)))

    cfg = ModelConfig(pixel_decoder="msdeformattn")
    dec = build_pixel_decoder(cfg, _Backbone())
    assert isinstance(dec, MSDeformAttnPixelDecoder)
    assert len(dec.encoder) == 6 and dec.encoder[0].linear1.out_features == 1024
    attn = dec.encoder[0].self_attn
    assert (attn.n_heads, attn.n_levels, attn.n_points) == (8, 3, 4)
    assert dec.mask_features.kernel_size == (1, 1) and dec.fpn_features == ["res2"]
    small = build_pixel_decoder(ModelConfig(pixel_decoder="msdeformattn", pixel_decoder_kwargs=dict(enc_layers=1)),
                                _Backbone())
    assert len(small.encoder) == 1
    with pytest.raises(ValueError, match="unknown pixel_decoder"):
        build_pixel_decoder(ModelConfig(pixel_decoder="bogus"), _Backbone())


def test_maskformer_with_msdeformattn_decoder_runs_and_trains():
    from fastmaskformer.config import BackboneConfig, ModelConfig
    from fastmaskformer.modeling import build_model

    cfg = ModelConfig(backbone=BackboneConfig(name="resnet18"), num_classes=5, num_queries=4, hidden_dim=32,
                      mask_dim=32, conv_dim=32, nheads=2, dim_feedforward=32, dec_layers=1,
                      pixel_decoder="msdeformattn", pixel_decoder_kwargs=dict(enc_layers=1, dim_feedforward=32))
    model = build_model(cfg)
    out = model(torch.randn(1, 3, 64, 64))
    assert out.pixel_embed.shape == (1, 32, 16, 16)
    (out.class_logits.sum() + out.mask_embed.sum() + out.pixel_embed.sum()).backward()
    grad = model.pixel_decoder.encoder[0].self_attn.sampling_offsets.weight.grad
    assert grad is not None and torch.isfinite(grad).all()


def test_msdeformattn_module_padding_mask_and_box_references():
    """The official module's extras: a padding mask zeroes the masked values; 4-d (box)
    reference points place the points at offsets / n_points * half the box size."""
    from fastmaskformer.modeling.msdeformattn import MSDeformAttn
    from fastmaskformer.ops import ms_deform_attn

    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    shapes = torch.tensor([[3, 4], [2, 2]])
    value = torch.randn(2, 16, 16)
    query = torch.randn(2, 5, 16)
    mask = torch.rand(2, 16) < 0.3
    ref2 = torch.rand(2, 5, 2, 2)
    with torch.no_grad():
        masked = attn(query, ref2, value, shapes, None, mask)
        v = attn.value_proj(value).masked_fill(mask[..., None], 0.0).view(2, 16, 2, 8)
        off = attn.sampling_offsets(query).view(2, 5, 2, 2, 3, 2)
        w = attn.attention_weights(query).view(2, 5, 2, 6).softmax(-1).view(2, 5, 2, 2, 3)
        loc = ref2[:, :, None, :, None, :] + off / torch.tensor([[4.0, 3.0], [2.0, 2.0]])[None, None, None, :, None]
        torch.testing.assert_close(masked, attn.output_proj(ms_deform_attn(v, shapes, loc, w)))
        boxes = torch.cat([ref2, torch.rand(2, 5, 2, 2) * 0.5], -1)
        got = attn(query, boxes, value, shapes)
        v = attn.value_proj(value).view(2, 16, 2, 8)
        loc = boxes[:, :, None, :, None, :2] + off / 3 * boxes[:, :, None, :, None, 2:] * 0.5
        torch.testing.assert_close(got, attn.output_proj(ms_deform_attn(v, shapes, loc, w)))
