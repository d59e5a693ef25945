"""``data.on_bad_sample``: error stops at a corrupt training file; skip replaces it
deterministically (exact resume), logs it once, counts it in metrics.jsonl, and stops past
``data.max_bad_fraction``."""
import json
import shutil

import pytest
import torch

from engine_tiny import make_data, tiny_config
from fastmaskformer.cli import main
from fastmaskformer.data import DatasetError, build_dataset
from fastmaskformer.data.bad_samples import SkipBadSamples
from fastmaskformer.data.loader import collate
from fastmaskformer.engine.checkpoint import load_checkpoint
from fastmaskformer.engine.trainer import Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = make_data(tmp_path_factory.mktemp("bad"), num_train=8, num_val=1)
    images = sorted(root.rglob("images/training/*"))
    data = images[2].read_bytes()
    images[2].write_bytes(data[: len(data) // 3])  # a truncated download
    return root, images[2]


def test_wrapper_replaces_with_next_readable_same_seed(data_root):
    root, bad = data_root
    cfg = tiny_config(root)
    ds = build_dataset(cfg.data, "train", train=True)
    with pytest.raises(DatasetError, match=bad.name):
        ds[(2, 123)]
    wrapped = SkipBadSamples(ds)
    item = wrapped[(2, 123)]
    expected = ds[(3, 123)]
    assert torch.equal(item["image"], expected["image"]) and item["file_name"] == expected["file_name"]
    assert len(item["bad_samples"]) == 1 and item["bad_samples"][0][0] == str(bad)
    assert wrapped[(5, 7)]["bad_samples"] == [] and len(wrapped) == len(ds)
    batch = collate([wrapped[(2, 1)], wrapped[(4, 1)]])
    assert [p for p, _ in batch["bad_samples"]] == [str(bad)]


def test_error_mode_stops_naming_the_file(tmp_path, data_root, capsys):
    root, bad = data_root
    cfg = tiny_config(root, max_iter=4, checkpoint_period=0)
    trainer = Trainer(cfg, tmp_path, progress=False, log_period=1)
    with pytest.raises(DatasetError, match=bad.name):
        trainer.train()


def _skip_cfg(root, **solver):
    cfg = tiny_config(root, **solver)
    cfg.data.on_bad_sample = "skip"
    cfg.data.max_bad_fraction = 0.2
    return cfg


def test_skip_mode_logs_once_counts_and_resumes_exactly(tmp_path, data_root, capsys):
    root, bad = data_root
    torch.manual_seed(0)
    full = Trainer(_skip_cfg(root, max_iter=4, checkpoint_period=2), tmp_path / "full", progress=False, log_period=1)
    full.train()
    err = capsys.readouterr().err
    assert err.count("warning: skipping unreadable training sample") == 1 and bad.name in err
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["bad_samples"] for r in records if "bad_samples" in r]
    assert len(counts) == 4 and counts == sorted(counts) and counts[-1] == 2  # 16 draws: 2 epochs of 8
    assert all("total_loss" in r and r["grad_norm"] > 0 for r in records)  # every step trained
    assert full.bad_samples == counts[-1] and list(full.bad_files) == [str(bad)]

    # resume from iteration 2 in another folder: the same weights as the uninterrupted run
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "model_0000002.pt", tmp_path / "resumed")
    resumed = Trainer(_skip_cfg(root, max_iter=4, checkpoint_period=2), tmp_path / "resumed", progress=False,
                      log_period=1, resume=tmp_path / "resumed" / "model_0000002.pt")
    resumed.train()
    assert "warning: skipping" not in capsys.readouterr().err  # already logged before the checkpoint
    a = load_checkpoint(tmp_path / "full" / "model_0000004.pt")
    b = load_checkpoint(tmp_path / "resumed" / "model_0000004.pt")
    assert a["data"] == b["data"] and a["bad_samples"] == b["bad_samples"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_skip_mode_stops_past_the_fraction(tmp_path, data_root):
    root, _ = data_root
    cfg = _skip_cfg(root, max_iter=4, checkpoint_period=0)
    cfg.data.max_bad_fraction = 0.1  # 1 of 8 files is 12.5 %
    with pytest.raises(DatasetError, match=r"1 of 8 training samples are unreadable, more than data.max_bad_fraction=0.1"):
        Trainer(cfg, tmp_path, progress=False, log_period=1).train()


def test_cli_rejects_unknown_mode(tmp_path, data_root, capsys):
    root, _ = data_root
    rc = main(["train", "--preset", "ade20k-150-r50", "--data-root", str(root), "--set", "data.on_bad_sample=ignore",
               "--output", str(tmp_path)])
    assert rc == 2 and "data.on_bad_sample must be error or skip" in capsys.readouterr().err
