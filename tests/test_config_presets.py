"""Presets against the official configs (facebookresearch/MaskFormer configs/): the COCO
panoptic recipes (batch, schedule, input sizes, no padding to 32) and their round trip."""
import pytest

import fastmaskformer as fmf
from fastmaskformer.config import Config
from fastmaskformer.data import build_augmentation


@pytest.mark.parametrize("name", ["coco-panoptic-r50", "coco-panoptic-swin-l"])
def test_coco_panoptic_presets_match_official(name):
    cfg = fmf.get_config(name)
    s, m, d, t = cfg.solver, cfg.model, cfg.data, cfg.test
    # Base-COCO-PanopticSegmentation.yaml: IMS_PER_BATCH 64, MAX_ITER 554400, STEPS (369600,)
    # with detectron2's default WarmupMultiStepLR (GAMMA 0.1); SIZE_DIVISIBILITY 0
    assert (s.batch_size, s.max_iter, s.lr_scheduler, s.steps, s.gamma) == (64, 554400, "step", (369600,), 0.1)
    assert m.size_divisibility == 0 and m.num_classes == 133 and m.num_queries == 100
    assert (t.object_mask_threshold, t.overlap_threshold, t.panoptic_on) == (0.8, 0.8, True)
    assert (d.min_size_test, d.max_size_test) == (800, 1333) and s.clip_grad_norm == 0.01
    if name.endswith("r50"):  # +6 encoder layers; BASE_LR 1e-4, WD 1e-4, backbone x0.1, warmup 10 at 1.0
        assert (m.enc_layers, s.lr, s.weight_decay, s.backbone_multiplier) == (6, 1e-4, 1e-4, 0.1)
        assert (s.warmup_iters, s.warmup_factor, d.max_size_train) == (10, 1.0, 1333)
    else:  # Swin-L: plain FPN, 6e-5, 0.01, x1.0, warmup 1500 from 1e-6, MAX_SIZE_TRAIN 1000
        assert m.backbone.name == "swin_large" and m.enc_layers == 0
        assert (s.lr, s.weight_decay, s.backbone_multiplier) == (6e-5, 0.01, 1.0)
        assert (s.warmup_iters, s.warmup_factor, d.max_size_train) == (1500, 1e-6, 1000)
    pipeline = build_augmentation(d, True, 0)  # DETR-style: flip, then one of resize / crop+resize
    assert pipeline.transforms[1].options[0].max_size == d.max_size_train
    again = Config.from_yaml(cfg.to_yaml())
    assert again.to_dict() == cfg.to_dict()


def test_other_presets_keep_padding_and_poly():
    for name in ("ade20k-150-r50", "ade20k-panoptic-r50", "ade20k-150-swin-l"):
        cfg = fmf.get_config(name)
        assert cfg.model.size_divisibility == 32 and cfg.solver.lr_scheduler == "poly", name
    cfg = fmf.get_config("ade20k-150-r50").override("solver.steps=[100, 200]")
    assert cfg.solver.steps == (100, 200)
