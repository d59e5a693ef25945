"""``fastmaskformer export`` of EoMT: the official inference inside the exported program.

A tiny EoMT (tests/test_eomt.py widths, 64 px square model size, COCO panoptic label space, 20
queries) is exported through the CLI; the eager program must equal ``predict`` (``infer``),
and the ONNX / pt2 files, run in a fresh process that cannot import fastmaskformer
(``export_runner.py``), too, on the real COCO photos and random originals of odd sizes. The
program takes the image at its EoMT test size (semantic: shorter side 64, windows cut inside;
panoptic / instance: longer side 64, black padding inside). Pixels may differ only at ties,
counted and bounded as in tests/test_export.py.
"""
import pytest
import torch

from test_eomt import TINY
from test_eomt_inference import SIZE, official_panoptic_logits, official_semantic
from test_export import MAX_TIE_FRACTION, _compare, _has_coco, _run_fresh, _top2_gap
from engine_tiny import run_cli
from fastmaskformer.cli import main
from fastmaskformer.config import get_config
from fastmaskformer.data import get_metadata
from fastmaskformer.data.transforms import eomt_test_size
from fastmaskformer.engine.checkpoint import save_checkpoint
from fastmaskformer.engine.export import build_program, dynamic_range, eomt_max_windows
from fastmaskformer.engine.predictor import infer, load_image, resize_image
from fastmaskformer.modeling import build_model

THINGS = get_metadata("coco-panoptic").thing_classes
ORIGINALS = [(45, 91), (131, 50), (64, 64), (250, 45), (37, 200)]  # (H, W): odd, square, extreme aspect
MAX_SIDE = 384  # semantic exports: longer side up to 384 (6 windows of 64)


def tiny_eomt_cfg():
    cfg = get_config("eomt-coco-panoptic-dinov2-s-640")
    m = cfg.model
    m.backbone.img_size, m.backbone.kwargs, m.num_blocks, m.num_queries = SIZE, dict(TINY), 2, 20
    m.mask_annealing_start = m.mask_annealing_end = ()  # a trained model: no masked attention left
    m.masked_attn = False
    cfg.data.min_size_test, cfg.data.max_size_test = SIZE, MAX_SIDE
    cfg.test.object_mask_threshold, cfg.test.overlap_threshold = 0.0, 0.3
    return cfg


@pytest.fixture(scope="module")
def eomt_checkpoint(tmp_path_factory):
    """(checkpoint path, config, model): queries prefer person (thing) and one stuff class."""
    torch.manual_seed(0)
    cfg = tiny_eomt_cfg()
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        model.class_head.weight.mul_(3.0)
        model.class_head.bias.fill_(-20.0)
        model.class_head.bias[[0, 110]] = 10.0
        model.mask_head[-1].weight.mul_(5.0)
    path = tmp_path_factory.mktemp("export-eomt") / "tiny_eomt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict()})
    return path, cfg, model


_EXPORTED = {}


def exported(checkpoint, fmt, task):
    key = (fmt, task)
    if key not in _EXPORTED:
        path = checkpoint[0].parent / f"eomt_{task}.{fmt}"
        result = run_cli("export", "--checkpoint", checkpoint[0], "--task", task, "--format", fmt,
                         "--output", path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        _EXPORTED[key] = path
    return _EXPORTED[key]


def _originals(coco):
    """(original image, (H, W)): the real COCO photos, then random odd sizes."""
    cases = []
    if coco is not None:
        for path in sorted((coco / "input_images").glob("*.jpg")):
            image = load_image(path)
            cases.append((image, tuple(image.shape[-2:])))
    g = torch.Generator().manual_seed(1)
    cases += [(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), (h, w)) for h, w in ORIGINALS]
    return cases


def _program_input(image, task):
    """The program's input: the image at its EoMT test size for ``task`` (what predict feeds it)."""
    return resize_image(image, eomt_test_size(*image.shape[-2:], SIZE, task))


def _reference(model, cfg, image, size, task):
    """predict's result for one original image and the per-pixel tie measure of its argmax
    (instance: the selected masks' logits at the output size)."""
    result = infer(model, [image], [size], cfg.test, (task,), THINGS)[0][task]
    if task == "semantic":
        return result, _top2_gap(official_semantic(model, [image], return_scores=True)[0])
    logits, cls = official_panoptic_logits(model, [image])[0]
    if task == "instance":
        num_classes = cls.shape[-1] - 1
        query = cls.softmax(-1)[:, :-1].flatten().topk(cfg.test.instance_topk, sorted=True).indices // num_classes
        return result, logits[query]
    probs, labels = cls.softmax(-1).max(-1)
    keep = (labels != num_classes_of(cls)) & (probs > cfg.test.object_mask_threshold)
    masks = logits[keep].sigmoid()
    weighted = probs[keep][:, None, None] * masks
    winner = masks.gather(0, weighted.argmax(0)[None])[0]
    return result, torch.minimum(_top2_gap(weighted), (winner - 0.5).abs())  # the argmax or the 0.5 test ties


