"""Cityscapes panoptic: ``prepare cityscapes`` writes what cityscapesScripts' createPanopticImgs
writes (PNG values, JSON bytes; expected values worked out by hand here), and the
``cityscapes-panoptic`` loader reads that layout as detectron2 does (images found by image_id in
the city folders, label ids -> the 19 train ids, crowd dropped from targets)."""
import json

import numpy as np
import pytest
from PIL import Image

import fastmaskformer as fmf
from fastmaskformer.data import DatasetError, build_dataset, get_metadata
from fastmaskformer.data.prepare import PrepareError, prepare

H, W = 30, 40


def _instance_ids() -> np.ndarray:
    ids = np.zeros((H, W), np.uint16)  # 0: unlabeled (ignored in eval)
    ids[20:30, :] = 7  # road
    ids[0:5, :] = 23  # sky
    ids[5:20, 0:4] = 9  # parking: ignored in eval -> void
    ids[10:20, 5:15] = 26001  # car 1
    ids[12:16, 20:26] = 26002  # car 2
    ids[6:9, 30:33] = 24  # a group of people: crowd
    ids[25:28, 30:40] = 29000  # caravan: ignored in eval
    return ids


def _raw(src, splits=(("train", "aachen"), ("val", "lindau"))):
    base = src / "cityscapes"
    for split, city in splits:
        stem = f"{city}_000000_000019"
        folder = base / "gtFine" / split / city
        folder.mkdir(parents=True)
        (folder / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": [
            {"label": "road", "polygon": [[0, 20], [39, 20], [39, 29], [0, 29]]}]}))
        Image.fromarray(_instance_ids()).save(folder / f"{stem}_gtFine_instanceIds.png")
        images = base / "leftImg8bit" / split / city
        images.mkdir(parents=True)
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(images / f"{stem}_leftImg8bit.png")
    return base


def _expected_json(split, city):
    stem = f"{city}_000000_000019"
    segments = [  # ascending id; bbox [x, y, w, h] and areas counted from the blocks above
        {"id": 7, "category_id": 7, "area": 10 * 40 - 30, "bbox": [0, 20, 40, 10], "iscrowd": 0},
        {"id": 23, "category_id": 23, "area": 5 * 40, "bbox": [0, 0, 40, 5], "iscrowd": 0},
        {"id": 24, "category_id": 24, "area": 9, "bbox": [30, 6, 3, 3], "iscrowd": 1},
        {"id": 26001, "category_id": 26, "area": 100, "bbox": [5, 10, 10, 10], "iscrowd": 0},
        {"id": 26002, "category_id": 26, "area": 24, "bbox": [20, 12, 6, 4], "iscrowd": 0},
    ]
    from fastmaskformer.data.prepare.cityscapes import panoptic_categories

    return {"images": [{"id": stem, "width": W, "height": H, "file_name": f"{stem}_gtFine_leftImg8bit.png"}],
            "annotations": [{"image_id": stem, "file_name": f"{stem}_gtFine_panoptic.png", "segments_info": segments}],
            "categories": panoptic_categories()}


