"""Dataset readers on tiny files written in each standard layout, their errors, and the real
COCO panoptic sample."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fastmaskformer as fmf
from fastmaskformer import Target
from fastmaskformer.data import DatasetError, PanopticSegmentation, build_dataset, get_metadata

H, W = 24, 32


def _cfg(name, root):
    cfg = fmf.get_config("ade20k-150-r50").data
    cfg.dataset, cfg.root = name, (None if root is None else str(root))
    return cfg


def _image(path, seed=0, size=(H, W)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _label(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _stripes(values, dtype=np.uint8, size=(H, W)):
    """Label map with vertical bands of ``values``."""
    band = np.array_split(np.arange(size[1]), len(values))
    out = np.zeros(size, dtype)
    for v, cols in zip(values, band):
        out[:, cols] = v
    return out


# ------------------------------------------------------------------ semantic layouts
SEMANTIC_LAYOUTS = {
    # name: (image path, label path, stored values, expected contiguous classes, split word)
    "ade20k-150": ("ADEChallengeData2016/images/{s}/a_1.jpg", "ADEChallengeData2016/annotations/{s}/a_1.png",
                   _stripes([0, 1, 150]), [0, 149], ("training", "validation")),
    "ade20k-full-847": ("ADE20K_2021_17_01/images_detectron2/{s}/b.jpg",
                        "ADE20K_2021_17_01/annotations_detectron2/{s}/b.tif",
                        _stripes([846, 65535, 3], np.uint16), [3, 846], ("training", "validation")),
    "coco-stuff-10k": ("coco/coco_stuff_10k/images_detectron2/{s}/c.jpg",
                       "coco/coco_stuff_10k/annotations_detectron2/{s}/c.png",
                       _stripes([0, 170, 255]), [0, 170], ("train", "test")),
    "cityscapes": ("cityscapes/leftImg8bit/{s}/aachen/aachen_0_1_leftImg8bit.png",
                   "cityscapes/gtFine/{s}/aachen/aachen_0_1_gtFine_labelTrainIds.png",
                   _stripes([18, 255, 7]), [7, 18], ("train", "val")),
    "mapillary": ("mapillary_vistas/{s}/images/d.jpg", "mapillary_vistas/{s}/labels/d.png",
                  _stripes([64, 65, 2]), [2, 64], ("training", "validation")),
}


@pytest.mark.parametrize("name", sorted(SEMANTIC_LAYOUTS))
def test_semantic_layouts(tmp_path, name):
    image_rel, label_rel, stored, classes, splits = SEMANTIC_LAYOUTS[name]
    for split in splits:
        _image(tmp_path / image_rel.format(s=split))
        _label(tmp_path / label_rel.format(s=split), stored)
    cfg = _cfg(name, tmp_path)
    ds = build_dataset(cfg, "train", train=True, augment=None)
    assert len(ds) == 1
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 512, 512)  # train crop + pad
    assert isinstance(item["target"], Target)
    assert set(item["target"].labels.tolist()) <= set(classes)
    val = build_dataset(cfg, "validation", train=False)
    item = val[0]
    assert (item["height"], item["width"]) == (H, W)
    sem = item["sem_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (H, W)
    assert sorted(set(sem.unique().tolist()) - {val.metadata.ignore_label}) == classes
    assert item["target"].labels.tolist() == classes  # test resize keeps every class
    assert item["file_name"].endswith(image_rel.rsplit("/", 1)[1])


def test_ade20k_decoding_and_ignore(tmp_path):
    _image(tmp_path / "ADEChallengeData2016/images/validation/x.jpg")
    _label(tmp_path / "ADEChallengeData2016/annotations/validation/x.png", _stripes([0, 1, 150]))
    ds = build_dataset(_cfg("ade20k-150", tmp_path), "val", train=False, augment=lambda i, s, r: (i, s))
    item = ds[0]
    assert sorted(item["sem_seg"].unique().tolist()) == [0, 149, 255]
    t = item["target"]
    assert t.labels.tolist() == [0, 149]
    assert ((t.segment_map == -1) == (item["sem_seg"] == 255)).all()


def test_semantic_augmentation_determinism_and_target_after_augmentation(tmp_path):
    _image(tmp_path / "ADEChallengeData2016/images/training/x.jpg", size=(200, 300))
    _label(tmp_path / "ADEChallengeData2016/annotations/training/x.png", _stripes([1, 2, 3, 4, 5, 6], size=(200, 300)))
    cfg = _cfg("ade20k-150", tmp_path)
    cfg.crop_size = (64, 64)
    ds = build_dataset(cfg, "training", train=True)
    a, b, c = ds[(0, 7)], ds[(0, 7)], ds[(0, 8)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"].segment_map, b["target"].segment_map)
    assert a["image"].shape == (3, 64, 64)
    assert not torch.equal(a["image"], c["image"])
    for item in (a, c):  # every segment in the cropped target is present, labels match the crop
        t = item["target"]
        assert sorted(t.segment_map.unique().tolist()) == [-1] * bool((t.segment_map == -1).any()) + list(range(t.num_segments))
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], build_dataset(cfg, "training", train=True)[0]["image"])


# ------------------------------------------------------------------ semantic errors
def _ade(tmp_path, label, image_size=(H, W)):
    _image(tmp_path / "ADEChallengeData2016/images/training/x.jpg", size=image_size)
    _label(tmp_path / "ADEChallengeData2016/annotations/training/x.png", label)
    return build_dataset(_cfg("ade20k-150", tmp_path), "training", train=True)


def test_error_missing_root_and_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTMASKFORMER_DATASETS", raising=False)
    with pytest.raises(DatasetError, match="no dataset root"):
        build_dataset(_cfg("ade20k-150", None), "training", True)
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(_cfg("ade20k-150", tmp_path / "nope"), "training", True)
    with pytest.raises(DatasetError, match=r"ADEChallengeData2016/images/training.*expected layout"):
        build_dataset(_cfg("ade20k-150", tmp_path), "training", True)
    monkeypatch.setenv("FASTMASKFORMER_DATASETS", str(tmp_path))
    with pytest.raises(DatasetError, match="ADEChallengeData2016"):
        build_dataset(_cfg("ade20k-150", None), "training", True)


def test_error_missing_label_file(tmp_path):
    _image(tmp_path / "ADEChallengeData2016/images/training/x.jpg")
    (tmp_path / "ADEChallengeData2016/annotations/training").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no label map for image .*x\.jpg"):
        build_dataset(_cfg("ade20k-150", tmp_path), "training", True)


def test_error_size_mismatch(tmp_path):
    ds = _ade(tmp_path, _stripes([1, 2]), image_size=(H + 1, W))
    with pytest.raises(DatasetError, match=r"size mismatch: image .*x\.jpg is 25x32 .*x\.png is 24x32"):
        ds[0]


def test_error_label_out_of_range(tmp_path):
    ds = _ade(tmp_path, _stripes([1, 200]))
    with pytest.raises(DatasetError, match=r"x\.png has values \[199\] outside \[0, 150\)"):
        ds[0]


def test_error_label_wrong_bit_depth(tmp_path):
    ds = _ade(tmp_path, _stripes([1, 2], np.uint16))
    with pytest.raises(DatasetError, match="must be 8-bit"):
        ds[0]


def test_error_corrupt_image(tmp_path):
    ds = _ade(tmp_path, _stripes([1, 2]))
    path = tmp_path / "ADEChallengeData2016/images/training/x.jpg"
    path.write_bytes(path.read_bytes()[:100])  # truncated JPEG
    with pytest.raises(DatasetError, match=r"cannot decode .*x\.jpg"):
        ds[0]
    path.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"cannot decode .*x\.jpg"):
        ds[0]


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset(_cfg("imagenet", tmp_path), "training", True)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset(_cfg("ade20k-150", tmp_path), "holdout", True)


# ------------------------------------------------------------------ panoptic
def _ids_png(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _write_panoptic(root, json_rel, png_rel, image_rel, categories, segments, ids, image_name="p.jpg"):
    _image(root / image_rel / image_name)
    _ids_png(root / png_rel / "p.png", ids)
    data = {
        "images": [{"id": 5, "file_name": image_name, "height": H, "width": W}],
        "annotations": [{"image_id": 5, "file_name": "p.png", "segments_info": segments}],
        "categories": categories,
    }
    (root / json_rel).parent.mkdir(parents=True, exist_ok=True)
    (root / json_rel).write_text(json.dumps(data))


def _coco_fixture(root, segments=None, ids=None, image_name="p.jpg"):
    ids = ids if ids is not None else _stripes([0, 70000, 300, 12], np.int64)
    segments = segments if segments is not None else [
        {"id": 70000, "category_id": 1, "iscrowd": 0},   # person (thing, contiguous 0)
        {"id": 300, "category_id": 200, "iscrowd": 0},   # stuff 200 (contiguous 132)
        {"id": 12, "category_id": 1, "iscrowd": 1},      # crowd person -> ignored in target
    ]
    _write_panoptic(root, "coco/panoptic_val2017.json", "coco/panoptic_val2017", "coco/val2017",
                    [], segments, ids, image_name)


def test_coco_panoptic_released_annotations_folder(tmp_path):
    """The JSON where COCO's zip (and detectron2) keep it: coco/annotations/."""
    _coco_fixture(tmp_path)
    (tmp_path / "coco/annotations").mkdir()
    (tmp_path / "coco/panoptic_val2017.json").rename(tmp_path / "coco/annotations/panoptic_val2017.json")
    ds = build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=False, augment=lambda i, s, r: (i, s))
    assert len(ds) == 1 and ds[0]["image_id"] == 5


