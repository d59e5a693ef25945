"""The training loop: exact resume after SIGKILL, non-finite handling, metrics JSONL, bf16 and
gradient accumulation smoke tests, on a tiny MaskFormer and tiny synthetic data (CPU)."""
import json
import signal
import subprocess
import time

import pytest
import torch

from engine_tiny import REPO, cli_command, cli_env, make_data, tiny_config, write_tiny_yaml
from fastmaskformer.engine.checkpoint import load_checkpoint
from fastmaskformer.engine.trainer import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("syn"))


def _train_cmd(cfg_path, data_root, out, *extra):
    return cli_command("train", "--config", cfg_path, "--data-root", data_root, "--output", out,
                       "--deterministic", "--no-progress", "--log-period", "1", *extra)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, data_root):
    max_iter = 12
    cfg_path = write_tiny_yaml(tmp_path / "tiny.yaml", max_iter=max_iter, checkpoint_period=2)
    full = subprocess.run(_train_cmd(cfg_path, data_root, tmp_path / "full"), env=cli_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(cfg_path, data_root, run), env=cli_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "model_0000004.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in run.glob("model_*.pt"))
    assert "model_0000004.pt" in done and f"model_{max_iter:07d}.pt" not in done, done  # killed mid-run

    resumed = subprocess.run(_train_cmd(cfg_path, data_root, run, "--resume"), env=cli_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "full" / f"model_{max_iter:07d}.pt")
    b = load_checkpoint(run / f"model_{max_iter:07d}.pt")
    assert a["iteration"] == b["iteration"] == max_iter
    assert a["data"] == b["data"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    # the resumed run appended to the same metrics.jsonl; its losses match the uninterrupted run
    def losses(path):
        records = {}
        for line in open(path):
            r = json.loads(line)
            records[r["iter"]] = r["total_loss"]
        return records
    full_losses, resumed_losses = losses(tmp_path / "full" / "metrics.jsonl"), losses(run / "metrics.jsonl")
    assert full_losses == resumed_losses


def _nan_after(module, calls: int):
    """Make ``module`` output NaN on its ``calls``-th forward call only."""
    count = {"n": 0}

    def hook(_, __, output):
        count["n"] += 1
        return output * float("nan") if count["n"] == calls else output
    module.register_forward_hook(hook)


def _nan_loss_at(criterion, calls: int, term: str = "loss_dice"):
    """Make ``criterion`` return NaN for ``term`` on its ``calls``-th call only."""
    forward, count = criterion.forward, {"n": 0}

    def patched(*args, **kwargs):
        count["n"] += 1
        losses = forward(*args, **kwargs)
        if count["n"] == calls:
            losses[term] = losses[term] * float("nan")
        return losses
    criterion.forward = patched


def test_nonfinite_loss_stops_with_iteration_and_terms(tmp_path, data_root):
    cfg = tiny_config(data_root, max_iter=4, checkpoint_period=1)
    trainer = Trainer(cfg, tmp_path, progress=False, log_period=1)
    _nan_loss_at(trainer.criterion, 3)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: loss_dice=nan, total_loss=nan \(all terms: .*loss_ce=\d"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("model_*.pt")) == ["model_0000001.pt", "model_0000002.pt"]
    state = load_checkpoint(tmp_path / "model_0000002.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_loss_skipped_with_skip_mode(tmp_path, data_root, capsys):
    cfg = tiny_config(data_root, max_iter=4, checkpoint_period=1)
    trainer = Trainer(cfg, tmp_path, progress=False, log_period=1, skip_nonfinite=True)
    _nan_after(trainer.model.predictor.class_embed, 3)  # NaN outputs: the matcher cannot even run
    history = trainer.train()
    assert trainer.skipped == 1 and trainer.iteration == 4
    assert "skipped iteration 3: class_logits=nan" in capsys.readouterr().out
    before = load_checkpoint(tmp_path / "model_0000002.pt")["model"]
    after = load_checkpoint(tmp_path / "model_0000003.pt")["model"]  # the skipped step changed nothing
    assert all(torch.equal(before[k], after[k]) for k in before)
    final = load_checkpoint(tmp_path / "model_0000004.pt")["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert [r["iter"] for r in history] == [1, 2, 3, 4]
    assert history[2]["skipped"] == 1.0 and "total_loss" not in history[2]


def test_metrics_jsonl_and_eval(tmp_path, data_root):
    cfg = tiny_config(data_root, max_iter=4, checkpoint_period=0, eval_period=4, grad_accum=2)
    trainer = Trainer(cfg, tmp_path, progress=False, log_period=2)
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train, evals = [r for r in lines if "eval" not in r], [r for r in lines if "eval" in r]
    assert [r["iter"] for r in train] == [2, 4]
    for r in train:
        assert {"iter", "lr", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "total_loss", "images_per_s",
                "time", "grad_norm"} <= set(r)
        assert r["images_per_s"] > 0
    assert evals[0]["iter"] == 4 and 0 <= evals[0]["eval"]["sem_seg/mIoU"] <= 100
    assert (tmp_path / "config.yaml").is_file()
    assert not list(tmp_path.glob("model_*.pt"))


def test_bf16_autocast_step(tmp_path, data_root):
    cfg = tiny_config(data_root, max_iter=1, checkpoint_period=1, amp=True)
    trainer = Trainer(cfg, tmp_path, progress=False, log_period=1)
    history = trainer.train()
    assert torch.isfinite(torch.tensor(history[-1]["total_loss"]))
    assert load_checkpoint(tmp_path / "model_0000001.pt")["iteration"] == 1