def test_prepare_writes_create_panoptic_imgs_output(tmp_path):
    src, root = tmp_path / "raw", tmp_path / "datasets"
    _raw(src)
    outputs = prepare("cityscapes", src, root, jobs=1, progress=False)
    gt = root / "cityscapes" / "gtFine"
    assert gt / "cityscapes_panoptic_val.json" in outputs and gt / "cityscapes_panoptic_train.json" in outputs
    for split, city in (("train", "aachen"), ("val", "lindau")):
        text = (gt / f"cityscapes_panoptic_{split}.json").read_text()
        assert text == json.dumps(_expected_json(split, city), sort_keys=True, indent=4)
        png = Image.open(gt / f"cityscapes_panoptic_{split}" / f"{city}_000000_000019_gtFine_panoptic.png")
        assert png.mode == "RGB" and png.size == (W, H)
        rgb = np.asarray(png)
        ids = _instance_ids().astype(np.int64)
        kept = np.isin(ids, [7, 23, 24, 26001, 26002])
        expected = np.stack([ids % 256, ids // 256, ids // 65536], -1) * kept[..., None]
        np.testing.assert_array_equal(rgb, expected.astype(np.uint8))
        assert tuple(rgb[10, 5]) == (26001 - 101 * 256, 101, 0) and tuple(rgb[0, 0]) == (23, 0, 0)
        assert tuple(rgb[7, 1]) == (0, 0, 0) and tuple(rgb[26, 35]) == (0, 0, 0)  # parking, caravan: void
    cats = json.loads(text)["categories"]
    assert [c["id"] for c in cats] == list(get_metadata("cityscapes-panoptic").dataset_ids)
    assert [c["id"] for c in cats if c["isthing"]] == [24, 25, 26, 27, 28, 31, 32, 33]
    assert cats[0] == {"id": 7, "name": "road", "color": [128, 64, 128], "supercategory": "flat", "isthing": 0}

    # idempotent: a second run rewrites nothing; a lost PNG is written again, the JSON kept
    png = gt / "cityscapes_panoptic_val" / "lindau_000000_000019_gtFine_panoptic.png"
    stamp = (gt / "cityscapes_panoptic_val.json").stat().st_mtime_ns
    prepare("cityscapes", src, root, jobs=1, progress=False)
    assert (gt / "cityscapes_panoptic_val.json").stat().st_mtime_ns == stamp
    png.unlink()
    prepare("cityscapes", src, root, jobs=1, progress=False)
    assert png.is_file() and not list(gt.glob("**/.*.tmp"))

    bad = src / "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine_instanceIds.png"
    Image.fromarray(np.full((H, W), 77, np.uint16)).save(bad)
    (gt / "cityscapes_panoptic_val.json").unlink()
    with pytest.raises(PrepareError, match="value 77 names no Cityscapes label id"):
        prepare("cityscapes", src, root, jobs=1, progress=False)


def test_loader_reads_the_panoptic_layout(tmp_path):
    src = tmp_path / "raw"
    _raw(src)
    prepare("cityscapes", src, None, jobs=1, progress=False)  # in place, as the official script
    cfg = fmf.get_config("mask2former-cityscapes-panoptic-r50")
    cfg.data.root, cfg.data.crop_size, cfg.data.min_size_test = str(src), (16, 32), H
    val = build_dataset(cfg.data, "val", train=False)
    item = val[0]
    assert item["file_name"].endswith("leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    assert item["image_id"] == "lindau_000000_000019" and (item["height"], item["width"]) == (H, W)
    # road 0, sky 10, car 13 twice; the crowd of people is not a target segment
    assert item["target"].labels.tolist() == [0, 10, 13, 13]
    seg = item["target"].segment_map
    assert seg[25, 0] == 0 and seg[0, 0] == 1 and seg[10, 5] == 2 and seg[12, 20] == 3
    assert seg[7, 31] == -1 and seg[7, 1] == -1  # crowd, void
    assert [s["isthing"] for s in item["segments_info"]] == [False, False, True, True, True]
    assert int(item["pan_seg"][10, 5]) == 26001
    train = build_dataset(cfg.data, "train", train=True)
    out = train[(0, 0)]
    assert out["image"].shape == (3, 16, 32) and out["target"].segment_map.shape == (16, 32)
    (src / "cityscapes/leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(DatasetError, match="no image .*lindau_000000_000019_leftImg8bit.png"):
        build_dataset(cfg.data, "val", train=False)


def test_prepare_without_instance_maps_says_so(tmp_path, capsys):
    src = tmp_path / "raw"
    base = _raw(src, splits=(("val", "lindau"),))
    for f in base.glob("gtFine/*/*/*_instanceIds.png"):
        f.unlink()
    prepare("cityscapes", src, None, jobs=1, progress=False)
    assert "panoptic ground truth (cityscapes-panoptic) was not written" in capsys.readouterr().err


def test_prepare_cli_names(tmp_path, capsys):
    from fastmaskformer.cli import main

    src = tmp_path / "raw"
    _raw(src, splits=(("val", "lindau"),))
    assert main(["prepare", "cityscapes-panoptic", "--src", str(src), "--no-progress", "--jobs", "1"]) == 0
    assert (src / "cityscapes/gtFine/cityscapes_panoptic_val.json").is_file()
    assert main(["prepare", "coco-instance", "--src", str(src)]) == 0
    assert "needs no preparation" in capsys.readouterr().out


def test_evaluator_on_cityscapes_panoptic(tmp_path, monkeypatch):
    """evaluate_dataset on the prepared layout: an oracle returning the ground truth (contiguous
    class ids, crowd left void) scores PQ 100 and mIoU 100 (label ids -> train ids both ways); a
    tiny model runs semantic + panoptic inference (instance AP needs a COCO instance JSON)."""
    import torch

    from fastmaskformer.engine import evaluator
    from test_mask2former_engine import tiny_m2f

    src = tmp_path / "raw"
    _raw(src, splits=(("val", "lindau"),))
    prepare("cityscapes", src, None, jobs=1, progress=False)
    cfg = tiny_m2f(src)
    base = fmf.get_config("mask2former-cityscapes-panoptic-r50")
    cfg.data, cfg.test = base.data, base.test
    cfg.data.root, cfg.data.num_workers, cfg.data.min_size_test = str(src), 0, H
    cfg.model.num_classes, cfg.test.instance_topk = 19, 5
    dataset = build_dataset(cfg.data, "val", train=False)
    cmap = get_metadata("cityscapes-panoptic").category_map

    def oracle(model, images, sizes, test_cfg, tasks, thing_classes, amp):
        assert set(tasks) == {"semantic", "panoptic"} and list(thing_classes) == list(range(11, 19))
        pan = dataset[0]["pan_seg"].clone()
        segments = []
        sem = torch.full((H, W), 255, dtype=torch.int64)
        for s in dataset[0]["segments_info"]:
            sem[pan == s["id"]] = cmap[s["category_id"]]
            if s["iscrowd"]:
                pan[pan == s["id"]] = 0
            else:
                segments.append({"id": s["id"], "category_id": cmap[s["category_id"]], "isthing": s["isthing"]})
        return [{"semantic": torch.where(sem == 255, 0, sem), "panoptic": (pan.int(), segments)}]

    monkeypatch.setattr(evaluator, "infer", oracle)
    model = fmf.build_model(cfg.model)
    res = evaluator.evaluate_dataset(model, dataset, cfg, progress=False)
    assert set(res) == {"sem_seg", "panoptic"}
    assert res["panoptic"]["PQ"] == pytest.approx(100.0) and res["sem_seg"]["mIoU"] == pytest.approx(100.0)
    monkeypatch.undo()
    res = evaluator.evaluate_dataset(model, dataset, cfg, progress=False)
    assert set(res) == {"sem_seg", "panoptic"} and 0.0 <= res["panoptic"]["PQ"] <= 100.0