def test_coco_panoptic_layout(tmp_path):
    _coco_fixture(tmp_path)
    cfg = _cfg("coco-panoptic", tmp_path)
    ds = build_dataset(cfg, "val", train=False, augment=lambda i, s, r: (i, s))
    item = ds[0]
    assert item["image_id"] == 5 and (item["height"], item["width"]) == (H, W)
    t = item["target"]
    assert t.labels.tolist() == [0, 132]  # category ids -> contiguous; crowd dropped
    assert int((t.segment_map == 0).sum()) == int((item["pan_seg"] == 70000).sum())
    assert ((t.segment_map == -1) == ((item["pan_seg"] == 0) | (item["pan_seg"] == 12))).all()
    assert [s["isthing"] for s in item["segments_info"]] == [True, False, True]
    train = build_dataset(cfg, "val", train=True)  # DETR-style pipeline, no padding
    item = train[(0, 3)]
    assert min(item["image"].shape[1:]) in range(480, 801, 32)
    assert item["target"].segment_map.shape == item["image"].shape[1:]


def test_crop_that_removes_a_segment_keeps_it_with_no_pixels(tmp_path):
    # official mappers: every non-crowd segment stays in the target, with an empty mask
    _coco_fixture(tmp_path)  # bands: void | 70000 | 300 | crowd 12, 8 columns each
    crop = lambda image, seg, rng: (image[:, :12], seg[:, :12])  # noqa: E731 (void + half of 70000)
    t = build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=True, augment=crop)[0]["target"]
    assert t.labels.tolist() == [0, 132]
    assert int((t.segment_map == 0).sum()) == H * 4 and int((t.segment_map == 1).sum()) == 0


