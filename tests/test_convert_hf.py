"""HF transformers MaskFormer as an external peer (DESIGN 8): small random HF models built
offline, converted, and compared on outputs (eval mode) and on the final-layer loss."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DetrConfig,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    MaskFormerSwinConfig,
    ResNetConfig,
)

import fastmaskformer as fmf  # noqa: E402
from fastmaskformer.config import Config  # noqa: E402
from fastmaskformer.convert import convert_hf_directory, from_hf, load_hf_pretrained  # noqa: E402
from fastmaskformer.convert.hf import convert_state_dict  # noqa: E402
from fastmaskformer.losses import HungarianMatcher, SetCriterion  # noqa: E402
from fastmaskformer.modeling import build_model  # noqa: E402

torch.set_num_threads(2)
STAGES = ["stage1", "stage2", "stage3", "stage4"]
NUM_LABELS = 4


def _hf_model(backbone: str) -> MaskFormerForInstanceSegmentation:
    if backbone == "resnet":
        # embedding_size 64: timm's 7x7 stem width; small stages otherwise
        bcfg = ResNetConfig(embedding_size=64, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                            layer_type="bottleneck", out_features=STAGES)
    else:
        bcfg = MaskFormerSwinConfig(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4,
                                    image_size=128, out_features=STAGES)
    dcfg = DetrConfig(d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, num_queries=7,
                      encoder_layers=0)
    cfg = MaskFormerConfig(backbone_config=bcfg, decoder_config=dcfg, num_labels=NUM_LABELS, fpn_feature_size=32,
                           mask_feature_size=32, use_auxiliary_loss=False)
    torch.manual_seed(0)
    model = MaskFormerForInstanceSegmentation(cfg).eval()
    with torch.no_grad():  # move off HF's special inits (zero biases, zero bias tables, unit BN stats)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=["resnet", "swin"])
def pair(request):
    hf = _hf_model(request.param)
    return request.param, hf, from_hf(hf)


def _compare(hf, ours, x):
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = ours(x)
    cls_diff = (ref.class_queries_logits - out.class_logits[-1]).abs().max().item()
    mask_diff = (ref.masks_queries_logits - out.pred_masks()).abs().max().item()
    return cls_diff, mask_diff


# sizes: square, non-square, and (Swin, window 4) feature maps that need window padding
@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_outputs_match_hf(pair, size):
    kind, hf, ours = pair
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    cls_diff, mask_diff = _compare(hf, ours, x)
    assert cls_diff < 1e-4 and mask_diff < 1e-4, (kind, size, cls_diff, mask_diff)


def test_converted_config(pair):
    kind, hf, ours = pair
    assert ours.predictor.query_embed.num_embeddings == 7 and ours.predictor.class_embed.out_features == 5
    assert len(ours.predictor.decoder.layers) == 2
    if kind == "resnet":
        assert ours.backbone.channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())  # frozen
    else:
        assert ours.backbone.is_swin and ours.backbone.channels["res5"] == 256


def test_transformers_4x_parameter_names(pair):
    kind, hf, _ = pair
    state = hf.state_dict()
    renamed = {k.replace(".o_proj.", ".out_proj.").replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2."): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    a, b = convert_state_dict(state, kind), convert_state_dict(renamed, kind)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_parameter_is_an_error(pair):
    kind, hf, _ = pair
    state = dict(hf.state_dict())
    state["model.transformer_module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="no fastmaskformer destination"):
        convert_state_dict(state, kind)


def test_saved_directory_roundtrip(pair, tmp_path):
    kind, hf, ours = pair
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_hf_pretrained(tmp_path / "hf")
    ckpt_path = tmp_path / "out" / "model.pt"
    cfg = convert_hf_directory(tmp_path / "hf", ckpt_path)
    assert ckpt_path.is_file() and not list(ckpt_path.parent.glob("*.tmp"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    rebuilt_cfg = Config.from_dict(ckpt["config"])
    assert rebuilt_cfg.model == cfg.model
    rebuilt = build_model(rebuilt_cfg.model)
    rebuilt.load_state_dict(ckpt["model"])
    rebuilt.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = ours(x)
        for model in (loaded, rebuilt):
            out = model(x)
            torch.testing.assert_close(out.class_logits, expected.class_logits)
            torch.testing.assert_close(out.pixel_embed, expected.pixel_embed)
    assert tuple(cfg.model.pixel_mean) == pytest.approx((123.675, 116.28, 103.53))


def test_not_a_maskformer_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "detr"}')
    with pytest.raises(ValueError, match="maskformer"):
        load_hf_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_hf_pretrained(tmp_path / "missing")


def _targets(h, w, seed):
    """Two images with 3 and 2 disjoint random segments (class ids < NUM_LABELS) + some void."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in (3, 2):
        segment_map = torch.randint(-1, m, (h // 8, w // 8), generator=g)
        segment_map = segment_map.repeat_interleave(8, 0).repeat_interleave(8, 1)
        masks = torch.stack([segment_map == i for i in range(m)])
        labels = torch.randint(0, NUM_LABELS, (m,), generator=g)
        out.append((labels, masks))
    return out


def test_final_layer_loss_matches_hf(pair):
    kind, hf, ours = pair
    h, w = 64, 96
    x = torch.randn(2, 3, h, w)
    gt = _targets(h, w, seed=3)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        hf_losses = hf.criterion(ref.masks_queries_logits, ref.class_queries_logits,
                                 [m.float() for _, m in gt], [lab for lab, _ in gt])
        out = ours(x)
    criterion = SetCriterion(NUM_LABELS, HungarianMatcher(solver="scipy", impl="torch"), deep_supervision=False,
                             impl="torch")
    losses = criterion(out, [fmf.Target.from_masks(lab, m) for lab, m in gt])
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    torch.testing.assert_close(losses["loss_ce"], hf_losses["loss_cross_entropy"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(losses["loss_mask"], hf_losses["loss_mask"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(losses["loss_dice"], hf_losses["loss_dice"], atol=1e-4, rtol=1e-4)
