"""``fastmaskformer export`` (README "Deploy"): the exported program reproduces ``predict``.

Tiny MaskFormer and Mask2Former models (tests/engine_tiny.py widths, COCO panoptic label space,
20 queries) are exported through the CLI as ``.pt2`` (torch.export + AOTInductor) and
``.onnx``; each file runs in a fresh process that cannot import fastmaskformer
(``export_runner.py``) on the real COCO photos and on random odd sizes. Labels must equal
``predict --checkpoint``; a pixel may differ only where the reference's top two scores tie to
within ``TIE`` (the compiled model rounds differently), and such pixels are counted and
bounded. Panoptic segments must be identical; instance rows (classes, order) identical, masks
up to pixels whose logit is within ``MASK_TIE`` of 0. Each AOTInductor compile takes 1-3
minutes on 2 cores: the pt2 exports beyond MaskFormer's panoptic one are marked slow.
"""
import json
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from engine_tiny import REPO, TINY, as_mask2former, cli_env, run_cli
from fastmaskformer.cli import _metadata, main
from fastmaskformer.config import Config
from fastmaskformer.data import get_metadata
from fastmaskformer.engine.checkpoint import save_checkpoint
from fastmaskformer.engine.export import InferenceProgram
from fastmaskformer.engine.predictor import Predictor, infer, load_image, resize_image, run_model
from fastmaskformer.modeling import build_model
from fastmaskformer.ops.inference import (assemble_panoptic, instance_count, panoptic_assign_reference,
                                          resized_mask_logits_reference, semantic_scores_reference)

TIE = 1e-4  # a differing pixel's top two reference scores are at most this far apart
MASK_TIE = 1e-3  # a differing instance-mask pixel's reference logit is at most this far from 0
MAX_TIE_FRACTION = 1e-3  # and at most this fraction of an image's pixels differ
# test-resized (h, w) within the exported range [33, 256] -> output (H, W): odd, /32, same size
THINGS = get_metadata("coco-panoptic").thing_classes
ODD_CASES = [((33, 57), (91, 45)), ((64, 96), (64, 96)), ((121, 64), (240, 127)), ((256, 47), (257, 47))]
ARCHS = ("maskformer", "mask2former")


def tiny_cfg(arch: str = "maskformer") -> Config:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    data["model"] = dict(data["model"], num_classes=133, num_queries=20)
    data["data"] = dict(data["data"], dataset="coco-panoptic")
    cfg = Config.from_yaml(yaml.safe_dump(data))
    if arch == "mask2former":
        as_mask2former(cfg)
    cfg.test.object_mask_threshold, cfg.test.overlap_threshold = 0.0, 0.3
    return cfg


