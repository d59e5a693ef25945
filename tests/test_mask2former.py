"""Mask2Former's model: the masked-attention decoder against the official order of operations
(full [B,Q,h,w] logits, resampled, sigmoid < 0.5, fully masked rows unmasked), shapes, the
meta-architecture built from config, presets."""
import pytest
import torch
import torch.nn.functional as F

import fastmaskformer as fmf
from fastmaskformer.modeling.masked_attention_decoder import (
    MaskedAttentionDecoder,
    attention_mask,
    resample_pixel_embed,
)


def official_attention_mask(mask_embed, pixel_embed, size, nheads):
    """forward_prediction_heads of the official decoder: logits -> resample -> sigmoid < 0.5."""
    logits = torch.einsum("bqc,bchw->bqhw", mask_embed, pixel_embed)
    m = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return m.sigmoid().flatten(2).unsqueeze(1).repeat(1, nheads, 1, 1).flatten(0, 1) < 0.5, logits


def official_forward(dec: MaskedAttentionDecoder, features, pixel_embed):
    """The official MultiScaleMaskedTransformerDecoder.forward order with our modules' weights."""
    sizes = [x.shape[-2:] for x in features]
    srcs = [dec.input_proj[i](x).flatten(2).transpose(1, 2) + dec.level_embed.weight[i] for i, x in enumerate(features)]
    pos = [dec.pe(x).flatten(2).transpose(1, 2) for x in features]
    b = pixel_embed.shape[0]
    query_pos = dec.query_embed.weight[None].repeat(b, 1, 1)
    output = dec.query_feat.weight[None].repeat(b, 1, 1)

    def heads(output, size):
        x = dec.decoder_norm(output)
        emb = dec.mask_embed(x)
        mask, _ = official_attention_mask(emb, pixel_embed, size, dec.nheads)
        return dec.class_embed(x), emb, mask

    cls, emb, mask = heads(output, sizes[0])
    classes, embeds = [cls], [emb]
    for i in range(dec.num_layers):
        level = i % 3
        mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
        output = dec.cross_attention_layers[i](output, srcs[level], pos[level], query_pos, mask)
        output = dec.self_attention_layers[i](output, query_pos)
        output = dec.ffn_layers[i](output)
        cls, emb, mask = heads(output, sizes[(i + 1) % 3])
        classes.append(cls)
        embeds.append(emb)
    return torch.stack(classes), torch.stack(embeds)


def small_decoder(num_predictions=5):
    torch.manual_seed(0)
    dec = MaskedAttentionDecoder(in_channels=24, num_classes=6, num_queries=9, hidden_dim=32, mask_dim=16, nheads=4,
                                 dim_feedforward=48, num_predictions=num_predictions)
    with torch.no_grad():  # non-trivial norms
        for mod in dec.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return dec.double()


def odd_inputs(b=2):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(b, 24, h, w, generator=g, dtype=torch.float64) for h, w in ((3, 5), (5, 9), (9, 17))]
    pixel_embed = torch.randn(b, 16, 17, 33, generator=g, dtype=torch.float64)
    return feats, pixel_embed


def test_attention_mask_equals_the_official_order_on_tie_free_positions():
    torch.manual_seed(0)
    emb = torch.randn(2, 9, 16, dtype=torch.float64)
    emb[0, 3] = -10 * emb[0, 3].abs()  # a query far from any pixel: a fully blocked row ...
    pe = torch.randn(2, 16, 17, 33, dtype=torch.float64).abs()
    for size in ((3, 5), (5, 9), (9, 17), (17, 33), (4, 4)):
        ours = attention_mask(emb, resample_pixel_embed(pe, [size])[0], 4)
        ref, _ = official_attention_mask(emb, pe, size, 4)
        logits = F.interpolate(torch.einsum("bqc,bchw->bqhw", emb, pe), size=size, mode="bilinear",
                               align_corners=False).flatten(2).repeat_interleave(4, 0)
        ref[torch.where(ref.sum(-1) == ref.shape[-1])] = False  # ... unmasked, as the official loop does
        tie_free = logits.abs() > 1e-9
        assert torch.equal(ours[tie_free], ref[tie_free])
        assert ours.shape == (2 * 4, 9, size[0] * size[1])
        assert not ours.all(-1).any()


