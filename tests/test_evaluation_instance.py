"""COCO mask AP (``InstanceEvaluator`` / ``coco_mask_ap``): a perfect prediction scores 100, small
cases match values worked out by hand from COCOeval's definition (101-point interpolated
precision, IoU thresholds 0.50:0.05:0.95, crowd regions excused), both backends (hotcoco and
the pycocotools reference) give pycocotools' numbers on random data with crowd regions, empty
images and images without predictions, and the engine's evaluator reports it on a tiny
COCO-instance dataset."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

import fastmaskformer as fmf  # noqa: E402
from coco_instance_tiny import H, W, make_coco_instance  # noqa: E402
from fastmaskformer.evaluation import InstanceEvaluator, coco_mask_ap  # noqa: E402
from fastmaskformer.evaluation.instance import METRICS, encode_masks, summary_from_precision  # noqa: E402


def _block(y0, y1, x0, x1, h=40, w=60):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _gt(masks, categories=(1, 2), crowd=()):
    anns = []
    for i, (m, cat) in enumerate(masks):
        rle = encode_masks(m[None])[0]
        anns.append({"id": i + 1, "image_id": 7, "category_id": cat, "segmentation": rle, "area": float(m.sum()),
                     "bbox": [0, 0, 1, 1], "iscrowd": int(i in crowd)})
    return {"images": [{"id": 7, "height": 40, "width": 60, "file_name": "x.jpg"}], "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in categories]}


BACKENDS = ["hotcoco", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_prediction_is_100(backend):
    a, b, c = _block(0, 10, 0, 10), _block(20, 30, 20, 35), _block(5, 15, 40, 50)
    gt = _gt([(a, 1), (b, 2), (c, 1)])
    ev = InstanceEvaluator(gt, dataset_ids=[1, 2], class_names=["one", "two"], backend=backend)
    ev.update(7, torch.from_numpy(np.stack([a, b, c])), torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]))
    out = ev.compute()
    assert [out[k] for k in ("AP", "AP50", "AP75", "APs")] == pytest.approx([100.0] * 4)
    assert math.isnan(out["APm"]) and math.isnan(out["APl"])  # no object of those sizes: undefined
    assert out["per_class"] == pytest.approx({"one": 100.0, "two": 100.0})


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_values(backend):
    # one GT of 8x8 = 64 px, a prediction covering 8x5 = 40 of it: IoU 40/64 = 0.625, a match at
    # the thresholds 0.50, 0.55, 0.60 only -> AP = 3/10 of 100, AP50 = 100, AP75 = 0
    gt = _gt([(_block(0, 8, 0, 8), 1)], categories=(1,))
    pred = [{"image_id": 7, "category_id": 1, "segmentation": encode_masks(_block(0, 8, 0, 5)[None])[0], "score": 0.9}]
    out = coco_mask_ap(gt, pred, backend=backend)
    assert [out["AP"], out["AP50"], out["AP75"]] == pytest.approx([30.0, 100.0, 0.0])

    # two GT, one found exactly (score 0.9), then a false positive (0.8): recall reaches 0.5 at
    # precision 1 -> the 51 recall thresholds 0.00..0.50 have precision 1, the other 50 none:
    # AP = 51/101 at every IoU threshold. A high-scoring prediction on a crowd region is excused.
    a, b = _block(0, 8, 0, 8), _block(20, 30, 20, 30)
    crowd = _block(30, 40, 40, 60)
    gt = _gt([(a, 1), (b, 1), (crowd, 1)], categories=(1,), crowd=(2,))
    preds = [(a, 0.9), (_block(10, 16, 40, 50), 0.8), (crowd, 0.95)]
    results = [{"image_id": 7, "category_id": 1, "segmentation": encode_masks(m[None])[0], "score": s} for m, s in preds]
    out = coco_mask_ap(gt, results, backend=backend)
    assert out["AP"] == pytest.approx(100 * 51 / 101) and out["AP50"] == pytest.approx(100 * 51 / 101)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_predictions_is_nan_and_bad_input_is_an_error(backend):
    gt = _gt([(_block(0, 8, 0, 8), 1)], categories=(1,))
    ev = InstanceEvaluator(gt, dataset_ids=[1], backend=backend)
    ev.update(7, torch.zeros(0, 40, 60, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert all(math.isnan(ev.compute()[k]) for k in ("AP", "AP50", "APs"))
    with pytest.raises(ValueError, match="label 3 outside"):
        ev.update(7, torch.ones(1, 40, 60, dtype=torch.bool), torch.ones(1), torch.tensor([3]))
    with pytest.raises(ValueError, match="backend must be one of"):
        coco_mask_ap(gt, [], backend="rust")


def _random_blob(rng, h, w):
    """A rectangle or an ellipse of random size (small, medium and large COCO areas occur)."""
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    ry, rx = rng.integers(2, h // 2), rng.integers(2, w // 2)
    yy, xx = np.mgrid[:h, :w]
    if rng.random() < 0.5:
        return (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _random_coco(rng, num_images=12, h=120, w=160):
    """(GT dict, results, evaluated image ids): crowd regions (~15%), an image without GT but with
    predictions, one with GT but no predictions, one with neither, one with 110 predictions
    (past maxDets), scores on a 0.05 grid (ties), a category only predicted and one never
    predicted, and an image left out of the evaluated ids."""
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        gts = []
        for _ in range(0 if image_id in (1, 3) else int(rng.integers(1, 9))):
            mask, category = _random_blob(rng, h, w), int(rng.choice([1, 2, 3, 4, 6]))
            gts.append((mask, category))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": encode_masks(mask[None], "reference")[0],
                                "area": float(mask.sum()), "bbox": [0, 0, 1, 1], "iscrowd": int(rng.random() < 0.15)})
        num_predictions = {2: 0, 3: 0, 4: 110}.get(image_id, int(rng.integers(1, 15)))
        for _ in range(num_predictions):
            if gts and rng.random() < 0.6:
                mask, category = gts[int(rng.integers(len(gts)))]
                mask = np.roll(mask, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), (0, 1))
                category = category if rng.random() < 0.8 and category != 6 else int(rng.choice([1, 2, 3, 4, 5]))
            else:
                mask, category = _random_blob(rng, h, w), int(rng.choice([1, 2, 3, 4, 5]))
            results.append({"image_id": image_id, "category_id": category, "score": round(float(rng.random()) * 20) / 20,
                            "segmentation": encode_masks(mask[None], "reference")[0]})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 7)]}
    return gt, results, list(range(1, num_images))


def _same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_give_pycocotools_numbers(seed):
    """Every summary number and per-class AP, bit for bit, from both backends and from
    pycocotools' own COCOeval.summarize."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results, image_ids = _random_coco(np.random.default_rng(seed))
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "segm")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    expected = [100 * s if s >= 0 else math.nan for s in ev.stats[:6]]
    assert 0 < expected[0] < 100
    outputs = [coco_mask_ap(gt, results, image_ids, backend=b) for b in BACKENDS]
    for out in outputs:
        assert all(_same(out[k], e) for k, e in zip(METRICS, expected)), (out, expected)
    hotcoco_out, reference_out = outputs
    assert hotcoco_out["per_class"].keys() == reference_out["per_class"].keys()
    assert all(_same(hotcoco_out["per_class"][k], v) for k, v in reference_out["per_class"].items())
    # category names that are not unique: hotcoco's per-class table (by name) cannot be used,
    # the precision table is read instead
    same_names = dict(gt, categories=[dict(c, name="thing") for c in gt["categories"]])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    fallback = coco_mask_ap(same_names, results, image_ids, class_names=names, backend="hotcoco")
    assert all(_same(fallback[k], hotcoco_out[k]) for k in METRICS)
    assert all(_same(fallback["per_class"][k], v) for k, v in reference_out["per_class"].items())
    assert math.isnan(reference_out["per_class"]["c5"])  # predicted, never in the GT: undefined
    assert reference_out["per_class"]["c6"] == 0.0  # in the GT, never predicted
    # the six numbers follow from the precision table as summarize derives them
    assert summary_from_precision(ev.eval["precision"], ev.params.iouThrs) == pytest.approx(list(ev.stats[:6]), abs=0)


