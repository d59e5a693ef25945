"""``predict`` past bad inputs, the ids in ``_sem.png``, and ``eval`` from any directory."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine_tiny import make_data, tiny_config
from fastmaskformer.cli import main
from fastmaskformer.engine.predictor import semantic_id_table


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model saved as a checkpoint whose config holds a *relative* data root,
    as the demo wrote them before roots were stored absolute: data in base/demo/data, checkpoint
    in base/demo/run, root "demo/data" (relative to base)."""
    from fastmaskformer.modeling import build_model

    base = tmp_path_factory.mktemp("pred")
    data = make_data(base / "demo" / "data", num_train=2, num_val=2)
    cfg = tiny_config(data)
    cfg.data.root = "demo/data"
    torch.manual_seed(0)
    model = build_model(cfg.model)
    (base / "demo" / "run").mkdir()
    path = base / "demo" / "run" / "model.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path, data


def _images(folder, bad=True):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / name)
    if bad:
        good = (folder / "c.jpg").read_bytes()
        (folder / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
        (folder / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def test_predict_skips_bad_images(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    _images(tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "in"), "--checkpoint", str(ckpt), "--data-root", str(data),
               "--output", str(out), "--batch-size", "3"])
    captured = capsys.readouterr()
    assert rc == 1
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "b_truncated.jpg" in warnings[0] and "truncated" in warnings[0]
    assert "d_corrupt.png" in warnings[1]
    assert "2 image(s) could not be read" in captured.err.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a_overlay.png", "a_sem.png", "c_overlay.png", "c_sem.png"]
    sem = np.asarray(Image.open(out / "a_sem.png"))
    assert sem.shape == (40, 52) and sem.min() >= 1 and sem.max() <= 16  # ADE layout: class + 1, 0 = other


def test_predict_nothing_readable_leaves_no_folder(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "in"), "--checkpoint", str(ckpt), "--data-root", str(data),
               "--output", str(out), "--task", "semantic", "panoptic"])
    err = capsys.readouterr().err
    assert rc == 1 and "nothing written" in err and "x.jpg" in err
    assert not out.exists()


def test_sem_ids_contiguous_flag(checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint
    _images(tmp_path / "in", bad=False)
    for mode, out in (("dataset", tmp_path / "o1"), ("contiguous", tmp_path / "o2")):
        assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(ckpt), "--data-root", str(data),
                     "--output", str(out), "--sem-ids", mode]) == 0
    one = np.asarray(Image.open(tmp_path / "o1" / "a_sem.png")).astype(int)
    zero = np.asarray(Image.open(tmp_path / "o2" / "a_sem.png")).astype(int)
    np.testing.assert_array_equal(one, zero + 1)
    assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(ckpt), "--data-root", str(data),
                 "--output", str(tmp_path / "o3"), "--sem-ids", "cityscapes-ids"]) == 2
    assert "Cityscapes" in capsys.readouterr().err


def test_semantic_id_tables():
    assert semantic_id_table("ade20k-150", 150)[[0, 149]].tolist() == [1, 150]
    assert semantic_id_table("ade20k-150", 150, "contiguous") is None
    assert semantic_id_table("cityscapes", 19) is None  # train ids as *_labelTrainIds.png
    ids = semantic_id_table("cityscapes", 19, "cityscapes-ids")
    assert ids.tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert semantic_id_table("ade20k-full-847", 847) is None and semantic_id_table("mapillary", 65) is None


def test_eval_from_another_directory(checkpoint, tmp_path, capsys, monkeypatch):
    """A relative stored root is found from the checkpoint's folders; training stores it absolute."""
    ckpt, data = checkpoint
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(ckpt), "--no-progress"]) == 0, capsys.readouterr().err
    assert "mIoU" in capsys.readouterr().out


def test_trainer_stores_absolute_root(tmp_path, monkeypatch):
    from fastmaskformer.engine import Trainer

    data = make_data(tmp_path / "d", num_train=4, num_val=1)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("d", max_iter=1, checkpoint_period=1)
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False)
    trainer.train()
    state = torch.load(next((tmp_path / "run").glob("model_*.pt")), map_location="cpu", weights_only=False)
    assert state["config"]["data"]["root"] == str(data.resolve()) == os.path.abspath("d")
    assert str(data.resolve()) in (tmp_path / "run" / "config.yaml").read_text()
