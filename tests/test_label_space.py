"""A model whose number of classes differs from its dataset's label space: one line naming both
(the model's K, the dataset and its K, the likely fix) wherever a checkpoint meets metadata -
predict, eval, export, convert, train and train --resume - never an IndexError from deep inside."""
import re

import pytest
import torch

from engine_tiny import make_data, tiny_config, write_tiny_yaml
from fastmaskformer.cli import main
from fastmaskformer.data.metadata import LabelSpaceError, check_label_space, datasets_with, get_metadata


def test_check_label_space_message():
    check_label_space(150, get_metadata("ade20k-150"), "the model")  # equal: nothing to say
    check_label_space(None, get_metadata("ade20k-150"), "the model")  # unknown (exported program)
    with pytest.raises(LabelSpaceError) as info:
        check_label_space(133, get_metadata("ade20k-150"), "checkpoint x.pt", "ade20k-panoptic")
    message = str(info.value)
    assert "\n" not in message
    assert "checkpoint x.pt has 133 classes but dataset ade20k-panoptic (label space ade20k-150) has 150" in message
    assert "--set data.dataset=coco-panoptic" in message
    with pytest.raises(LabelSpaceError, match="has 23 classes but dataset ade20k-150 has 150; no packaged label "
                                              "space has 23 classes"):
        check_label_space(23, get_metadata("ade20k-150"), "the model")


def test_datasets_with():
    assert datasets_with(133) == ["coco-panoptic"]
    assert datasets_with(19) == ["cityscapes", "cityscapes-panoptic"]
    assert datasets_with(150) == ["ade20k-150", "ade20k-panoptic"]
    assert datasets_with(23) == []


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """(data root, checkpoint): a 10-class model under a config whose dataset (synthetic-semantic)
    has 16 classes, as an old conversion or a hand-edited config leaves it."""
    from fastmaskformer.modeling import build_model

    root = tmp_path_factory.mktemp("label_space")
    data = make_data(root / "data", num_train=2, num_val=2)
    cfg = tiny_config(data)
    cfg.model.num_classes = 10
    path = root / "ckpt.pt"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, path)
    return data, path


def _one_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


EXPECTED = "has 10 classes but dataset synthetic-semantic (label space synthetic) has 16"


def test_predict(mismatched, tmp_path, capsys):
    data, ckpt = mismatched
    images = data / "ADEChallengeData2016" / "images" / "validation"
    rc = main(["predict", str(images), "--checkpoint", str(ckpt), "--data-root", str(data), "--output", str(tmp_path)])
    assert f"checkpoint {ckpt} {EXPECTED}" in _one_line(capsys, rc)
    assert not any(tmp_path.iterdir())  # nothing written


def test_eval(mismatched, capsys):
    data, ckpt = mismatched
    rc = main(["eval", "--checkpoint", str(ckpt), "--data-root", str(data), "--no-progress"])
    assert f"checkpoint {ckpt} {EXPECTED}" in _one_line(capsys, rc)


def test_export(mismatched, tmp_path, capsys):
    """Checked before the program is built (today's IndexError came from the thing-class table)."""
    data, ckpt = mismatched
    rc = main(["export", "--checkpoint", str(ckpt), "--data-root", str(data), "--task", "panoptic",
               "--output", str(tmp_path / "m.pt2")])
    assert f"checkpoint {ckpt} {EXPECTED}" in _one_line(capsys, rc)
    assert not (tmp_path / "m.pt2").exists()


def test_python_api_checks_too(mismatched):
    """Predictor, evaluate_dataset and export_program check on their own (no CLI around them)."""
    from fastmaskformer.config import Config
    from fastmaskformer.data import build_dataset
    from fastmaskformer.engine.evaluator import evaluate_dataset
    from fastmaskformer.engine.export import export_program
    from fastmaskformer.engine.predictor import Predictor
    from fastmaskformer.modeling import build_model

    data, ckpt = mismatched
    state = torch.load(ckpt, weights_only=True)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg.model)
    metadata = get_metadata(cfg.data.dataset, data)
    with pytest.raises(LabelSpaceError, match=re.escape(f"the model {EXPECTED}")):
        Predictor(model, cfg, metadata)
    with pytest.raises(LabelSpaceError, match=re.escape(f"the model {EXPECTED}")):
        evaluate_dataset(model, build_dataset(cfg.data, "validation", train=False), cfg, progress=False)
    with pytest.raises(LabelSpaceError, match=re.escape(f"the model {EXPECTED}")):
        export_program(model, cfg, metadata, "semantic", "pt2", "unused.pt2")


