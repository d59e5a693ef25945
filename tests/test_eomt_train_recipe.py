"""EoMT's official recipe through the trainer on a tiny EoMT: layer-wise lr decay and the
two-stage schedule reach the optimiser, gradient clipping at 0.01, bf16 autocast,
``train --compile`` (slow), and the --fsdp / --activation-checkpointing command-line flags."""
import math

import pytest
import torch

from engine_tiny import make_data, write_tiny_yaml
from fastmaskformer.cli import main
from test_engine_fsdp import _single_process, eomt_config


def test_recipe_reaches_the_optimizer_and_clips_at_001(tmp_path):
    """Two steps of the sampled recipe (annealing, points, layer decay 0.8, two-stage warm-up of
    1 + 1 iterations, clipping 0.01): the logged head lr is the schedule's, the ViT waits a step,
    and the gradients applied have norm 0.01."""
    cfg = eomt_config(True, max_iter=2, checkpoint_period=0)
    trainer, history = _single_process(tmp_path, cfg)
    assert [h["lr"] for h in history] == [0.0, pytest.approx(1e-3)]  # heads: 0/1 warm-up, then poly (1 - 0/1)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    # at iteration 2: heads (1 - 1/1) ** 0.9 = 0; the ViT's block 0, x 0.8^3, just past its 1-step warm-up
    assert groups["head/decay"]["lr"] == 0.0
    assert groups["backbone/decay/layer3"]["lr"] == pytest.approx(1e-3 * 0.8 ** 3)
    assert groups["backbone/decay/layer0"]["lr"] == pytest.approx(1e-3)
    assert all(h["grad_norm"] > 0.01 and math.isfinite(h["total_loss"]) for h in history)

    # the clipped gradients: one more step by hand, looking at the gradients the optimiser gets
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(float(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]))))
        return step(*args, **kwargs)
    trainer.optimizer.step = recording_step
    trainer.run_step(iter(trainer._loader()))
    assert seen == [pytest.approx(0.01, rel=1e-4)]


def test_bf16_autocast_trains(tmp_path):
    """solver.amp: the ViT runs in bf16 (its outputs are cast to fp32 for the losses); the losses
    stay finite and near the fp32 ones (bf16 rounding: within 5%)."""
    _, fp32 = _single_process(tmp_path / "fp32", eomt_config(False, max_iter=2, checkpoint_period=0))
    trainer, bf16 = _single_process(tmp_path / "bf16", eomt_config(False, max_iter=2, checkpoint_period=0,
                                                                   amp=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trainer.model(torch.zeros(1, 3, 64, 64))
    assert out.class_logits.dtype == torch.bfloat16
    for a, b in zip(bf16, fp32):
        assert math.isfinite(a["total_loss"]) and a["total_loss"] == pytest.approx(b["total_loss"], rel=0.05)


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    """solver.compile (train --compile) with bf16 autocast and activation checkpointing: two
    steps, losses within 1e-3 of eager (fusion reorders float operations)."""
    options = dict(max_iter=2, checkpoint_period=0, amp=True, activation_checkpointing=True)
    _, eager = _single_process(tmp_path / "eager", eomt_config(False, **options))
    _, compiled = _single_process(tmp_path / "compiled", eomt_config(False, compile=True, **options))
    assert [h["total_loss"] for h in compiled] == pytest.approx([h["total_loss"] for h in eager], rel=1e-3)


def test_cli_flags(tmp_path, capsys):
    """--fsdp and --activation-checkpointing set the solver fields; a run they cannot apply to
    stops with one line naming the problem."""
    data = make_data(tmp_path / "data", num_train=4, num_val=1)
    maskformer = write_tiny_yaml(tmp_path / "tiny.yaml", max_iter=1, eval_period=0)
    for flag, message in (("--fsdp", "solver.fsdp supports meta_arch eomt"),
                          ("--activation-checkpointing", "solver.activation_checkpointing supports meta_arch eomt")):
        rc = main(["train", "--config", str(maskformer), "--data-root", str(data), "--output", str(tmp_path / "run"),
                   "--no-progress", "--num-workers", "0", flag])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err
    eomt = tmp_path / "eomt.yaml"
    eomt.write_text(eomt_config(False, max_iter=1, checkpoint_period=1).to_yaml())
    rc = main(["train", "--config", str(eomt), "--data-root", str(data), "--output", str(tmp_path / "fsdp"),
               "--no-progress", "--fsdp", "--set", "data.dataset=synthetic-semantic"])
    err = capsys.readouterr().err
    assert rc == 2 and "solver.fsdp shards the model over torchrun's processes" in err, err
    rc = main(["train", "--config", str(eomt), "--data-root", str(data), "--output", str(tmp_path / "ac"),
               "--no-progress", "--num-workers", "0", "--activation-checkpointing",
               "--set", "data.dataset=synthetic-semantic", "--set", "data.crop_size=[64,64]",
               "--set", "data.color_jitter=false"])
    assert rc == 0, capsys.readouterr().err
    state = torch.load(tmp_path / "ac" / "model_0000001.pt", weights_only=True)
    assert state["config"]["solver"]["activation_checkpointing"] is True
