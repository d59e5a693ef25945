"""CPU smoke of the COCO instance preset path: the mask2former-coco-instance-r50 data and test
settings (LSJ crops, instance targets, instance inference, mask AP) with a tiny Mask2Former."""
import math

import pytest
import torch

pytest.importorskip("pycocotools")

from coco_instance_tiny import make_coco_instance  # noqa: E402
from fastmaskformer.engine.trainer import Trainer  # noqa: E402
from test_evaluation_instance import _tiny_cfg  # noqa: E402


def test_train_and_evaluate_tiny_instance_model(tmp_path):
    torch.set_num_threads(1)
    cfg = _tiny_cfg(make_coco_instance(tmp_path / "data"))
    cfg.solver.batch_size, cfg.solver.max_iter, cfg.solver.checkpoint_period = 2, 2, 2
    cfg.solver.eval_period, cfg.solver.warmup_iters = 2, 0
    trainer = Trainer(cfg, tmp_path / "out", device="cpu", progress=False, num_workers=0)
    assert cfg.data.augmentation == "lsj" and cfg.data.task == "instance"
    records = trainer.train()
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert trainer.iteration == 2 and losses and all(math.isfinite(v) for v in losses)
    assert any("segm" in r.get("eval", {}) for r in records)  # the periodic evaluation ran
    metrics = trainer.evaluate()
    assert set(metrics) == {"segm"} and len(metrics["segm"]["per_class"]) == 80
