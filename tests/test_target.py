import numpy as np
import pytest
import torch

import fastmaskformer as fmf
from fastmaskformer.target import pad_segment_maps, validate_targets


def test_from_masks_round_trip():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, 2:, :3] = True
    masks[2, 4, 5] = True
    t = fmf.Target.from_masks([7, 1, 7], masks)
    assert t.labels.tolist() == [7, 1, 7]
    assert t.segment_map.dtype == torch.int32
    assert torch.equal(t.to_masks(), masks)
    assert int((t.segment_map == -1).sum()) == 30 - masks.sum()


def test_from_masks_overlap_is_an_error():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 2:, 2:] = True
    with pytest.raises(ValueError, match=r"overlap.*y=2, x=2.*\[0, 1\]"):
        fmf.Target.from_masks([0, 1], masks)


def test_from_masks_count_mismatch():
    with pytest.raises(ValueError, match="2 labels but 1 masks"):
        fmf.Target.from_masks([0, 1], torch.zeros(1, 3, 3, dtype=torch.bool))


def test_from_semantic_one_segment_per_class_and_ignore():
    label_map = np.array([[3, 3, 255], [0, 3, 9]], dtype=np.uint8)
    t = fmf.Target.from_semantic(label_map, ignore_label=255)
    assert t.labels.tolist() == [0, 3, 9]  # ascending class ids, like the official mapper
    assert t.segment_map.tolist() == [[1, 1, -1], [0, 1, 2]]
    masks = t.to_masks()
    for m, c in enumerate(t.labels.tolist()):
        assert torch.equal(masks[m], torch.from_numpy(label_map == c))


def test_from_semantic_out_of_range_label():
    with pytest.raises(ValueError, match="label value 150 is out of range"):
        fmf.Target.from_semantic(np.array([[1, 150]]), ignore_label=255, num_classes=150)


def test_from_semantic_all_ignore_gives_empty_target():
    t = fmf.Target.from_semantic(np.full((3, 4), 255), ignore_label=255)
    assert t.num_segments == 0 and bool((t.segment_map == -1).all())


def test_from_panoptic_rgb_crowd_and_void():
    ids = np.zeros((4, 4), dtype=np.int64)
    ids[:2] = 300  # R=44, G=1
    ids[2:, :2] = 5
    ids[2:, 2:] = 77  # crowd
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    info = [{"id": 300, "category_id": 21}, {"id": 5, "category_id": 3},
            {"id": 77, "category_id": 3, "iscrowd": 1}, {"id": 9, "category_id": 4}]
    t = fmf.Target.from_panoptic(rgb, info, category_map={21: 1, 3: 0, 4: 2})
    assert t.labels.tolist() == [1, 0, 2]  # crowd dropped; absent segment 9 kept, with no pixels
    assert t.segment_map[:2].eq(0).all() and t.segment_map[2:, :2].eq(1).all()
    assert t.segment_map[2:, 2:].eq(-1).all() and not t.segment_map.eq(2).any()
    assert not t.to_masks()[2].any()
    with pytest.raises(ValueError, match="unknown category_id 21"):
        fmf.Target.from_panoptic(ids, info, category_map={3: 0})


def test_bad_segment_map_and_dtypes():
    with pytest.raises(ValueError, match=r"values must lie in \[-1, 1\)"):
        fmf.Target(torch.tensor([0]), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="integer"):
        fmf.Target(torch.tensor([0.5]), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        fmf.Target(torch.tensor([0]), torch.zeros(2, 2, 2, dtype=torch.int32))


def test_validate_names_image_and_value():
    good = fmf.Target.from_semantic(np.zeros((2, 2)))
    bad = fmf.Target(torch.tensor([0, 12]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"label 12 in image 1 is out of range \[0, 10\)"):
        validate_targets([good, bad], num_classes=10)
    with pytest.raises(ValueError, match=r"label -3 in image 0"):
        validate_targets([fmf.Target(torch.tensor([-3]), torch.tensor([[0]]))], num_classes=10)


def test_pad_segment_maps():
    a = fmf.Target(torch.tensor([4]), torch.zeros(2, 3, dtype=torch.int32))
    b = fmf.Target(torch.tensor([], dtype=torch.int64), -torch.ones(3, 1, dtype=torch.int32))
    padded = pad_segment_maps([a, b])
    assert padded.shape == (2, 3, 3)
    assert padded[0, :2].eq(0).all() and padded[0, 2].eq(-1).all() and padded[1].eq(-1).all()
    with pytest.raises(ValueError, match="larger than the padded size"):
        pad_segment_maps([a], (1, 3))


def test_to_keeps_data_and_validation_without_rechecking():
    t = fmf.Target(torch.tensor([1, 3]), torch.tensor([[0, 1], [-1, 1]], dtype=torch.int32))
    t.validate_labels(4)
    moved = t.to("cpu", non_blocking=True)
    assert torch.equal(moved.labels, t.labels) and torch.equal(moved.segment_map, t.segment_map)
    assert moved._checked_num_classes == 4
    with pytest.raises(ValueError, match="label 3"):
        moved.validate_labels(3)  # a different K is checked again