def _tiny_model(arch: str):
    """A random tiny model whose queries prefer a thing (person) and a stuff class, so the
    panoptic output has several segments."""
    torch.manual_seed(0)
    cfg = tiny_cfg(arch)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        head = model.predictor
        head.class_embed.weight.mul_(3.0)
        head.class_embed.bias.fill_(-20.0)
        head.class_embed.bias[[0, 110]] = 10.0
    return cfg, model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (checkpoint path, config, model) of :func:`_tiny_model`, made once per arch."""
    made = {}

    def get(arch: str):
        if arch not in made:
            cfg, model = _tiny_model(arch)
            path = tmp_path_factory.mktemp(f"export-{arch}") / "tiny.pt"
            save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict()})
            made[arch] = (path, cfg, model)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints("maskformer")


_EXPORTED = {}


def exported(checkpoint, fmt: str, task: str):
    """Export through the CLI once per (checkpoint, format, task)."""
    key = (str(checkpoint[0]), fmt, task)
    if key not in _EXPORTED:
        path = checkpoint[0].parent / f"tiny_{task}.{fmt}"
        result = run_cli("export", "--checkpoint", checkpoint[0], "--task", task, "--format", fmt,
                         "--output", path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert path.is_file()
        _EXPORTED[key] = path
    return _EXPORTED[key]


def _cases(model, cfg, coco):
    """(test-resized image, output size) pairs: the real photos resized as predict does, then
    random images of odd sizes."""
    cases = []
    predictor = Predictor(model, cfg, _metadata(cfg), batch_size=1)
    if coco is not None:
        for path in sorted((coco / "input_images").glob("*.jpg")):
            image = load_image(path)
            size = (int(image.shape[1]), int(image.shape[2]))
            cases.append((resize_image(image, predictor._test_size(*size)), size))
    g = torch.Generator().manual_seed(1)
    for (h, w), out in ODD_CASES:
        cases.append((torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), out))
    return cases


def _run_fresh(path, cases, tmp_path):
    """Run the exported file in a process without fastmaskformer: list of output tuples."""
    import subprocess

    inputs = {"n": np.array(len(cases))}
    for i, (image, size) in enumerate(cases):
        inputs[f"image{i}"] = image.numpy()
        inputs[f"size{i}"] = np.array(size, dtype=np.int64)
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = subprocess.run([sys.executable, str(REPO / "tests" / "export_runner.py"), str(path),
                             str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
                            capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = np.load(tmp_path / "outputs.npz")
    outs = []
    for i in range(len(cases)):
        outs.append(tuple(torch.from_numpy(data[f"out{i}_{j}"]) for j in range(5) if f"out{i}_{j}" in data))
    return outs, json.loads(str(data["metadata"]))


def _top2_gap(scores):
    """scores [N, H, W] -> the gap between the best and second-best score per pixel."""
    if scores.shape[0] < 2:
        return torch.full(scores.shape[1:], float("inf"))
    top = scores.topk(2, dim=0).values
    return top[0] - top[1]


def _reference(model, cfg, image, size, task):
    """What predict computes for one test-resized image, and the scores its argmax took
    (instance: the selected masks' logits at the output size)."""
    result = infer(model, [image], [size], cfg.test, (task,), THINGS)[0]
    outputs, sizes, input_size = run_model(model, [image])
    cls, me, pe = outputs.class_logits[-1, 0], outputs.mask_embed[-1, 0], outputs.pixel_embed[0]
    if task == "instance":
        num_queries, num_classes = cls.shape[0], cls.shape[1] - 1
        count = instance_count(num_queries, num_classes, cfg.test.instance_topk)
        query = cls.softmax(-1)[:, :-1].flatten().topk(count, sorted=True).indices // num_classes
        return result[task], resized_mask_logits_reference(me[query], pe, sizes[0], size, input_size)
    if task == "semantic":
        scores = semantic_scores_reference(cls, me, pe, sizes[0], size, input_size)
    else:
        probs, labels = cls.softmax(-1).max(-1)
        keep = (labels != 133) & (probs > cfg.test.object_mask_threshold)
        masks = resized_mask_logits_reference(me[keep], pe, sizes[0], size, input_size).sigmoid()
        scores = probs[keep][:, None, None] * masks
    return result[task], _top2_gap(scores)


def _compare_instance(got, ref, logits, label):
    """Instance outputs (masks, scores, classes, keep) against ``infer``'s: the same rows in the
    same order; mask pixels may differ only where the reference logit is within MASK_TIE of 0."""
    masks, scores, classes, keep = got
    keep = keep.bool()  # the rows predict keeps (all, or the thing classes with panoptic on)
    assert classes[keep].tolist() == ref["labels"].tolist(), label
    assert scores[keep].tolist() == pytest.approx(ref["scores"].tolist(), abs=1e-4), label
    assert tuple(masks.shape[1:]) == tuple(ref["masks"].shape[1:]), label
    differ = masks[keep].bool() != ref["masks"]
    count = int(differ.sum())
    assert count <= MAX_TIE_FRACTION * differ.numel(), f"{label}: {count} pixels differ"
    if count:
        assert float(logits[keep][differ].abs().max()) <= MASK_TIE, f"{label}: a differing mask pixel is not a tie"
    return count


def _compare(task, got, ref, gap, label):
    """Assert ``got`` (the exported program's outputs) equals ``ref`` up to counted tie pixels."""
    if task == "instance":
        return _compare_instance(got, ref, gap, label)
    if task == "semantic":
        labels, ref_labels = got[0], ref
    else:
        labels, ref_labels = got[0], ref[0]
        segments = [(int(s), int(c), bool(t)) for s, c, t in zip(*(x.tolist() for x in got[1:4])) if s > 0]
        assert segments == [(s["id"], s["category_id"], s["isthing"]) for s in ref[1]], label
        scores = [float(p) for s, p in zip(got[1].tolist(), got[4].tolist()) if s > 0]
        assert scores == pytest.approx([s["score"] for s in ref[1]], abs=1e-5), label
    assert tuple(labels.shape) == tuple(ref_labels.shape), label
    differ = labels.to(ref_labels.dtype) != ref_labels
    count = int(differ.sum())
    assert count <= MAX_TIE_FRACTION * differ.numel(), f"{label}: {count} pixels differ"
    if count:
        assert float(gap[differ].max()) <= TIE, f"{label}: a differing pixel is not a tie"
    return count


# ----------------------------------------------------------------------------- static-shape logic
def _panoptic_reference(scores_all, labels_all, masks, object_mask_threshold, overlap_threshold, things):
    keep = (labels_all != K) & (scores_all > object_mask_threshold)
    h, w = masks.shape[-2:]
    if not bool(keep.any()):
        return torch.zeros(h, w, dtype=torch.int32), []
    weighted = scores_all[keep][:, None, None] * masks[keep]
    ids = weighted.argmax(0)
    assigned = torch.bincount(ids.flatten(), minlength=int(keep.sum()))
    full = (masks[keep] >= 0.5).flatten(1).sum(1)
    lut, segments = assemble_panoptic(labels_all[keep].tolist(), scores_all[keep].tolist(), assigned.tolist(),
                                      full.tolist(), overlap_threshold, set(things))
    return torch.tensor(lut, dtype=torch.int32)[ids], segments


K = 6


class _Stub(torch.nn.Module):
    """Just enough of a MaskFormer for InferenceProgram's constructor."""

    def __init__(self):
        super().__init__()
        self.size_divisibility = 32
        self.predictor = torch.nn.Module()
        self.predictor.class_embed = torch.nn.Linear(4, K + 1)


@pytest.mark.parametrize("seed", range(40))
def test_static_shape_panoptic_equals_the_reference_assembly(seed):
    """Masked, vectorised panoptic assembly (merging stuff of one class, the overlap filter,
    thing instances, dropped queries) = ``panoptic_assign_reference`` + ``assemble_panoptic``."""
    g = torch.Generator().manual_seed(seed)
    q = int(torch.randint(1, 12, (1,), generator=g))
    things = [0, 1, 2]
    # few classes so stuff classes repeat; sharp logits so queries are kept
    class_logits = torch.randn(q, K + 1, generator=g) * 4
    masks = torch.sigmoid(torch.randn(q, 9, 11, generator=g) * 3)
    if seed % 5 == 0:  # exact score ties between queries
        class_logits[:] = class_logits[0]
    thr_obj, thr_ov = [(0.0, 0.0), (0.3, 0.5), (0.5, 0.8), (0.9, 0.8)][seed % 4]
    program = InferenceProgram(_Stub(), "panoptic", thr_obj, thr_ov, things)
    id_map, segment_id, category, isthing, score = program._panoptic(class_logits, masks)
    scores_all, labels_all = class_logits.softmax(-1).max(-1)
    ref_map, ref_segments = _panoptic_reference(scores_all, labels_all, masks, thr_obj, thr_ov, things)
    assert torch.equal(id_map, ref_map)
    rows = [(int(s), int(c), bool(t), float(p)) for s, c, t, p in
            zip(segment_id.tolist(), category.tolist(), isthing.tolist(), score.tolist()) if s > 0]
    assert rows == [(s["id"], s["category_id"], s["isthing"], s["score"]) for s in ref_segments]


def test_panoptic_reference_assign_is_what_the_program_reproduces():
    """The reference helper above matches ``panoptic_assign_reference`` (the op's torch path)."""
    g = torch.Generator().manual_seed(0)
    me, pe = torch.randn(5, 8, generator=g), torch.randn(8, 6, 7, generator=g)
    scores = torch.rand(5, generator=g)
    ids, assigned, full = panoptic_assign_reference(scores, me, pe, (21, 25), (30, 19), (24, 28))
    masks = resized_mask_logits_reference(me, pe, (21, 25), (30, 19), (24, 28)).sigmoid()
    assert torch.equal(ids, (scores[:, None, None] * masks).argmax(0))
    assert torch.equal(full, (masks >= 0.5).flatten(1).sum(1))


# ----------------------------------------------------------------------------- eager program
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_eager_program_equals_predict(checkpoints, arch, task):
    from fastmaskformer.engine.export import build_program

    _, cfg, model = checkpoints(arch)
    program = build_program(model, cfg, get_metadata("coco-panoptic"), task).eval()
    for image, size in _cases(model, cfg, None):
        with torch.no_grad():
            got = program(image, torch.tensor(size))
        ref, gap = _reference(model, cfg, image, size, task)
        _compare(task, got if isinstance(got, tuple) else (got,), ref, gap, f"eager {arch} {task} {size}")


@pytest.mark.parametrize("topk,panoptic_on", [(100, False), (40, True)])
def test_eager_instance_program_follows_topk_and_things_only(checkpoint, topk, panoptic_on):
    """Fewer pairs than Q*K (top 40: the person and the stuff class of each query), and the
    official rule with panoptic inference on: only the thing classes' rows are instances
    (``keep``), as predict drops the others."""
    from fastmaskformer.engine.export import build_program

    _, cfg, model = checkpoint
    cfg = Config.from_dict(cfg.to_dict())
    cfg.test.instance_topk, cfg.test.panoptic_on = topk, panoptic_on
    program = build_program(model, cfg, get_metadata("coco-panoptic"), "instance").eval()
    kept = dropped = 0
    for image, size in _cases(model, cfg, None):
        with torch.no_grad():
            got = program(image, torch.tensor(size))
        assert got[0].shape[0] == min(topk, 20 * 133)
        ref, logits = _reference(model, cfg, image, size, "instance")
        _compare_instance(got, ref, logits, f"eager instance top {topk} {size}")
        kept += int(got[3].sum())
        dropped += int((~got[3]).sum())
        if panoptic_on:
            assert all(c in THINGS for c in got[2][got[3]].tolist())
            assert not any(c in THINGS for c in got[2][~got[3]].tolist())
    assert 0 < kept and (dropped > 0) == panoptic_on


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", ["semantic", "panoptic"])
def test_eager_program_equals_predict_without_padding(arch, task):
    """size_divisibility 0 (the official COCO panoptic configs): no padding, input size = image."""
    cfg = tiny_cfg(arch)
    cfg.model.size_divisibility = 0
    model = build_model(cfg.model).eval()
    program = InferenceProgram(model, task, 0.0, 0.3, THINGS).eval()
    for image, size in _cases(model, cfg, None):
        with torch.no_grad():
            got = program(image, torch.tensor(size))
        ref, gap = _reference(model, cfg, image, size, task)
        _compare(task, got if isinstance(got, tuple) else (got,), ref, gap, f"unpadded {task} {size}")


@pytest.mark.slow
def test_unpadded_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from fastmaskformer.engine.export import ExportedModel, export_program

    cfg = tiny_cfg()
    cfg.model.size_divisibility = 0
    model = build_model(cfg.model).eval()
    for task in ("semantic", "panoptic"):
        exported_model = ExportedModel(export_program(model, cfg, get_metadata("coco-panoptic"), task, "onnx",
                                                      tmp_path / f"{task}.onnx"))
        for image, size in _cases(model, cfg, None):
            ref, gap = _reference(model, cfg, image, size, task)
            _compare(task, exported_model(image, size), ref, gap, f"unpadded onnx {task} {size}")


# ----------------------------------------------------------------------------- exported files
SLOW = pytest.mark.slow
FILE_CASES = [  # one AOTInductor compile (MaskFormer's) and each task once in the default suite
    ("maskformer", "onnx", "semantic"), ("maskformer", "onnx", "panoptic"),
    pytest.param("maskformer", "onnx", "instance", marks=SLOW),
    ("maskformer", "pt2", "panoptic"),
    pytest.param("maskformer", "pt2", "semantic", marks=SLOW), pytest.param("maskformer", "pt2", "instance", marks=SLOW),
    pytest.param("mask2former", "onnx", "semantic", marks=SLOW), ("mask2former", "onnx", "panoptic"),
    ("mask2former", "onnx", "instance"),
    pytest.param("mask2former", "pt2", "instance", marks=SLOW),
    pytest.param("mask2former", "pt2", "semantic", marks=SLOW),
    pytest.param("mask2former", "pt2", "panoptic", marks=SLOW),
]


@pytest.mark.parametrize("arch,fmt,task", FILE_CASES)
def test_exported_file_in_a_fresh_process_equals_predict(checkpoints, arch, fmt, task, tmp_path, request):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    ckpt = checkpoints(arch)
    _, cfg, model = ckpt
    coco = request.getfixturevalue("coco_sample") if _has_coco() else None
    cases = _cases(model, cfg, coco)
    outs, metadata = _run_fresh(exported(ckpt, fmt, task), cases, tmp_path)
    assert metadata["task"] == task and metadata["format"] == fmt and metadata["size_range"] == [33, 256]
    assert metadata["architecture"] == arch
    ties = []
    for (image, size), got in zip(cases, outs):
        ref, gap = _reference(model, cfg, image, size, task)
        ties.append(_compare(task, got, ref, gap, f"{arch} {fmt} {task} {tuple(image.shape)} -> {size}"))
    print(f"{arch} {fmt} {task}: tie pixels per image {ties}")


def _has_coco():
    from conftest import COCO_SAMPLE

    return (COCO_SAMPLE / "panoptic_examples.json").exists()


@pytest.mark.parametrize("arch,task", [("maskformer", "semantic"), ("maskformer", "panoptic"),
                                       ("mask2former", "instance"), ("mask2former", "panoptic")])
def test_predict_model_writes_the_files_of_predict_checkpoint(checkpoints, coco_sample, arch, task, tmp_path):
    pytest.importorskip("onnxruntime")
    checkpoint = checkpoints(arch)
    model_file = exported(checkpoint, "onnx", task)
    images = coco_sample / "input_images"
    assert main(["predict", str(images), "--checkpoint", str(checkpoint[0]), "--batch-size", "1",
                 "--task", task, "--output", str(tmp_path / "ckpt"), "--device", "cpu"]) == 0
    assert main(["predict", str(images), "--model", str(model_file), "--output", str(tmp_path / "model")]) == 0
    other = "panoptic" if task != "panoptic" else "semantic"
    assert main(["predict", str(images), "--model", str(model_file), "--task", other,
                 "--output", str(tmp_path / "other")]) == 2  # one line: the file's task is fixed
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "model").iterdir())
    for name in names:
        a, b = tmp_path / "ckpt" / name, tmp_path / "model" / name
        if name.endswith(".json"):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert ja["categories"] == jb["categories"]
            for x, y in zip(ja["annotations"], jb["annotations"]):  # areas may differ by tie pixels
                assert [dict(s, score=None, area=None) for s in x["segments_info"]] == \
                    [dict(s, score=None, area=None) for s in y["segments_info"]]
                for sx, sy in zip(x["segments_info"], y["segments_info"]):
                    assert abs(sx["area"] - sy["area"]) <= MAX_TIE_FRACTION * sx["area"] + 1
                    assert sx["score"] == pytest.approx(sy["score"], abs=1e-5)
        elif name.endswith(".npz"):  # instances: same rows, masks equal up to tie pixels
            za, zb = np.load(a), np.load(b)
            assert za["labels"].tolist() == zb["labels"].tolist()
            assert za["scores"] == pytest.approx(zb["scores"], abs=1e-4)
            assert za["masks"].shape == zb["masks"].shape and za["masks"].dtype == zb["masks"].dtype == bool
            assert (za["masks"] != zb["masks"]).sum() <= MAX_TIE_FRACTION * za["masks"].size
        elif "overlay" not in name:  # label maps: equal up to tie pixels
            pa, pb = np.asarray(Image.open(a)), np.asarray(Image.open(b))
            assert pa.shape == pb.shape and pa.dtype == pb.dtype
            assert (pa != pb).any(-1 if pa.ndim == 3 else None).sum() <= MAX_TIE_FRACTION * pa.shape[0] * pa.shape[1]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,message", [
    (["--task", "depth", "--format", "onnx"], "unknown task 'depth'"),
    (["--task", "semantic", "--format", "onnx", "--device", "cuda"], "--device applies to --format pt2 only"),
    (["--task", "semantic", "--format", "torchscript"], "unsupported format 'torchscript'"),
    (["--task", "semantic"], "--format is needed"),
    (["--task", "semantic", "--format", "pt2"], "must end in .pt2"),
])
def test_export_bad_arguments_are_one_line(checkpoint, argv, message, tmp_path, capsys):
    rc = main(["export", "--checkpoint", str(checkpoint[0]), *argv, "--output", str(tmp_path / "m.bin")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_export_other_architecture_and_missing_file_are_one_line(tmp_path, capsys):
    cfg = tiny_cfg()
    cfg.model.meta_arch = "per_pixel_baseline"
    path = tmp_path / "baseline.pt"
    save_checkpoint(path, {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict()})
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a checkpoint at all")
    for ckpt, message in ((path, "only MaskFormer, Mask2Former and EoMT checkpoints can be exported"),
                          (tmp_path / "missing.pt", "not found"),
                          (foreign, "not a PyTorch checkpoint")):
        rc = main(["export", "--checkpoint", str(ckpt), "--task", "semantic", "--output", str(tmp_path / "m.onnx")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err
    rc = main(["predict", str(tmp_path), "--model", str(tmp_path / "missing.pt2")])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- CUDA package
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_pt2_equals_the_eager_program_on_the_gpu(checkpoints, arch, tmp_path):
    """``export --device cuda``: the package runs on the GPU (Mask2Former's deformable attention
    as our Triton operator inside it) and gives the eager program's outputs on the GPU."""
    from fastmaskformer.engine.export import ExportedModel, _dynamic_shapes, build_program, example_inputs

    cfg, model = _tiny_model(arch)  # the checkpoint's weights, on the GPU
    model = model.cuda()
    metadata = get_metadata("coco-panoptic")
    program = build_program(model, cfg, metadata, "panoptic").eval()
    if arch == "mask2former":  # the Triton kernel is in the exported graph, not grid_sample
        with torch.no_grad():
            ep = torch.export.export(program, example_inputs(cfg, "cuda"), dynamic_shapes=_dynamic_shapes(cfg),
                                     strict=False)
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert any("triton_kernel_wrapper" in t for t in targets), sorted(targets)
        assert not any("grid_sampler" in t for t in targets)
    path = tmp_path / "cuda.pt2"
    rc = main(["export", "--checkpoint", str(checkpoints(arch)[0]), "--task", "panoptic", "--format", "pt2",
               "--device", "cuda", "--output", str(path)])
    assert rc == 0
    exported_model = ExportedModel(path)
    assert exported_model.info["device"] == "cuda"
    for image, size in _cases(model, cfg, None):
        with torch.no_grad():
            ref = [t.cpu() for t in program(image.cuda(), torch.tensor(size).cuda())]
        got = exported_model(image, size)
        assert (got[0] != ref[0]).float().mean() <= MAX_TIE_FRACTION
        assert all(torch.equal(a, b) for a, b in zip(got[1:4], ref[1:4]))
