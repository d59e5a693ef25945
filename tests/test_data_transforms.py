"""Augmentation: geometry moves image and segment map together, determinism, official
parameters of each step."""
import numpy as np
import pytest
import torch

from fastmaskformer import Target
from fastmaskformer.data import transforms as T
from fastmaskformer.data.targets import panoptic_target, semantic_target


def _coord_sample(h=40, w=60):
    """Image whose R/G channels hold x/y and a seg map holding y * w + x (every pixel unique)."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx, yy, np.full_like(xx, 7)], -1).astype(np.uint8)
    return image, (yy * w + xx).astype(np.int64)


def _check_aligned(image, seg, w, ignore, tol):
    valid = seg != ignore
    assert valid.any()
    x_img, y_img = image[..., 0][valid].astype(int), image[..., 1][valid].astype(int)
    x_seg, y_seg = seg[valid] % w, seg[valid] // w
    assert np.abs(x_img - x_seg).max() <= tol and np.abs(y_img - y_seg).max() <= tol


@pytest.mark.parametrize("seed", range(6))
def test_semantic_pipeline_geometry_exact_without_resize(seed):
    image, seg = _coord_sample()
    pipe = T.Compose([T.RandomCrop((32, 32)), T.RandomFlip(0.5), T.PadTo((48, 48), 128, -1)])
    out_img, out_seg = pipe(image, seg, np.random.default_rng(seed))
    assert out_img.shape == (48, 48, 3) and out_seg.shape == (48, 48)
    _check_aligned(out_img, out_seg, 60, -1, tol=0)
    assert (out_img[32:, :] == 128).all() and (out_seg[32:, :] == -1).all()  # padding


@pytest.mark.parametrize("seed", range(6))
def test_semantic_pipeline_geometry_with_resize(seed):
    image, seg = _coord_sample()
    pipe = T.semantic_train_augmentation((32, 32), (20, 40, 80), 2048, ignore_label=-1, color_jitter=False)
    rng = np.random.default_rng(seed)
    out_img, out_seg = pipe(image, seg, rng)
    assert out_img.shape == (32, 32, 3)
    # bilinear image vs nearest labels differ by at most one source pixel (upsampling and
    # PIL's antialiased downsampling share the pixel-centre convention)
    _check_aligned(out_img, out_seg, 60, -1, tol=1.01)


def test_panoptic_pipeline_geometry_and_sizes():
    image, seg = _coord_sample(100, 150)
    pipe = T.panoptic_train_augmentation(short_edges=(60, 80), max_size=200, crop_short_edges=(90,), crop_range=(40, 70))
    shapes = set()
    for seed in range(20):
        out_img, out_seg = pipe(image, seg, np.random.default_rng(seed))
        assert out_img.shape[:2] == out_seg.shape
        assert min(out_img.shape[:2]) in (60, 80) and max(out_img.shape[:2]) <= 200
        _check_aligned(out_img, out_seg, 150, -1, tol=2.01)
        shapes.add(out_img.shape)
    assert len(shapes) > 2  # both branches (plain resize / crop + resize) are taken


def test_deterministic_given_seed():
    rng0 = np.random.default_rng(0)
    image = rng0.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    seg = rng0.integers(0, 5, (50, 70))
    pipe = T.semantic_train_augmentation((32, 32), (30, 50, 70), 2048, 255, single_category_max_area=0.75)
    a = pipe(image, seg, np.random.default_rng(123))
    b = pipe(image, seg, np.random.default_rng(123))
    c = pipe(image, seg, np.random.default_rng(124))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_shortest_edge_size_matches_detectron2_rule():
    assert T.shortest_edge_size(480, 640, 512, 2048) == (512, 683)
    assert T.shortest_edge_size(100, 1000, 512, 2048) == (205, 2048)  # capped by max size
    assert T.short_edges_train(512, [x * 0.1 for x in range(5, 21)])[:3] == (256, 307, 358)
    assert T.short_edges_train(512, [x * 0.1 for x in range(5, 21)])[-1] == 1024


def test_resize_shortest_edge_draws_every_choice():
    image, seg = _coord_sample(30, 40)
    t = T.ResizeShortestEdge((10, 20, 30), 1000)
    rng = np.random.default_rng(0)
    seen = {min(t(image, seg, rng)[0].shape[:2]) for _ in range(60)}
    assert seen == {10, 20, 30}


def test_category_area_constraint_rejects_dominated_crops():
    seg = np.zeros((100, 100), np.int64)
    seg[:, 90:] = 1  # class 1 only in a thin strip: most 20x20 crops are one class
    image = np.zeros((100, 100, 3), np.uint8)
    crop = T.RandomCrop((20, 20), single_category_max_area=0.9, ignore_label=255)
    rng = np.random.default_rng(0)
    mixed = sum(len(np.unique(crop(image, seg, rng)[1])) > 1 for _ in range(50))
    plain = T.RandomCrop((20, 20))
    mixed_plain = sum(len(np.unique(plain(image, seg, rng)[1])) > 1 for _ in range(50))
    assert mixed > mixed_plain + 10


def test_crop_clips_to_small_images_and_range_crop_bounds():
    image, seg = _coord_sample(10, 12)
    out_img, out_seg = T.RandomCrop((32, 32))(image, seg, np.random.default_rng(0))
    assert out_img.shape[:2] == (10, 12)
    image, seg = _coord_sample(100, 120)
    for s in range(10):
        out_img, _ = T.RandomCropRange(30, 50)(image, seg, np.random.default_rng(s))
        assert 30 <= out_img.shape[0] <= 50 and 30 <= out_img.shape[1] <= 50


def test_hue_and_saturation_are_hsv_edits():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.abs(T.shift_hue(image, 360.0).astype(int) - image).max() <= 1
    assert np.abs(T.shift_hue(T.shift_hue(image, 36.0), -36.0).astype(int) - image).max() <= 2
    assert np.array_equal(T.scale_saturation(image, 1.0), image)
    px = np.array([[[255, 0, 0], [200, 100, 100], [128, 128, 128]]], np.uint8)
    assert T.shift_hue(px, 120.0)[0, 0].tolist() == [0, 255, 0]  # red -> green
    assert T.shift_hue(px, -120.0)[0, 0].tolist() == [0, 0, 255]  # red -> blue
    assert T.shift_hue(px, 77.0)[0, 2].tolist() == [128, 128, 128]  # grey has no hue
    assert T.scale_saturation(px, 0.5)[0, 1].tolist() == [200, 150, 150]  # S 0.5 -> 0.25, V kept
    assert T.scale_saturation(px, 1.5)[0, 1].tolist() == [200, 50, 50]
    assert T.scale_saturation(px, 1.5)[0, 0].tolist() == [255, 0, 0]  # S clipped at 1


def test_color_jitter_keeps_seg_and_changes_image_within_official_bounds():
    rng = np.random.default_rng(1)
    image = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
    seg = rng.integers(0, 3, (32, 32))
    jitter = T.ColorJitterSSD()
    changed = 0
    for s in range(20):
        out, out_seg = jitter(image, seg, np.random.default_rng(s))
        assert out.dtype == np.uint8 and out.shape == image.shape and out_seg is seg
        changed += not np.array_equal(out, image)
    assert changed >= 15  # 4 steps at p 0.5: P(no change) = 1/16


def test_brightness_only_shifts_by_at_most_32():
    image = np.full((8, 8, 3), 100, np.uint8)
    for s in range(30):
        out = T._convert(image, beta=np.random.default_rng(s).uniform(-32, 32))
        assert 68 <= int(out.min()) and int(out.max()) <= 132


def test_build_augmentation_from_config():
    import fastmaskformer as fmf

    cfg = fmf.get_config("ade20k-150-r50")
    train = T.build_augmentation(cfg.data, True, 255)
    assert [type(t).__name__ for t in train.transforms] == [
        "ResizeShortestEdge", "RandomCrop", "ColorJitterSSD", "RandomFlip", "PadTo"]
    assert train.transforms[0].short_edges[0] == 256 and train.transforms[0].max_size == 2048
    test = T.build_augmentation(cfg.data, False, 255)
    assert test.transforms[0].short_edges == (512,)
    pan = T.build_augmentation(fmf.get_config("coco-panoptic-r50").data, True, 255)
    assert type(pan.transforms[0]).__name__ == "RandomFlip"
    # official ADE20K panoptic: the semantic pipeline at 640 crops, shortest edges 320..1280, max 2560
    ade_pan = T.build_augmentation(fmf.get_config("ade20k-panoptic-r50").data, True, 255)
    assert type(ade_pan.transforms[1]).__name__ == "RandomCrop"
    assert ade_pan.transforms[0].short_edges[0] == 320 and ade_pan.transforms[0].max_size == 2560
    cfg.data.augmentation = "mosaic"
    with pytest.raises(ValueError, match="must be 'semantic', 'detr', 'lsj' or 'eomt'"):
        T.build_augmentation(cfg.data, True, 255)


# ------------------------------------------------------------------ targets after augmentation

@pytest.mark.parametrize("seed", range(4))
def test_fast_targets_equal_reference_constructors(seed):
    rng = np.random.default_rng(seed)
    label = rng.choice(np.array([0, 3, 7, 149, 255]), size=(20, 30))
    fast, ref = semantic_target(label, 255), Target.from_semantic(label, 255)
    assert torch.equal(fast.labels, ref.labels) and torch.equal(fast.segment_map, ref.segment_map)
    big_ignore = np.where(label == 255, 65535, label)
    assert torch.equal(semantic_target(big_ignore, 65535).segment_map, ref.segment_map)
    ids = rng.choice(np.array([0, 5, 70000, 300, 12, 99]), size=(20, 30))
    infos = [{"id": 300, "category_id": 2, "iscrowd": 0}, {"id": 12, "category_id": 1, "iscrowd": 1},
             {"id": 70000, "category_id": 1}, {"id": 4242, "category_id": 3, "iscrowd": 0},  # absent
             {"id": 5, "category_id": 3, "iscrowd": 0}]
    cmap = {1: 0, 2: 1, 3: 2}
    fast, ref = panoptic_target(ids, infos, cmap), Target.from_panoptic(ids, infos, cmap)
    assert torch.equal(fast.labels, ref.labels) and torch.equal(fast.segment_map, ref.segment_map)
    empty = panoptic_target(ids, [infos[1]], cmap)
    assert empty.num_segments == 0 and (empty.segment_map == -1).all()