def test_decoder_equals_the_official_forward():
    dec = small_decoder()
    feats, pixel_embed = odd_inputs()
    cls, emb = dec(feats, pixel_embed)
    ref_cls, ref_emb = official_forward(dec, feats, pixel_embed)
    assert cls.shape == (5, 2, 9, 7) and emb.shape == (5, 2, 9, 16)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-10, atol=1e-10)


def test_masking_matters():
    """Changing the pixel embedding changes later predictions only through the attention masks
    (the first prediction does not read it)."""
    dec = small_decoder()
    feats, pixel_embed = odd_inputs()
    cls_a, _ = dec(feats, pixel_embed)
    cls_b, _ = dec(feats, -pixel_embed)
    torch.testing.assert_close(cls_a[0], cls_b[0])
    assert not torch.allclose(cls_a[1], cls_b[1])


def test_official_structure_and_parameter_names():
    dec = MaskedAttentionDecoder(256, 150)
    assert dec.num_layers == 9
    assert isinstance(dec.input_proj[0], torch.nn.Identity)  # enforce_input_project False
    assert dec.query_feat.weight.shape == dec.query_embed.weight.shape == (100, 256)
    assert dec.level_embed.weight.shape == (3, 256)
    assert dec.ffn_layers[0].ffn.linear1.weight.shape == (2048, 256)
    assert dec.cross_attention_layers[0].attn.dropout == 0.0


def tiny_mask2former_config(num_classes=5):
    cfg = fmf.get_config("mask2former-ade20k-150-r50")
    m = cfg.model
    m.backbone.name, m.backbone.freeze_bn = "resnet18", False
    m.num_classes, m.num_queries, m.hidden_dim, m.mask_dim, m.conv_dim = num_classes, 8, 32, 32, 32
    m.nheads, m.dim_feedforward, m.dec_layers = 4, 64, 4
    m.pixel_decoder_kwargs = {"enc_layers": 1, "dim_feedforward": 64, "nheads": 4}
    cfg.loss.num_points = 64
    return cfg


