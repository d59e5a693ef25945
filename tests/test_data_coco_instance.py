"""The COCO instance dataset (``coco-instance``): the released JSON read as detectron2's
load_coco_json + Mask2Former's COCO instance mapper (polygons and RLE decoded, invalid polygons
skipped, crowd dropped from training targets, images without annotations skipped in training,
empty instances dropped after augmentation), overlaps resolved smaller-on-top."""
import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_util  # noqa: E402

import fastmaskformer as fmf  # noqa: E402
from coco_instance_tiny import H, W, crowd_mask, make_coco_instance  # noqa: E402
from fastmaskformer.data import DatasetError, build_dataset, get_metadata  # noqa: E402
from fastmaskformer.data.targets import instance_target  # noqa: E402


def _cfg(root):
    cfg = fmf.get_config("mask2former-coco-instance-r50")
    cfg.data.root = str(root)
    cfg.data.crop_size, cfg.data.min_size_test, cfg.data.max_size_test = (64, 64), H, 1333
    return cfg


def test_metadata_is_the_80_coco_things_in_id_order():
    meta = get_metadata("coco-instance")
    assert meta.num_classes == 80 and all(meta.isthing)
    assert list(meta.dataset_ids) == sorted(meta.dataset_ids) and meta.dataset_ids[:3] == (1, 2, 3)
    assert meta.dataset_ids[-1] == 90 and meta.class_names[0] == "person" and meta.class_names[-1] == "toothbrush"
    assert meta.category_map[18] == 16  # dog


def test_loader_values(tmp_path):
    root = make_coco_instance(tmp_path)
    cfg = _cfg(root)
    identity = lambda image, seg, rng: (image, seg)  # noqa: E731
    train = build_dataset(cfg.data, "train", train=True, augment=identity)
    assert len(train) == 1  # image 2 has only a crowd annotation: FILTER_EMPTY_ANNOTATIONS
    val = build_dataset(cfg.data, "val", train=False, augment=identity)
    assert len(val) == 2 and [r["image_id"] for r in val.records] == [1, 2]

    item = train[(0, 0)]
    target = item["target"]
    # kept, in annotation order: person, car, dog, toothbrush (crowd and the 4-coordinate polygon dropped)
    assert target.labels.tolist() == [0, 2, 16, 79]
    seg = target.segment_map.numpy()
    assert seg.shape == (H, W) and item["image"].shape == (3, H, W) and item["image_id"] == 1

    def poly(*polys):
        return mask_util.decode(mask_util.merge(mask_util.frPyObjects([list(p) for p in polys], H, W))).astype(bool)

    person = poly([10, 5, 30, 5, 30, 25, 10, 25])
    car = poly([35, 5, 45, 5, 45, 15, 35, 15], [47, 20, 55, 20, 55, 28, 47, 28])
    dog = poly([15, 10, 20, 10, 20, 15, 15, 15])
    brush = np.zeros((H, W), bool)
    brush[2:6, 50:56] = True
    expected = np.full((H, W), -1)
    for k, m in sorted(enumerate([person, car, dog, brush]), key=lambda km: -km[1].sum()):
        expected[m] = k  # larger first: the dog (inside the person) stays whole
    np.testing.assert_array_equal(seg, expected)
    # by hand: pixel centres inside the polygons, the crowd region belongs to no segment
    assert seg[10, 12] == 0 and seg[12, 17] == 2 and seg[8, 40] == 1 and seg[24, 50] == 1 and seg[3, 52] == 3
    assert (seg[crowd_mask()] == -1).all() and seg[0, 0] == -1 and (seg == 2).sum() == dog.sum() > 0


def test_augmentation_drops_cropped_away_instances():
    ids = np.zeros((4, 5), np.int32)
    ids[0, 0], ids[3, 4] = 1, 3  # instance 2 (k=1) has no pixel left
    target = instance_target(ids, np.array([7, 8, 9]))
    assert target.labels.tolist() == [7, 9]
    assert target.segment_map[0, 0] == 0 and target.segment_map[3, 4] == 1 and (target.segment_map >= 0).sum() == 2
    empty = instance_target(np.zeros((2, 2), np.int32), np.zeros(0, np.int64))
    assert empty.labels.numel() == 0 and bool((empty.segment_map == -1).all())


def test_lsj_training_items(tmp_path):
    cfg = _cfg(make_coco_instance(tmp_path))
    train = build_dataset(cfg.data, "train", train=True)
    for seed in range(3):
        item = train[(0, seed)]
        assert item["image"].shape == (3, 64, 64) and item["target"].segment_map.shape == (64, 64)
        seg, labels = item["target"].segment_map, item["target"].labels
        assert set(torch.unique(seg).tolist()) <= set(range(-1, labels.numel()))
        assert all(int((seg == k).sum()) > 0 for k in range(labels.numel()))  # no empty instance


def test_layout_errors_are_one_line(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(DatasetError, match="instances_val2017.json not found"):
        build_dataset(cfg.data, "val", train=False)
    root = make_coco_instance(tmp_path)
    (root / "coco/annotations/instances_val2017.json").write_text('{"images": [{"id": 1}], "annotations": [')
    with pytest.raises(DatasetError, match="malformed"):
        build_dataset(cfg.data, "val", train=False)


def test_decode_segmentation_formats():
    from coco_instance_tiny import _rle_uncompressed

    from fastmaskformer.data.datasets import decode_segmentation

    mask = crowd_mask()
    np.testing.assert_array_equal(decode_segmentation(_rle_uncompressed(mask), H, W), mask)  # uncompressed RLE
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    np.testing.assert_array_equal(decode_segmentation(dict(rle, counts=rle["counts"].decode()), H, W), mask)
    np.testing.assert_array_equal(decode_segmentation(rle, H, W), mask)  # counts as bytes
    two = decode_segmentation([[0, 0, 4, 0, 4, 4, 0, 4], [10, 10, 14, 10, 14, 14, 10, 14]], H, W)
    assert two[1, 1] and two[11, 11] and not two[7, 7] and two.sum() == 32  # polygons unioned
    with pytest.raises(DatasetError, match="does not fit"):
        decode_segmentation(_rle_uncompressed(mask), H + 1, W)
