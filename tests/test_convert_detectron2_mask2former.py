"""Official Mask2Former Detectron2 checkpoints (model-zoo key layout) -> our Mask2Former: the
official names, written out here from the official code, all land; outputs equal the source."""
import pytest
import torch

import fastmaskformer as fmf
from fastmaskformer.convert.detectron2 import detectron2_name_table, from_detectron2

# Names of the official code for layer 0 of each part (mask2former/modeling/...).
OFFICIAL = [
    "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.input_proj.0.0.weight",
    "sem_seg_head.pixel_decoder.input_proj.2.1.bias",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.attention_weights.bias",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.value_proj.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.output_proj.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm1.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear2.bias",
    "sem_seg_head.pixel_decoder.adapter_1.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight",
    "sem_seg_head.pixel_decoder.layer_1.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias",
    "sem_seg_head.pixel_decoder.mask_features.weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.norm.weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn.out_proj.weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.0.norm.bias",
    "sem_seg_head.predictor.transformer_ffn_layers.0.linear1.weight",
    "sem_seg_head.predictor.transformer_ffn_layers.0.norm.weight",
    "sem_seg_head.predictor.decoder_norm.weight",
    "sem_seg_head.predictor.query_feat.weight",
    "sem_seg_head.predictor.query_embed.weight",
    "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.class_embed.bias",
    "sem_seg_head.predictor.mask_embed.layers.2.weight",
    "backbone.stem.conv1.weight",
    "backbone.res2.0.conv1.norm.running_mean",
]


def tiny_cfg():
    cfg = fmf.get_config("mask2former-ade20k-150-r50")
    m = cfg.model
    m.backbone.name, m.backbone.kwargs = "resnet50", {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 16]}
    m.num_classes, m.num_queries, m.hidden_dim, m.mask_dim, m.conv_dim = 5, 6, 32, 32, 32
    m.nheads, m.dim_feedforward, m.dec_layers = 4, 48, 4
    m.pixel_decoder_kwargs = {"enc_layers": 2, "nheads": 4, "dim_feedforward": 48}
    return cfg


def test_official_names_convert_and_outputs_equal():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    source = fmf.build_model(cfg.model).eval()
    table = detectron2_name_table(source)
    for name in OFFICIAL:
        assert name in table, name
    ours = source.state_dict()
    official = {name: ours[key].clone() for name, key in table.items()}
    official["pixel_mean"] = torch.tensor(cfg.model.pixel_mean).view(3, 1, 1)
    cfg.model.pixel_decoder_kwargs = {"nheads": 4, "dim_feedforward": 48}  # encoder depth read from the file
    model = from_detectron2(official, cfg)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = source(x), model(x)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    torch.testing.assert_close(a.mask_embed, b.mask_embed)


def test_architecture_mismatch_is_named():
    cfg = tiny_cfg()
    official = {name: torch.zeros(1) for name in detectron2_name_table(fmf.build_model(cfg.model))}
    with pytest.raises(ValueError, match="Mask2Former"):
        from_detectron2(official, "ade20k-150-r50")
