"""Proof that Mask2Former learns: ``fastmaskformer demo --arch mask2former --quick`` trains a
tiny Mask2Former (ResNet-18, deformable pixel decoder with 1 encoder layer, 3 masked-attention
layers, point-sampled losses) on the synthetic data on the CPU and beats the trivial baseline.
Several minutes on 2 cores: slow."""
import pytest


@pytest.mark.slow
def test_mask2former_demo_quick_learns(tmp_path):
    from fastmaskformer.engine.demo import run_demo

    summary = run_demo(tmp_path / "demo", quick=True, progress=False, arch="mask2former")
    assert summary["arch"] == "Mask2Former"
    assert summary["loss_last"] < 0.85 * summary["loss_first"]
    assert summary["mIoU"] > summary["baseline_mIoU"]
    assert len(list((tmp_path / "demo" / "predictions").glob("*_panoptic_overlay.png"))) == 4


def test_demo_config_mask2former():
    from fastmaskformer.engine.demo import demo_config
    from fastmaskformer.losses import PointSampledCriterion, build_criterion

    cfg = demo_config("/nonexistent", quick=True, arch="mask2former")
    assert cfg.model.meta_arch == "mask2former" and cfg.model.pixel_decoder == "msdeformattn"
    assert isinstance(build_criterion(cfg), PointSampledCriterion)
    with pytest.raises(ValueError, match="architecture"):
        demo_config("/nonexistent", arch="detr")