def num_classes_of(class_logits):
    return class_logits.shape[-1] - 1


def test_export_ranges_follow_the_official_resize():
    cfg = tiny_eomt_cfg()
    assert dynamic_range(cfg, "semantic") == (SIZE, MAX_SIDE) and eomt_max_windows(cfg) == 6
    assert dynamic_range(cfg, "panoptic") == dynamic_range(cfg, "instance") == (2, SIZE)


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_eager_program_equals_predict(eomt_checkpoint, task):
    _, cfg, model = eomt_checkpoint
    program = build_program(model, cfg, get_metadata("coco-panoptic"), task).eval()
    segments = 0
    for image, size in _originals(None):
        with torch.no_grad():
            got = program(_program_input(image, task), torch.tensor(size))
        ref, gap = _reference(model, cfg, image, size, task)
        got = got if isinstance(got, tuple) else (got,)
        _compare(task, got, ref, gap, f"eager eomt {task} {size}")
        if task == "panoptic":
            segments += len(ref[1])
        if task == "semantic":
            assert len(torch.unique(ref)) >= 2
    assert task != "panoptic" or segments >= 2 * len(ORIGINALS)


# the ONNX semantic case (6 windows per image, 31 s on 2 cores) is over the 30 s budget: slow
FILE_CASES = [pytest.param("onnx", "semantic", marks=pytest.mark.slow), ("onnx", "panoptic"), ("onnx", "instance"),
              pytest.param("pt2", "semantic", marks=pytest.mark.slow),
              pytest.param("pt2", "panoptic", marks=pytest.mark.slow),
              pytest.param("pt2", "instance", marks=pytest.mark.slow)]


@pytest.mark.parametrize("fmt,task", FILE_CASES)
def test_exported_file_in_a_fresh_process_equals_predict(eomt_checkpoint, fmt, task, tmp_path, request):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    _, cfg, model = eomt_checkpoint
    coco = request.getfixturevalue("coco_sample") if _has_coco() else None
    originals = _originals(coco)
    cases = [(_program_input(image, task), size) for image, size in originals]
    outs, metadata = _run_fresh(exported(eomt_checkpoint, fmt, task), cases, tmp_path)
    assert metadata["architecture"] == "eomt" and metadata["task"] == task and metadata["test_resize"] == "eomt"
    ties = []
    for (image, size), got in zip(originals, outs):
        ref, gap = _reference(model, cfg, image, size, task)
        ties.append(_compare(task, got, ref, gap, f"eomt {fmt} {task} {size}"))
    print(f"eomt {fmt} {task}: tie pixels per image {ties}")


def test_predict_model_writes_the_files_of_predict_checkpoint(eomt_checkpoint, coco_sample, tmp_path):
    """predict --model (the ONNX panoptic file) resizes as the EoMT checkpoint does: same files."""
    import numpy as np
    from PIL import Image

    pytest.importorskip("onnxruntime")
    model_file = exported(eomt_checkpoint, "onnx", "panoptic")
    images = coco_sample / "input_images"
    assert main(["predict", str(images), "--checkpoint", str(eomt_checkpoint[0]), "--batch-size", "1",
                 "--task", "panoptic", "--output", str(tmp_path / "ckpt"), "--device", "cpu"]) == 0
    assert main(["predict", str(images), "--model", str(model_file), "--output", str(tmp_path / "model")]) == 0
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "model").iterdir())
    for name in names:
        if name.endswith("_panoptic.png"):
            a = np.asarray(Image.open(tmp_path / "ckpt" / name))
            b = np.asarray(Image.open(tmp_path / "model" / name))
            assert a.shape == b.shape and (a != b).any(-1).sum() <= MAX_TIE_FRACTION * a.shape[0] * a.shape[1]


def test_export_refuses_a_test_size_other_than_the_model_size(eomt_checkpoint):
    from fastmaskformer.engine.export import ExportError

    _, cfg, model = eomt_checkpoint
    cfg = cfg.from_dict(cfg.to_dict())
    cfg.data.min_size_test = 96
    with pytest.raises(ExportError, match="square size 64"):
        build_program(model, cfg, get_metadata("coco-panoptic"), "panoptic")
