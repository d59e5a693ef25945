"""transformers' Mask2FormerForUniversalSegmentation (ResNet and Swin backbones) -> our
Mask2Former: every layer's class and mask logits equal (random weights, non-trivial norms, odd
input size)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")


def _hf_model():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], embedding_size=64,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_layers=1, decoder_layers=4, num_attention_heads=4, dim_feedforward=64,
                               encoder_feedforward_dim=64, num_queries=6, num_labels=5,
                               use_pretrained_backbone=False, output_auxiliary_logits=True)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():  # non-trivial norms and biases everywhere
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.8, 1.2)
    return model


def test_every_layer_equals_transformers():
    from fastmaskformer.convert import from_hf

    hf = _hf_model()
    ours = from_hf(hf)
    assert type(ours).__name__ == "Mask2Former" and ours.predictor.num_layers == 3
    x = torch.nn.functional.pad(torch.randn(1, 3, 90, 117), (0, 11, 0, 6))  # odd image, padded to /32
    with torch.no_grad():
        ref = hf(pixel_values=x, output_auxiliary_logits=True)
        out = ours(x)
    ref_classes = [a["class_queries_logits"] for a in ref.auxiliary_logits] + [ref.class_queries_logits]
    ref_masks = [a["masks_queries_logits"] for a in ref.auxiliary_logits] + [ref.masks_queries_logits]
    assert out.class_logits.shape[0] == len(ref_classes) == 4
    for layer in range(4):
        torch.testing.assert_close(out.class_logits[layer], ref_classes[layer], rtol=1e-4, atol=1e-4)
        masks = torch.einsum("bqc,bchw->bqhw", out.mask_embed[layer], out.pixel_embed)
        torch.testing.assert_close(masks, ref_masks[layer], rtol=1e-4, atol=1e-4)


def test_unknown_keys_are_reported():
    from fastmaskformer.convert.hf_mask2former import mask2former_state_from_hf

    state = dict(_hf_model().state_dict())
    state["model.transformer_module.decoder.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        mask2former_state_from_hf(state)


def test_swin_backbone_every_layer_equals_transformers():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    from fastmaskformer.convert import from_hf

    torch.manual_seed(0)
    backbone = SwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_layers=1, decoder_layers=3, num_attention_heads=4, dim_feedforward=64,
                               encoder_feedforward_dim=64, num_queries=5, num_labels=4,
                               use_pretrained_backbone=False, output_auxiliary_logits=True)
    hf = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = from_hf(hf)
    x = torch.nn.functional.pad(torch.randn(1, 3, 90, 117), (0, 11, 0, 6))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_auxiliary_logits=True)
        out = ours(x)
    ref_classes = [a["class_queries_logits"] for a in ref.auxiliary_logits] + [ref.class_queries_logits]
    ref_masks = [a["masks_queries_logits"] for a in ref.auxiliary_logits] + [ref.masks_queries_logits]
    for layer in range(3):
        torch.testing.assert_close(out.class_logits[layer], ref_classes[layer], rtol=1e-4, atol=1e-4)
        masks = torch.einsum("bqc,bchw->bqhw", out.mask_embed[layer], out.pixel_embed)
        torch.testing.assert_close(masks, ref_masks[layer], rtol=1e-4, atol=1e-4)
