"""COCO mask AP (``InstanceEvaluator`` / ``coco_mask_ap``): a perfect prediction scores 100, small
cases match values worked out by hand from COCOeval's definition (101-point interpolated
precision, IoU thresholds 0.50:0.05:0.95, crowd regions excused), and the engine's evaluator
reports it on a tiny COCO-instance dataset."""
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

import fastmaskformer as fmf  # noqa: E402
from coco_instance_tiny import H, W, make_coco_instance  # noqa: E402
from fastmaskformer.evaluation import InstanceEvaluator, coco_mask_ap  # noqa: E402
from fastmaskformer.evaluation.instance import encode_masks  # noqa: E402


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


def test_perfect_prediction_is_100():
    a, b, c = _block(0, 10, 0, 10), _block(20, 30, 20, 35), _block(5, 15, 40, 50)
    gt = _gt([(a, 1), (b, 2), (c, 1)])
    ev = InstanceEvaluator(gt, dataset_ids=[1, 2], class_names=["one", "two"])
    ev.update(7, torch.from_numpy(np.stack([a, b, c])), torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]))
    out = ev.compute()
    assert [out[k] for k in ("AP", "AP50", "AP75", "APs")] == pytest.approx([100.0] * 4)
    assert math.isnan(out["APm"]) and math.isnan(out["APl"])  # no object of those sizes: undefined
    assert out["per_class"] == pytest.approx({"one": 100.0, "two": 100.0})


def test_hand_computed_values():
    # one GT of 8x8 = 64 px, a prediction covering 8x5 = 40 of it: IoU 40/64 = 0.625, a match at
    # the thresholds 0.50, 0.55, 0.60 only -> AP = 3/10 of 100, AP50 = 100, AP75 = 0
    gt = _gt([(_block(0, 8, 0, 8), 1)], categories=(1,))
    pred = [{"image_id": 7, "category_id": 1, "segmentation": encode_masks(_block(0, 8, 0, 5)[None])[0], "score": 0.9}]
    out = coco_mask_ap(gt, pred)
    assert [out["AP"], out["AP50"], out["AP75"]] == pytest.approx([30.0, 100.0, 0.0])

    # two GT, one found exactly (score 0.9), then a false positive (0.8): recall reaches 0.5 at
    # precision 1 -> the 51 recall thresholds 0.00..0.50 have precision 1, the other 50 none:
    # AP = 51/101 at every IoU threshold. A high-scoring prediction on a crowd region is excused.
    a, b = _block(0, 8, 0, 8), _block(20, 30, 20, 30)
    crowd = _block(30, 40, 40, 60)
    gt = _gt([(a, 1), (b, 1), (crowd, 1)], categories=(1,), crowd=(2,))
    preds = [(a, 0.9), (_block(10, 16, 40, 50), 0.8), (crowd, 0.95)]
    results = [{"image_id": 7, "category_id": 1, "segmentation": encode_masks(m[None])[0], "score": s} for m, s in preds]
    out = coco_mask_ap(gt, results)
    assert out["AP"] == pytest.approx(100 * 51 / 101) and out["AP50"] == pytest.approx(100 * 51 / 101)


def test_no_predictions_is_nan_and_bad_input_is_an_error():
    gt = _gt([(_block(0, 8, 0, 8), 1)], categories=(1,))
    ev = InstanceEvaluator(gt, dataset_ids=[1])
    ev.update(7, torch.zeros(0, 40, 60, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert all(math.isnan(ev.compute()[k]) for k in ("AP", "AP50", "APs"))
    with pytest.raises(ValueError, match="label 3 outside"):
        ev.update(7, torch.ones(1, 40, 60, dtype=torch.bool), torch.ones(1), torch.tensor([3]))


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
