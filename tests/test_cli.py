"""The ``fastmaskformer`` command end to end on tiny synthetic data (in-process ``main``), the
one-line errors for user mistakes, and the demo's short variant."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from engine_tiny import make_data, run_cli, write_tiny_yaml
from fastmaskformer.cli import build_parser, main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 4 iterations through ``fastmaskformer train``."""
    root = tmp_path_factory.mktemp("cli")
    data = make_data(root / "data")
    cfg = write_tiny_yaml(root / "tiny.yaml", max_iter=4, checkpoint_period=2, eval_period=4)
    rc = main(["train", "--config", str(cfg), "--data-root", str(data), "--output", str(root / "run"),
               "--no-progress", "--log-period", "2", "--set", "solver.lr=0.002"])
    assert rc == 0
    return root, data, root / "run"


def test_train_writes_checkpoints_metrics_config(trained):
    _, _, run = trained
    assert sorted(p.name for p in run.glob("model_*.pt")) == ["model_0000002.pt", "model_0000004.pt"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [2, 4, 4] and "eval" in lines[-1]
    assert lines[0]["lr"] == pytest.approx(0.002 * (1 - 1 / 4) ** 0.9)  # --set reached the solver
    assert "lr: 0.002" in (run / "config.yaml").read_text()


def test_eval_uses_the_config_in_the_checkpoint(trained, capsys, tmp_path):
    _, data, run = trained
    rc = main(["eval", "--checkpoint", str(run / "model_0000004.pt"), "--data-root", str(data),
               "--output", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert "sem_seg: mIoU" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= results["sem_seg"]["mIoU"] <= 100 and len(results["sem_seg"]["IoU"]) == 16


def test_eval_with_tta(trained, capsys):
    _, data, run = trained
    rc = main(["eval", "--checkpoint", str(run / "model_0000004.pt"), "--data-root", str(data), "--no-progress",
               "--set", "test.aug_scales=[48,64]", "--set", "test.aug_flip=true"])
    assert rc == 0 and "mIoU" in capsys.readouterr().out


def _odd_images(folder):
    """Odd sizes and formats: RGBA, grayscale, 16-bit grayscale, palette, JPEG."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (70, 33), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 65536, (41, 90), dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (129, 65, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    (folder / "notes.txt").write_text("not an image")  # ignored by folder scanning
    return {"rgba": (37, 53), "gray": (70, 33), "deep16": (41, 90), "palette": (50, 50), "photo": (129, 65)}


def test_predict_odd_sizes_and_formats(trained, tmp_path, capsys):
    _, data, run = trained
    sizes = _odd_images(tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "in"), "--checkpoint", str(run / "model_0000004.pt"), "--data-root",
               str(data), "--output", str(out), "--task", "semantic", "panoptic", "instance", "--batch-size", "3"])
    assert rc == 0, capsys.readouterr().err
    for stem, (h, w) in sizes.items():
        sem = np.asarray(Image.open(out / f"{stem}_sem.png"))
        assert sem.shape == (h, w) and 1 <= sem.min() and sem.max() <= 16  # ADE layout: class + 1
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (h, w, 3)
        assert np.asarray(Image.open(out / f"{stem}_panoptic.png")).shape == (h, w, 3)
        inst = np.load(out / f"{stem}_instances.npz")
        assert inst["masks"].shape[1:] == (h, w) and len(inst["scores"]) == len(inst["labels"])
    pan = json.loads((out / "panoptic.json").read_text())
    assert sorted(a["image_id"] for a in pan["annotations"]) == sorted(sizes)
    assert len(pan["categories"]) == 16


def test_predictions_independent_of_batching(trained, tmp_path):
    """Batched prediction gives each image its own result: images of different padded test
    sizes never share a batch (only float summation order may differ)."""
    import torch

    from fastmaskformer.cli import _load_model, build_parser
    from fastmaskformer.engine.predictor import Predictor, load_image

    _, data, run = trained
    _odd_images(tmp_path / "in")
    args = build_parser().parse_args(["predict", "x", "--checkpoint", "c", "--data-root", str(data)])
    model, cfg = _load_model(str(run / "model_0000004.pt"), args, "cpu")
    from fastmaskformer.data import get_metadata

    images = [load_image(p) for p in sorted((tmp_path / "in").glob("*.png"))]
    one = Predictor(model, cfg, get_metadata(cfg.data.dataset, data), batch_size=1).predict(images)
    many = Predictor(model, cfg, get_metadata(cfg.data.dataset, data), batch_size=4).predict(images)
    for a, b in zip(one, many):
        assert (a["semantic"] != b["semantic"]).float().mean() <= 1e-4


def test_plot(trained, tmp_path, capsys):
    _, _, run = trained
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size[0] > 100


def test_plot_and_demo_without_matplotlib(trained, tmp_path, monkeypatch, capsys):
    """matplotlib unimportable: plot still checks its input first, then fails in one line naming
    the fix; the demo's plotting step reports the same and lets the demo go on."""
    from fastmaskformer.engine.demo import write_curves

    _, _, run = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["plot", "/nonexistent/metrics.jsonl"]) == 2
    assert "metrics file /nonexistent/metrics.jsonl not found" in capsys.readouterr().err
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plotting needs matplotlib" in err and "pip install matplotlib" in err
    assert not (tmp_path / "c.png").exists()
    line = write_curves(run)
    assert line.startswith("no curves: plotting needs matplotlib") and "\n" not in line


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["train", "--preset", "ade20k-150-r50", "--set", "solver.nope=1"], "unknown config key 'solver.nope'"),
    (["train", "--preset", "ade20k-150-r50", "--set", "solver.max_iter=abc"], "expects int"),
    (["train", "--preset", "ade20k-150-r50", "--set", "no_equals"], "must look like key.path=value"),
    (["train", "--config", "/nonexistent/x.yaml"], "config file /nonexistent/x.yaml not found"),
    (["train", "--preset", "ade20k-150-r50", "--data-root", "/nonexistent/datasets"], "does not exist"),
    (["train", "--preset", "ade20k-150-r50", "--set", "data.dataset=mnist"], "unknown dataset 'mnist'"),
    (["train", "--preset", "ade20k-150-r50", "--resume", "/nonexistent/model.pt"], "no such checkpoint"),
    (["eval", "--checkpoint", "/nonexistent/model.pt"], "checkpoint /nonexistent/model.pt not found"),
    (["predict", "/nonexistent/img.png", "--checkpoint", "/nonexistent/model.pt"], "not found"),
    (["plot", "/nonexistent/metrics.jsonl"], "metrics file /nonexistent/metrics.jsonl not found"),
    (["convert", "--from", "hf", "/nonexistent/dir", "--out", "x.pt"], "/nonexistent/dir not found"),
    (["convert", "--from", "detectron2", "mask2former-ade20k-150-r50", "--out", "x.pt"],
     "preset mask2former-ade20k-150-r50 has no official model-zoo checkpoint to download; presets with one: "
     "ade20k-150-r50, "),
    (["train", "--preset", "ade20k-150-r50", "--set", "solver.grad_accum=3"], "must be divisible"),
    (["train", "--preset", "ade20k-150-r50", "--set", "model.backbone.name=vgg16"], "unknown backbone 'vgg16'"),
    (["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
])
def test_user_mistakes_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(main(argv))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err


def test_user_mistakes_about_inputs(trained, tmp_path, capsys):
    _, data, run = trained
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a checkpoint at all")
    assert main(["eval", "--checkpoint", str(foreign), "--data-root", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "foreign.pt" in err and "truncated or not a PyTorch checkpoint" in err
    # a checkpoint that does not fit the requested architecture
    assert main(["eval", "--checkpoint", str(run / "model_0000004.pt"), "--data-root", str(data),
                 "--set", "model.num_queries=7"]) == 2
    assert "does not fit the model config" in capsys.readouterr().err
    # a weights-only checkpoint cannot be resumed from
    converted = tmp_path / "weights.pt"
    import torch

    torch.save({"model": torch.load(run / "model_0000004.pt", weights_only=True)["model"]}, converted)
    cfg = write_tiny_yaml(tmp_path / "t.yaml")
    assert main(["train", "--config", str(cfg), "--data-root", str(data), "--output", str(tmp_path / "r"),
                 "--resume", str(converted)]) == 2
    assert "holds model weights only" in capsys.readouterr().err


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 0
    return capsys.readouterr().out


def test_help_explains_every_option(capsys):
    result = run_cli("--help")  # the module entry point, as torchrun uses it
    assert result.returncode == 0
    for command in ("train", "eval", "predict", "demo", "bench", "convert", "plot"):
        assert command in result.stdout
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, sub in subparsers.items():  # every option of every command has a help text
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert not undocumented, (name, undocumented)
    for command in ("train", "eval", "predict"):
        text = _help([command, "--help"], capsys)
        assert "--set KEY=VALUE" in text and "--data-root" in text and "--device" in text
    assert "--skip-nonfinite" in _help(["train", "--help"], capsys)


def test_bench_lists_parts(capfd):
    assert main(["bench", "--list"]) == 0
    out = capfd.readouterr().out
    assert "train_step" in out and "bench_assignment.py" in out


@pytest.mark.slow
def test_demo_quick_learns(tmp_path):
    """The README's demo, short: training lowers the loss and beats the trivial baseline (in the
    default suite test_demo_install runs the same quick demo from a fresh install and checks this)."""
    from fastmaskformer.engine.demo import run_demo

    summary = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert summary["loss_last"] < 0.85 * summary["loss_first"]
    assert summary["mIoU"] > summary["baseline_mIoU"]
    assert (tmp_path / "demo" / "run" / "curves.png").is_file()
    assert len(list((tmp_path / "demo" / "predictions").glob("*_sem.png"))) == 4
    assert len(list((tmp_path / "demo" / "predictions").glob("*_panoptic_overlay.png"))) == 4
