"""Model tests (CPU, tiny configs): shapes and dtypes of every module, gradient flow, frozen
BatchNorm, arbitrary input sizes (also not divisible by 32, as the official COCO panoptic
configs feed them), dropout in train/eval, preprocessing, baselines and their losses."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

import fastmaskformer as fmf
from fastmaskformer.config import ModelConfig
from fastmaskformer.modeling import (
    Backbone,
    MaskFormer,
    MaskFormerOutput,
    PerPixelBaseline,
    PerPixelBaselinePlus,
    PixelDecoder,
    PositionEmbeddingSine,
    TransformerDecoder,
    TransformerEncoder,
    build_model,
)
from fastmaskformer.modeling.backbone import resolve_backbone_name

torch.set_num_threads(2)

TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}  # res2..res5 = 32, 64, 128, 256 ch
TINY_SWIN = {"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 4}


def tiny_cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(num_classes=5, num_queries=6, hidden_dim=32, mask_dim=32, conv_dim=32, nheads=4,
                      dim_feedforward=64, dec_layers=3)
    cfg.backbone.kwargs = dict(TINY_RESNET)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def images(b=2, h=64, w=96):
    return torch.randn(b, 3, h, w)


# ----------------------------------------------------------------------------- components
def test_position_encoding_formula_and_shape():
    pe = PositionEmbeddingSine(8)
    x = torch.zeros(3, 5, 4, 6)
    pos = pe(x)
    assert pos.shape == (3, 16, 4, 6) and pos.dtype == torch.float32
    assert torch.equal(pos[0], pos[2])  # no padding mask: same for every image
    # channel 0 = sin(y_norm), channel 1 = cos(y_norm / T^(2*0/8)); x channels follow the y ones
    y = 2 / (4 + 1e-6) * 2 * math.pi  # row index 1 -> coordinate 2
    xx = 3 / (6 + 1e-6) * 2 * math.pi
    assert pos[0, 0, 1, 2].item() == pytest.approx(math.sin(y), abs=1e-6)
    assert pos[0, 1, 1, 2].item() == pytest.approx(math.cos(y), abs=1e-6)
    assert pos[0, 2, 1, 2].item() == pytest.approx(math.sin(y / 10000 ** (2 / 8)), abs=1e-6)
    assert pos[0, 8, 1, 2].item() == pytest.approx(math.sin(xx), abs=1e-6)
    assert pe(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_transformer_encoder_decoder_shapes():
    enc = TransformerEncoder(2, d_model=32, nhead=4, dim_feedforward=64)
    dec = TransformerDecoder(3, d_model=32, nhead=4, dim_feedforward=64).eval()
    src, pos = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    memory = enc(src, pos)
    assert memory.shape == (2, 12, 32)
    hs = dec(memory, pos, torch.randn(2, 5, 32))
    assert hs.shape == (3, 2, 5, 32)
    # every layer output went through the shared LayerNorm (default affine = identity)
    assert torch.allclose(hs.mean(-1), torch.zeros(3, 2, 5), atol=1e-5)
    assert enc.norm is None and TransformerEncoder(1, 32, 4, 64, pre_norm=True).norm is not None


def test_pixel_decoder_shapes_with_and_without_encoder():
    feats = {"res2": torch.randn(2, 8, 16, 24), "res3": torch.randn(2, 16, 8, 12),
             "res4": torch.randn(2, 24, 4, 6), "res5": torch.randn(2, 40, 2, 3)}
    plain = PixelDecoder([8, 16, 24, 40], conv_dim=32, mask_dim=48)
    pixel_embed, memory = plain(feats)
    assert pixel_embed.shape == (2, 48, 16, 24) and memory is None
    assert plain.mask_features.bias is not None
    assert all(m.bias is None for m in plain.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))
    enc = PixelDecoder([8, 16, 24, 40], conv_dim=32, mask_dim=48, enc_layers=2, nheads=4, dim_feedforward=64)
    pixel_embed, memory = enc(feats)
    assert pixel_embed.shape == (2, 48, 16, 24) and memory.shape == (2, 32, 2, 3)


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet101c", "swin_tiny", "swin_small", "swin_base",
                                  "swin_large"])
def test_backbone_aliases_resolve(name):
    timm_name, _ = resolve_backbone_name(name)
    assert timm.is_model(timm_name)


def test_backbone_unknown_name():
    with pytest.raises(ValueError, match="unknown backbone"):
        resolve_backbone_name("vgg16")


@pytest.mark.parametrize("name,channels", [
    ("resnet50", [256, 512, 1024, 2048]),
    ("resnet101c", [256, 512, 1024, 2048]),
    ("swin_tiny", [96, 192, 384, 768]),
])
def test_backbone_real_architectures_non_square(name, channels):
    bb = Backbone(name, freeze_bn=not name.startswith("swin")).eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 96))
    assert list(bb.channels.values()) == channels
    for (key, f), stride, c in zip(out.items(), (4, 8, 16, 32), channels):
        assert f.shape == (1, c, 64 // stride, 96 // stride), key
        assert f.dtype == torch.float32
    if name == "resnet101c":  # deep stem 3->64->64->128, multi-grid dilations in res5
        stem_convs = [m for m in bb.body.conv1 if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size) for c in stem_convs] == [
            (3, 64, (3, 3)), (64, 64, (3, 3)), (64, 128, (3, 3))]
        assert [blk.conv2.dilation for blk in bb.body.layer4] == [(1, 1), (2, 2), (4, 4)]


@pytest.mark.parametrize("name,kwargs", [("resnet50", TINY_RESNET), ("swin_tiny", TINY_SWIN)])
def test_backbone_and_model_on_sizes_not_divisible_by_32(name, kwargs):
    # size_divisibility 0 (official COCO panoptic): res_k = ceil(H / 2^k) as detectron2's
    # ResNet and the official Swin (which zero-pads to the patch size and pads odd maps when
    # merging); the FPN upsamples to each lateral's size
    model = build_model(tiny_cfg(enc_layers=1, backbone=fmf.config.BackboneConfig(
        name=name, img_size=64, freeze_bn=name.startswith("resnet"), kwargs=kwargs))).eval()
    x = torch.randn(1, 3, 69, 93)
    with torch.no_grad():
        feats = model.backbone(x)
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [(18, 24), (9, 12), (5, 6), (3, 3)]
        if name.startswith("swin"):  # the patch embedding's padding is zeros, as the official's
            for a, b in zip(feats.values(), model.backbone(F.pad(x, (0, 3, 0, 3))).values()):
                torch.testing.assert_close(a, b)
        out = model(x)
    assert out.pixel_embed.shape == (1, 32, 18, 24) and torch.isfinite(out.pixel_embed).all()


def test_swin_equals_timm_when_windows_divide():
    # the pad-then-shift window attention is timm's own when no padding is needed
    ours = Backbone("swin_tiny", img_size=128, **TINY_SWIN).eval()
    ref = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=(0, 1, 2, 3), img_size=128,
                            always_partition=True, strict_img_size=False, **TINY_SWIN).eval()
    ref.load_state_dict(ours.body.state_dict())
    x = torch.randn(1, 3, 128, 128)  # stage sizes 32, 16, 8, 4: all multiples of the window
    with torch.no_grad():
        for a, b in zip(ours.body(x), ref(x)):
            torch.testing.assert_close(a, b)
        feats = ours(torch.randn(1, 3, 96, 160))  # padded windows at every stage but the first
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(24, 40), (12, 20), (6, 10), (3, 5)]


def test_frozen_batchnorm_is_frozen():
    model = build_model(tiny_cfg()).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert not bns and frozen
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(images())
    (out.class_logits.square().mean() + out.pred_masks().square().mean()).backward()
    opt.step()
    after = model.backbone.state_dict()
    bn_prefixes = tuple(name + "." for name, m in model.backbone.named_modules() if isinstance(m, FrozenBatchNorm2d))
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed != key.startswith(bn_prefixes), key  # convs train, BN statistics and affine do not
    unfrozen = build_model(tiny_cfg(backbone=fmf.config.BackboneConfig(freeze_bn=False, kwargs=TINY_RESNET)))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfrozen.modules())


# ----------------------------------------------------------------------------- MaskFormer
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (128, 32)])
def test_maskformer_shapes_and_dtypes(size):
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    assert isinstance(model, MaskFormer)
    h, w = size
    with torch.no_grad():
        out = model(images(2, h, w))
    assert isinstance(out, MaskFormerOutput)
    assert out.class_logits.shape == (3, 2, 6, 6)
    assert out.mask_embed.shape == (3, 2, 6, 32)
    assert out.pixel_embed.shape == (2, 32, h // 4, w // 4)
    assert {t.dtype for t in out.as_tuple()} == {torch.float32}
    masks = out.pred_masks()
    assert masks.shape == (2, 6, h // 4, w // 4)
    torch.testing.assert_close(masks, torch.einsum("bqc,bchw->bqhw", out.mask_embed[-1], out.pixel_embed))
    torch.testing.assert_close(out.pred_masks(0), torch.einsum("bqc,bchw->bqhw", out.mask_embed[0], out.pixel_embed))


def test_maskformer_with_encoder_uses_encoder_memory():
    model = build_model(tiny_cfg(enc_layers=2)).eval()
    assert isinstance(model.predictor.input_proj, torch.nn.Identity)  # 32-ch memory, hidden 32: no projection
    assert len(model.pixel_decoder.encoder.layers) == 2
    plain = build_model(tiny_cfg())
    assert isinstance(plain.predictor.input_proj, torch.nn.Conv2d)
    assert plain.predictor.input_proj.in_channels == 256
    with torch.no_grad():
        out = model(images())
    assert out.class_logits.shape == (3, 2, 6, 6) and out.pixel_embed.shape == (2, 32, 16, 24)


@pytest.mark.parametrize("enc_layers", [0, 1])
def test_gradient_reaches_every_parameter(enc_layers):
    model = build_model(tiny_cfg(enc_layers=enc_layers)).train()
    out = model(images())
    logits = torch.einsum("lbqc,bchw->lbqhw", out.mask_embed, out.pixel_embed)
    (out.class_logits.square().mean() + logits.sigmoid().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    # DETR's first self-attention sees the zero decoder input: its values are the (zero-init)
    # value bias, the same for every query, so q/k weights, out_proj and norm1's scale get no
    # gradient at initialisation (as in the official model); everything else must.
    degenerate = {"predictor.decoder.layers.0.self_attn.in_proj_weight",
                  "predictor.decoder.layers.0.self_attn.out_proj.weight", "predictor.decoder.layers.0.norm1.weight"}
    assert set(missing) <= degenerate, set(missing) - degenerate
    assert all(p.requires_grad for p in model.parameters())


def test_dropout_active_in_train_only():
    model = build_model(tiny_cfg())
    x = images()
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a.class_logits, b.class_logits, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c.class_logits, d.class_logits)
    attn = model.predictor.decoder.layers[0].self_attn
    assert attn.dropout == pytest.approx(0.1)  # dropout also on attention probabilities


def test_maskformer_official_defaults():
    model = build_model(fmf.get_config("ade20k-150-r50").model)
    dec = model.predictor.decoder
    assert len(dec.layers) == 6 and model.predictor.query_embed.weight.shape == (100, 256)
    assert dec.layers[0].ffn.linear1.out_features == 2048 and dec.layers[0].self_attn.num_heads == 8
    assert model.predictor.class_embed.out_features == 151
    assert [type(m).__name__ for m in model.predictor.mask_embed.layers] == ["Linear"] * 3
    assert model.pixel_decoder.res5_conv[1].num_groups == 32
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.class_logits.shape == (6, 1, 100, 151) and out.pixel_embed.shape == (1, 256, 16, 16)


def test_preprocess_normalises_and_pads():
    model = build_model(tiny_cfg())
    a = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 64, 33), dtype=torch.uint8)
    batch, sizes = model.preprocess([a, b])
    assert batch.shape == (2, 3, 64, 96) and batch.dtype == torch.float32
    assert sizes == [(50, 70), (64, 33)]
    mean = torch.tensor((123.675, 116.28, 103.53)).view(3, 1, 1)
    std = torch.tensor((58.395, 57.12, 57.375)).view(3, 1, 1)
    torch.testing.assert_close(batch[0, :, :50, :70], (a.float() - mean) / std)
    assert batch[0, :, 50:].abs().sum() == 0 and batch[1, :, :, 33:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        model.preprocess([torch.zeros(64, 64, 3, dtype=torch.uint8)])
    # size_divisibility 0 (official COCO panoptic): the largest image only, not rounded up
    unpadded, _ = build_model(tiny_cfg(size_divisibility=0)).preprocess([a, b])
    assert unpadded.shape == (2, 3, 64, 70)
    torch.testing.assert_close(unpadded, batch[..., :70])
    with pytest.raises(ValueError, match="size_divisibility must be >= 0"):
        build_model(tiny_cfg(size_divisibility=-1))


def test_build_model_rejects_unknown_meta_arch():
    with pytest.raises(ValueError, match="meta_arch"):
        build_model(tiny_cfg(meta_arch="detr"))


def test_public_lazy_names():
    assert fmf.build_model is build_model and fmf.MaskFormer is MaskFormer
    assert fmf.MaskFormerOutput is MaskFormerOutput


# ----------------------------------------------------------------------------- baselines
def _targets():
    a = torch.full((64, 96), 255, dtype=torch.int64)
    a[:32] = 1
    a[32:, :50] = 4
    b = torch.zeros(48, 80, dtype=torch.int64)  # smaller than the padded batch: padding ignored
    b[:, 40:] = 2
    return [fmf.Target.from_semantic(a, 255), fmf.Target.from_semantic(b, 255)]


def test_per_pixel_baseline_shapes_and_loss():
    model = build_model(tiny_cfg(meta_arch="per_pixel_baseline"))
    assert isinstance(model, PerPixelBaseline)
    out = model(images())
    assert out.logits.shape == (1, 2, 5, 16, 24)
    assert out.sem_seg_logits().shape == (2, 5, 64, 96)
    assert out.sem_seg_logits((50, 70)).shape == (2, 5, 50, 70)
    targets = _targets()
    losses = model.losses(out, targets)
    assert set(losses) == {"loss_sem_seg"}
    # reference: CE on x4 bilinear logits over labelled pixels only
    labels = torch.full((2, 64, 96), -1)
    labels[0] = torch.where(targets[0].segment_map >= 0, targets[0].labels[targets[0].segment_map.long().clamp(min=0)],
                            -1)
    labels[1, :48, :80] = targets[1].labels[targets[1].segment_map.long()]
    up = F.interpolate(out.logits[0], scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["loss_sem_seg"], F.cross_entropy(up, labels, ignore_index=-1))
    losses["loss_sem_seg"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # an unpadded 61 x 90 input (size_divisibility 0): logits upsampled to the input size itself
    small = [fmf.Target(t.labels, t.segment_map[:61, :90]) for t in targets]
    out = model(images(2, 61, 90))
    up = F.interpolate(out.logits[0], size=(61, 90), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.losses(out, small, (61, 90))["loss_sem_seg"],
                               F.cross_entropy(up, labels[:, :61, :90], ignore_index=-1))
    torch.testing.assert_close(out.sem_seg_logits((61, 90)), up)


def test_per_pixel_baseline_plus_shapes_and_deep_supervision():
    model = build_model(tiny_cfg(meta_arch="per_pixel_baseline_plus"))
    assert isinstance(model, PerPixelBaselinePlus)
    assert model.predictor.class_embed is None and model.predictor.query_embed.num_embeddings == 5  # Q = K
    out = model(images())
    assert out.logits.shape == (3, 2, 5, 16, 24)
    losses = model.losses(out, _targets())
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_0", "loss_sem_seg_1"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_baseline_rejects_out_of_range_labels():
    model = build_model(tiny_cfg(meta_arch="per_pixel_baseline"))
    bad = fmf.Target(torch.tensor([7]), torch.zeros(64, 96, dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range"):
        model.losses(model(images(1)), [bad])
