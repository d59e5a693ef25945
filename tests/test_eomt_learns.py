"""Proof that EoMT learns: ``fastmaskformer demo --arch eomt --quick`` trains a tiny random-init
EoMT (ViT depth 6, width 128, patch 8, 24 queries in the last 2 blocks, mask annealing ending
before the evaluation, point-sampled losses) on the synthetic data on the CPU and beats the
trivial baseline in mIoU and PQ. About 2.5 minutes on 2 cores: slow."""
import pytest


@pytest.mark.slow
def test_eomt_demo_quick_learns(tmp_path):
    from fastmaskformer.engine.demo import run_demo

    summary = run_demo(tmp_path / "demo", quick=True, progress=False, arch="eomt")
    assert summary["arch"] == "EoMT"
    assert summary["loss_last"] < 0.85 * summary["loss_first"]
    assert summary["mIoU"] > summary["baseline_mIoU"] + 10  # measured: 42.8 vs 0.9
    assert summary["PQ"] > summary["baseline_PQ"]
    assert len(list((tmp_path / "demo" / "predictions").glob("*_panoptic_overlay.png"))) == 4


def test_demo_config_eomt():
    from fastmaskformer.engine.demo import EOMT_PATCH, demo_config
    from fastmaskformer.losses import PointSampledCriterion, build_criterion
    from fastmaskformer.modeling import EoMT, build_model

    cfg = demo_config("/nonexistent", quick=True, arch="eomt")
    assert cfg.model.meta_arch == "eomt" and cfg.model.num_blocks == 2
    assert isinstance(build_criterion(cfg), PointSampledCriterion)
    # annealing ends before the last iteration: the final evaluation runs unmasked
    assert max(cfg.model.mask_annealing_end) < cfg.solver.max_iter
    model = build_model(cfg.model)
    assert isinstance(model, EoMT) and model.backbone.patch_size == EOMT_PATCH and len(model.backbone.blocks) == 6
    model.mask_annealing.set_step(cfg.solver.max_iter)
    assert model.mask_annealing.probs == [0.0, 0.0]
    # a shorter run moves the annealing along; an explicit schedule stays
    short = demo_config("/nonexistent", arch="eomt", overrides=("solver.max_iter=20",))
    assert max(short.model.mask_annealing_end) < 20
    kept = demo_config("/nonexistent", arch="eomt", overrides=("solver.max_iter=20", "model.mask_annealing_end=[30,40]"))
    assert tuple(kept.model.mask_annealing_end) == (30, 40)