def test_panoptic_padding_is_void_not_a_segment(tmp_path):
    # the semantic pipeline pads to the crop size: id maps with void (0), never the ignore
    # label 255, which can be a segment id
    ids = _stripes([255, 9], np.int64)
    _write_panoptic(tmp_path, "ADEChallengeData2016/ade20k_panoptic_train.json",
                    "ADEChallengeData2016/ade20k_panoptic_train", "ADEChallengeData2016/images/training",
                    [], [{"id": 255, "category_id": 7, "iscrowd": 0}, {"id": 9, "category_id": 0, "iscrowd": 0}], ids)
    cfg = _cfg("ade20k-panoptic", tmp_path)
    cfg.min_scale_factors = (0.5,)  # shortest edge 256 < crop 512: always padded
    valid = build_dataset(cfg, "training", train=True)[0]["target"].segment_map >= 0
    h, w = int(valid.any(1).sum()), int(valid.any(0).sum())  # no void in the image: -1 = padding
    assert h == 256 and valid[:h, :w].all() and not valid[h:].any() and not valid[:, w:].any()


def test_ade20k_panoptic_layout(tmp_path):
    ids = _stripes([0, 7, 9], np.int64)
    _write_panoptic(tmp_path, "ADEChallengeData2016/ade20k_panoptic_train.json",
                    "ADEChallengeData2016/ade20k_panoptic_train", "ADEChallengeData2016/images/training",
                    [], [{"id": 7, "category_id": 7, "iscrowd": 0}, {"id": 9, "category_id": 0, "iscrowd": 0}], ids)
    ds = build_dataset(_cfg("ade20k-panoptic", tmp_path), "training", train=True, augment=lambda i, s, r: (i, s))
    assert ds[0]["target"].labels.tolist() == [7, 0]  # bed (thing), wall (stuff)
    assert get_metadata("ade20k-panoptic").isthing[7]


