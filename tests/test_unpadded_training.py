"""Training with size_divisibility 0 (official COCO panoptic): the loss gets the padded batch's
real size, which 4x the stride-4 outputs does not give when it is not divisible by 4."""
import pytest
import torch

from engine_tiny import make_data, tiny_config
from fastmaskformer.engine.trainer import Trainer


@pytest.mark.parametrize("meta_arch", ["maskformer", "per_pixel_baseline"])
def test_loss_gets_the_true_input_size(tmp_path, meta_arch):
    cfg = tiny_config(make_data(tmp_path / "data", num_train=4, num_val=1), max_iter=1, checkpoint_period=0,
                      batch_size=2)
    cfg.model.meta_arch, cfg.model.size_divisibility = meta_arch, 0
    cfg.data.crop_size = (62, 57)  # crops padded to 62 x 57: stride-4 outputs 16 x 15 (64 x 60 at x4)
    trainer = Trainer(cfg, tmp_path / "run", progress=False, log_period=1)
    owner, name = (trainer.model, "losses") if meta_arch == "per_pixel_baseline" else (trainer.criterion, "forward")
    loss_fn, seen = getattr(owner, name), []

    def spy(outputs, targets, input_size):
        seen.append((tuple(input_size), tuple(outputs.as_tuple()[-1].shape[-2:])))
        return loss_fn(outputs, targets, input_size)

    setattr(owner, name, spy)
    history = trainer.train()
    assert seen == [((62, 57), (16, 15))]
    assert torch.isfinite(torch.tensor(history[-1]["total_loss"]))
