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


def test_floats_written_without_a_dot():
    """YAML 1.1 reads 1e-4 as a string; a float key takes it as the number it means."""
    cfg = fmf.get_config("ade20k-150-r50").override("solver.lr=5e-4")
    assert cfg.solver.lr == 5e-4
    again = fmf.Config.from_yaml("solver:\n  lr: 2E-5\n  weight_decay: 1e-2\n")
    assert (again.solver.lr, again.solver.weight_decay) == (2e-5, 1e-2)
    with pytest.raises(ValueError, match="solver.lr.*expects float.*'fast'"):
        cfg.override("solver.lr=fast")


def test_mask2former_coco_instance_preset_matches_official():
    """configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml (+ its Base-COCO-...)."""
    cfg = fmf.get_config("mask2former-coco-instance-r50")
    s, m, d, t = cfg.solver, cfg.model, cfg.data, cfg.test
    assert (m.meta_arch, m.num_classes, m.num_queries, m.dec_layers, m.size_divisibility) == ("mask2former", 80, 100, 10, 32)
    # IMS_PER_BATCH 16, MAX_ITER 368750, STEPS (327778, 355092), WARMUP 10 at 1.0, AdamW 1e-4 wd 0.05
    assert (s.batch_size, s.max_iter, s.lr_scheduler, s.steps, s.gamma) == (16, 368750, "step", (327778, 355092), 0.1)
    assert (s.warmup_iters, s.warmup_factor, s.lr, s.weight_decay, s.clip_grad_norm) == (10, 1.0, 1e-4, 0.05, 0.01)
    # coco_instance_lsj: IMAGE_SIZE 1024, scale 0.1-2.0; detectron2's default test size 800 / 1333
    assert (d.dataset, d.task, d.augmentation, d.crop_size) == ("coco-instance", "instance", "lsj", (1024, 1024))
    assert (d.min_size_test, d.max_size_test) == (800, 1333)
    assert (t.semantic_on, t.instance_on, t.panoptic_on, t.instance_topk) == (False, True, False, 100)
    assert (t.object_mask_threshold, t.overlap_threshold) == (0.8, 0.8)
    assert Config.from_yaml(cfg.to_yaml()).to_dict() == cfg.to_dict()
    fmf.build_model(cfg.model)  # the preset builds


def test_mask2former_cityscapes_panoptic_preset_matches_official():
    """configs/cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml (+ its Base-...)."""
    cfg = fmf.get_config("mask2former-cityscapes-panoptic-r50")
    s, m, d, t = cfg.solver, cfg.model, cfg.data, cfg.test
    assert (m.meta_arch, m.num_classes, m.num_queries, m.dec_layers) == ("mask2former", 19, 100, 10)
    assert (s.batch_size, s.max_iter, s.lr_scheduler, s.warmup_iters) == (16, 90000, "poly", 0)
    assert (s.lr, s.weight_decay, s.backbone_multiplier, s.clip_grad_norm) == (1e-4, 0.05, 0.1, 0.01)
    # MIN_SIZE_TRAIN int(x * 0.1 * 1024) for x in 5..20, MAX 4096, crop 512x1024, SSD colour, test 1024/2048
    assert (d.dataset, d.task, d.crop_size, d.max_size_train) == ("cityscapes-panoptic", "panoptic", (512, 1024), 4096)
    assert (d.min_size_test, d.max_size_test, d.color_jitter, d.ignore_label) == (1024, 2048, True, 255)
    pipeline = build_augmentation(d, True, 0)
    assert "Crop" in repr(pipeline) or any("Crop" in type(tr).__name__ for tr in pipeline.transforms)
    assert (t.semantic_on, t.instance_on, t.panoptic_on) == (True, True, True)
    assert (t.object_mask_threshold, t.overlap_threshold) == (0.8, 0.8)
    assert Config.from_yaml(cfg.to_yaml()).to_dict() == cfg.to_dict()
    fmf.build_model(cfg.model)