def test_train_config(mismatched, tmp_path, capsys):
    data, _ = mismatched
    cfg = write_tiny_yaml(tmp_path / "t.yaml")
    rc = main(["train", "--config", str(cfg), "--data-root", str(data), "--output", str(tmp_path / "run"),
               "--set", "model.num_classes=10"])
    assert f"config 'ade20k-150-r50' (model.num_classes) {EXPECTED}" \
        in _one_line(capsys, rc)


def test_train_resume(mismatched, tmp_path, capsys):
    """--resume from a checkpoint of another label space names it (before the optimizer state or
    the weights are touched)."""
    data, ckpt = mismatched
    cfg = write_tiny_yaml(tmp_path / "t.yaml")
    rc = main(["train", "--config", str(cfg), "--data-root", str(data), "--output", str(tmp_path / "run"),
               "--resume", str(ckpt)])
    assert f"checkpoint {ckpt} {EXPECTED}" in _one_line(capsys, rc)


def test_train_resume_other_architecture(mismatched, tmp_path, capsys):
    """Same classes, other widths: one line naming the first mismatching tensor, not a traceback."""
    from fastmaskformer.modeling import build_model

    data, _ = mismatched
    cfg = tiny_config(data)
    cfg.model.num_queries = 7
    ckpt = tmp_path / "other.pt"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(), "optimizer": {},
                "scheduler": {}, "iteration": 1, "rng": [{}], "data": {"samples": 4, "seed": 0, "world_size": 1}},
               ckpt)
    rc = main(["train", "--config", str(write_tiny_yaml(tmp_path / "t.yaml")), "--data-root", str(data),
               "--output", str(tmp_path / "run"), "--resume", str(ckpt)])
    err = _one_line(capsys, rc)
    assert f"checkpoint {ckpt} does not fit the model config" in err and "query_embed" in err


def test_converted_hf_model_gets_the_dataset_of_its_classes():
    """A Hugging Face config names no dataset: a 133-class model is COCO panoptic's, not the
    default ADE20K's; a count no packaged label space has gets the model's own name (predict then
    writes generic class names instead of refusing)."""
    from fastmaskformer.config import Config
    from fastmaskformer.convert._common import fitting_dataset

    cfg = Config()
    for classes, dataset in ((133, "coco-panoptic"), (150, "ade20k-150"), (19, "cityscapes"), (7, "hf-x")):
        cfg.model.num_classes = classes
        assert fitting_dataset(cfg, "hf-x") == dataset


def test_train_weights(mismatched, tmp_path, capsys):
    """Fine-tuning from a checkpoint's weights: another label space is one line; a fitting one
    starts the run from those weights at iteration 0."""
    from fastmaskformer.engine.trainer import Trainer
    from fastmaskformer.modeling import build_model

    data, ckpt = mismatched
    args = ["train", "--config", str(write_tiny_yaml(tmp_path / "t.yaml")), "--data-root", str(data),
            "--output", str(tmp_path / "run")]
    assert f"checkpoint {ckpt} {EXPECTED}" in _one_line(capsys, main(args + ["--weights", str(ckpt)]))
    assert "--weights /nonexistent.pt: no such checkpoint" in _one_line(capsys, main(args + ["--weights",
                                                                                           "/nonexistent.pt"]))
    cfg = tiny_config(data)
    torch.manual_seed(123)
    weights = build_model(cfg.model).state_dict()
    torch.save({"model": weights, "config": cfg.to_dict()}, tmp_path / "fits.pt")
    trainer = Trainer(cfg, tmp_path / "run2", weights=tmp_path / "fits.pt", progress=False)
    assert trainer.iteration == 0
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