def test_panoptic_error_png_id_missing_from_json(tmp_path):
    _coco_fixture(tmp_path, segments=[{"id": 70000, "category_id": 1, "iscrowd": 0}])
    ds = build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=False)
    with pytest.raises(DatasetError, match=r"p\.png contains segment ids \[12, 300\] that are not in its segments_info"):
        ds[0]


def test_panoptic_error_unknown_category(tmp_path):
    _coco_fixture(tmp_path, segments=[{"id": 300, "category_id": 999, "iscrowd": 0}])
    with pytest.raises(DatasetError, match="category_id 999 unknown"):
        build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=False)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../p.jpg"])
def test_panoptic_error_path_traversal(tmp_path, name):
    _coco_fixture(tmp_path)
    json_path = tmp_path / "coco/panoptic_val2017.json"
    data = json.loads(json_path.read_text())
    data["images"][0]["file_name"] = name
    json_path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="escapes the dataset directory"):
        build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=False)


def test_panoptic_error_missing_json_and_files(tmp_path):
    with pytest.raises(DatasetError, match=r"panoptic_val2017\.json not found; expected layout"):
        build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=False)
    _coco_fixture(tmp_path)
    (tmp_path / "coco/panoptic_val2017/p.png").unlink()
    ds = build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=False)
    with pytest.raises(DatasetError, match=r"p\.png not found"):
        ds[0]


def test_panoptic_error_size_mismatch(tmp_path):
    _coco_fixture(tmp_path, ids=np.zeros((H, W + 2), np.int64), segments=[])
    ds = build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=False)
    with pytest.raises(DatasetError, match="size mismatch"):
        ds[0]


def test_coco_panoptic_real_sample(coco_sample):
    meta = get_metadata("coco-panoptic")
    ds = PanopticSegmentation(coco_sample / "panoptic_examples.json", coco_sample / "panoptic_examples",
                              coco_sample / "input_images", meta, augment=None, train=False)
    assert len(ds) == 2
    data = json.loads((coco_sample / "panoptic_examples.json").read_text())
    for i, ann in enumerate(data["annotations"]):
        item = ds[i]
        assert item["image_id"] == ann["image_id"]
        assert item["image"].shape[1:] == (item["height"], item["width"])
        t = item["target"]
        kept = [s for s in ann["segments_info"] if not s["iscrowd"]]
        assert t.num_segments == len(kept)
        assert t.labels.tolist() == [meta.category_map[s["category_id"]] for s in kept]
        for m, s in enumerate(kept):
            assert int((t.segment_map == m).sum()) == s["area"]  # areas in the JSON are pixel counts
    assert meta.num_classes == 133 and len(meta.thing_classes) == 80


def test_panoptic_loader_on_copied_sample_with_augmentation(coco_sample, tmp_path):
    # the sample in the standard layout (copied into tmp_path only, never into the repo)
    shutil.copytree(coco_sample / "input_images", tmp_path / "coco/val2017")
    shutil.copytree(coco_sample / "panoptic_examples", tmp_path / "coco/panoptic_val2017")
    shutil.copy(coco_sample / "panoptic_examples.json", tmp_path / "coco/panoptic_val2017.json")
    ds = build_dataset(_cfg("coco-panoptic", tmp_path), "val", train=True)
    for seed in range(3):
        item = ds[(1, seed)]
        assert item["image"].shape[1:] == item["target"].segment_map.shape
        assert item["target"].num_segments > 0


def test_symlinked_files_outside_root_still_load(tmp_path):
    # datasets are often symlinked into place: the traversal check is lexical, not resolved
    elsewhere = tmp_path / "storage"
    _coco_fixture(elsewhere)
    root = tmp_path / "root"
    (root / "coco").mkdir(parents=True)
    for name in ("val2017", "panoptic_val2017", "panoptic_val2017.json"):
        (root / "coco" / name).symlink_to(elsewhere / "coco" / name)
    ds = build_dataset(_cfg("coco-panoptic", root), "val", train=False)
    assert ds[0]["target"].labels.tolist() == [0, 132]