def test_model_from_config_forward_loss_backward():
    cfg = tiny_mask2former_config()
    model = fmf.build_model(cfg.model)
    assert type(model).__name__ == "Mask2Former"
    images, sizes = model.preprocess([torch.randint(0, 255, (3, 70, 90), dtype=torch.uint8),
                                      torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)])
    out = model(images)
    assert out.class_logits.shape == (4, 2, 8, 6) and out.mask_embed.shape == (4, 2, 8, 32)
    assert out.pixel_embed.shape == (2, 32, images.shape[-2] // 4, images.shape[-1] // 4)
    from fastmaskformer.losses import PointSampledCriterion, build_criterion

    crit = build_criterion(cfg)
    assert isinstance(crit, PointSampledCriterion) and crit.num_points == 64
    seg = torch.zeros(70, 90, dtype=torch.int64)
    seg[10:40, 20:60] = 3
    targets = [fmf.Target.from_semantic(seg, 255), fmf.Target.from_semantic(torch.full((64, 64), 1), 255)]
    losses = crit(out, targets, images.shape[-2:])
    assert len(losses) == 12
    crit.total(losses).backward()
    assert model.predictor.query_feat.weight.grad.abs().sum() > 0


def test_mask2former_needs_the_deformable_pixel_decoder():
    cfg = tiny_mask2former_config()
    cfg.model.pixel_decoder = "fpn"
    with pytest.raises(ValueError, match="msdeformattn"):
        fmf.build_model(cfg.model)


def test_presets_mirror_the_official_configs():
    names = [n for n in fmf.list_presets() if n.startswith("mask2former-")]
    for n in ("ade20k-150-r50", "ade20k-150-r101", "ade20k-150-swin-t", "ade20k-150-swin-s", "ade20k-150-swin-b",
              "ade20k-150-swin-l", "ade20k-panoptic-r50", "coco-panoptic-r50", "coco-panoptic-swin-l",
              "cityscapes-r50", "mapillary-r50", "ade20k-full-847-r50"):
        assert "mask2former-" + n in names
    for n in names:
        cfg = fmf.get_config(n)
        assert cfg.model.meta_arch == "mask2former" and cfg.model.pixel_decoder == "msdeformattn"
        assert (cfg.model.dec_layers, cfg.model.dropout, cfg.model.hidden_dim, cfg.model.nheads) == (10, 0.0, 256, 8)
        assert (cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight) == (2.0, 5.0, 5.0)
        assert (cfg.loss.mask_loss, cfg.loss.mask_sampling, cfg.loss.num_points) == ("bce", "points", 12544)
        assert (cfg.solver.lr, cfg.solver.weight_decay, cfg.solver.backbone_multiplier) == (1e-4, 0.05, 0.1)
        assert cfg.solver.clip_grad_norm == 0.01 and cfg.test.object_mask_threshold == 0.8
    assert fmf.get_config("mask2former-coco-panoptic-swin-l").model.num_queries == 200
    coco = fmf.get_config("mask2former-coco-panoptic-r50")
    assert coco.data.augmentation == "lsj" and coco.data.crop_size == (1024, 1024) and coco.solver.max_iter == 368750
    assert fmf.get_config("mask2former-ade20k-150-swin-b").data.crop_size == (640, 640)
    assert fmf.get_config("mask2former-mapillary-r50").data.crop_size == (1024, 1024)


def test_lsj_augmentation_gives_fixed_crops():
    import numpy as np

    from fastmaskformer.data.transforms import build_augmentation

    cfg = fmf.get_config("mask2former-coco-panoptic-r50")
    cfg.data.crop_size = (64, 64)
    aug = build_augmentation(cfg.data, train=True, ignore_label=0)
    rng = np.random.default_rng(0)
    image = np.zeros((40, 90, 3), np.uint8)
    seg = np.ones((40, 90), np.int64)
    for _ in range(5):
        im, sg = aug(image, seg, rng)
        assert im.shape == (64, 64, 3) and sg.shape == (64, 64)


@pytest.mark.slow  # about a minute of tracing on 2 shared cores
def test_mask2former_forward_and_point_losses_have_no_graph_break():
    import torch._dynamo

    from fastmaskformer.losses import build_criterion

    cfg = tiny_mask2former_config()
    cfg.loss.impl = "torch"
    torch.manual_seed(0)
    model = fmf.build_model(cfg.model).eval()
    images = torch.randn(2, 3, 64, 96)
    explained = torch._dynamo.explain(model)(images)
    assert explained.graph_break_count == 0, explained.break_reasons
    out = model(images)
    targets = [fmf.Target.from_semantic(torch.randint(0, 5, (64, 96))),
               fmf.Target.from_semantic(torch.randint(0, 3, (50, 70)))]
    crit = build_criterion(cfg)
    args = crit.prepare(out, targets, images.shape[-2:])
    pts = crit.draw_points(out.class_logits.shape[0], 2, args[4].shape[1], "cpu")
    explained = torch._dynamo.explain(crit.losses)(*args, pts["match"], pts["candidates"], pts["extra"])
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_recipe_queries_and_level_embeddings_have_no_weight_decay():
    from fastmaskformer.engine.optim import build_param_groups

    cfg = tiny_mask2former_config()
    model = fmf.build_model(cfg.model)
    groups = build_param_groups(model, cfg.solver)
    decay_of = {id(p): (g["weight_decay"], g["lr"]) for g in groups for p in g["params"]}
    for p in (model.predictor.query_feat.weight, model.predictor.query_embed.weight, model.predictor.level_embed.weight,
              model.predictor.decoder_norm.weight):
        assert decay_of[id(p)] == (0.0, 1e-4)
    assert decay_of[id(model.predictor.class_embed.weight)] == (0.05, 1e-4)
    backbone_lrs = {decay_of[id(p)][1] for p in model.backbone.parameters() if p.requires_grad}
    assert backbone_lrs == {1e-5}