def test_encode_masks_backends_agree():
    rng = np.random.default_rng(3)
    masks = np.stack([_random_blob(rng, 37, 53) for _ in range(5)] + [np.zeros((37, 53), bool),
                                                                       np.ones((37, 53), bool)])
    assert encode_masks(masks, "hotcoco") == encode_masks(masks, "reference")
    assert encode_masks(torch.from_numpy(masks).to(torch.uint8), "hotcoco") == encode_masks(masks, "reference")


def _tiny_cfg(root):
    from test_mask2former_engine import tiny_m2f

    cfg = tiny_m2f(root)
    base = fmf.get_config("mask2former-coco-instance-r50")
    cfg.data, cfg.test = base.data, base.test
    cfg.data.root, cfg.data.num_workers, cfg.data.crop_size = str(root), 0, (64, 64)
    cfg.data.min_size_test, cfg.data.max_size_test = H, 1333
    cfg.model.num_classes, cfg.test.instance_topk = 80, 10
    return cfg


def test_evaluator_end_to_end(tmp_path, monkeypatch):
    """The engine's evaluate_dataset on a tiny COCO-instance val split: an oracle that returns
    the ground truth (decoded from the JSON, crowd excluded) scores 100; a real tiny model runs
    through inference and COCOeval and reports every metric."""
    from pycocotools import mask as mask_util

    from fastmaskformer.data import build_dataset, get_metadata
    from fastmaskformer.engine import evaluator

    root = make_coco_instance(tmp_path)
    cfg = _tiny_cfg(root)
    dataset = build_dataset(cfg.data, "val", train=False)
    torch.manual_seed(0)
    model = fmf.build_model(cfg.model)

    gt = json.loads((root / "coco/annotations/instances_val2017.json").read_text())
    cmap = get_metadata("coco-instance").category_map

    def oracle(model, images, sizes, test_cfg, tasks, thing_classes, amp):
        assert set(tasks) == {"instance"}
        out = []
        for image_id in oracle.ids.pop(0):
            anns = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]
                    and not (isinstance(a["segmentation"], list) and len(a["segmentation"][0]) < 6)]
            masks = []
            for a in anns:
                s = a["segmentation"]
                rle = mask_util.merge(mask_util.frPyObjects(s, H, W)) if isinstance(s, list) else s
                masks.append(mask_util.decode(rle).astype(bool))
            masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, H, W, dtype=torch.bool)
            out.append({"instance": {"masks": masks, "scores": torch.linspace(0.9, 0.5, len(anns)),
                                     "labels": torch.tensor([cmap[a["category_id"]] for a in anns], dtype=torch.long)}})
        return out

    oracle.ids = [[1], [2]]
    monkeypatch.setattr(evaluator, "infer", oracle)
    res = evaluator.evaluate_dataset(model, dataset, cfg, progress=False)
    assert set(res) == {"segm"}
    assert [res["segm"]["AP"], res["segm"]["AP50"]] == pytest.approx([100.0, 100.0])
    assert res["segm"]["per_class"]["dog"] == pytest.approx(100.0) and math.isnan(res["segm"]["per_class"]["zebra"])
    monkeypatch.undo()

    res = evaluator.evaluate_dataset(model, dataset, cfg, progress=False)
    seg = res["segm"]
    assert set(seg) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} and len(seg["per_class"]) == 80
    assert all(math.isnan(seg[k]) or 0.0 <= seg[k] <= 100.0 for k in ("AP", "AP50", "AP75", "APs"))
