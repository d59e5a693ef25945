"""Samplers, collate, pad_images and the loader builders on synthetic data."""
import pytest
import torch

import fastmaskformer as fmf
from fastmaskformer import Target
from fastmaskformer.data import (
    InferenceSampler,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    collate,
    pad_images,
    synthetic,
)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("syn"), num_train=8, num_val=3, size=48, seed=0)
    cfg = fmf.get_config("ade20k-150-r50")
    cfg.data.dataset, cfg.data.root = "synthetic-semantic", str(root)
    cfg.data.crop_size = (32, 32)
    cfg.data.min_size_test, cfg.data.max_size_test = 40, 100
    cfg.solver.batch_size = 4
    return cfg


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_loader_batches(cfg):
    (batch,) = _batches(build_train_loader(cfg, num_workers=0), 1)
    assert set(batch) == {"images", "targets", "file_names", "image_ids", "heights", "widths"}
    assert len(batch["images"]) == 4
    for image, target in zip(batch["images"], batch["targets"]):
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert isinstance(target, Target) and target.image_size == (32, 32)


def test_train_loader_reproducible_and_independent_of_num_workers(cfg):
    a = _batches(build_train_loader(cfg, num_workers=0, seed=5), 3)  # 12 samples: crosses an epoch
    b = _batches(build_train_loader(cfg, num_workers=2, seed=5), 3)
    c = _batches(build_train_loader(cfg, num_workers=0, seed=6), 3)
    flat = lambda bs: [im for b in bs for im in b["images"]]
    assert all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))
    assert [t.labels.tolist() for b in a for t in b["targets"]] == [t.labels.tolist() for b in b for t in b["targets"]]
    assert not all(torch.equal(x, y) for x, y in zip(flat(a), flat(c)))


def test_test_loader_keeps_ground_truth_in_order(cfg):
    loader = build_test_loader(cfg, num_workers=0)
    batches = list(loader)
    assert [b["image_ids"][0] for b in batches] == ["syn_000000", "syn_000001", "syn_000002"]
    b = batches[0]
    assert b["sem_segs"][0].shape == (48, 48) and b["images"][0].shape == (3, 40, 40)


def test_training_sampler_epochs_and_sharding():
    s = TrainingSampler(10, seed=1, infinite=False)
    e0 = list(s)
    assert sorted(i for i, _ in e0) == list(range(10))
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e0] != [i for i, _ in e1]
    assert len({seed for _, seed in e0 + e1}) == 20  # fresh augmentation seed per sample
    shards = [list(TrainingSampler(10, seed=1, infinite=False, rank=r, world_size=3)) for r in range(3)]
    assert all(len(sh) == 4 for sh in shards)  # ceil(10 / 3), wrapping like DistributedSampler
    union = sorted(p for sh in shards for p in sh)
    assert set(i for i, _ in union) == set(range(10))
    inf = iter(TrainingSampler(10, seed=1))
    stream = [next(inf) for _ in range(20)]
    assert stream[:10] == e0 and stream[10:] == e1
    with pytest.raises(ValueError, match="rank"):
        TrainingSampler(10, rank=2, world_size=2)


def test_inference_sampler_shards_cover_dataset():
    shards = [list(InferenceSampler(10, r, 4)) for r in range(4)]
    assert sum(shards, []) == list(range(10))


def test_collate_and_pad_images():
    items = [
        {"image": torch.full((3, 5, 7), 9, dtype=torch.uint8), "target": Target(torch.tensor([1]), torch.zeros(5, 7, dtype=torch.int32)),
         "file_name": "a", "image_id": 1, "height": 5, "width": 7},
        {"image": torch.full((3, 33, 2), 4, dtype=torch.uint8), "target": Target(torch.tensor([], dtype=torch.int64), torch.full((33, 2), -1)),
         "file_name": "b", "image_id": 2, "height": 33, "width": 2},
    ]
    batch = collate(items)
    assert batch["file_names"] == ["a", "b"] and batch["image_ids"] == [1, 2] and batch["heights"] == [5, 33]
    padded, sizes = pad_images(batch["images"], 32, pad_value=0)
    assert padded.shape == (2, 3, 64, 32) and padded.dtype == torch.uint8
    assert sizes == [(5, 7), (33, 2)]
    assert (padded[0, :, :5, :7] == 9).all() and (padded[0, :, 5:] == 0).all() and (padded[0, :, :, 7:] == 0).all()
    assert pad_images([torch.zeros(3, 5, 7)], 1)[0].shape == (1, 3, 5, 7)
    # size_divisibility 0 (official COCO panoptic): the largest image, not rounded up
    unpadded, _ = pad_images(batch["images"], 0)
    assert unpadded.shape == (2, 3, 33, 7) and torch.equal(unpadded, padded[:, :, :33, :7])
    with pytest.raises(ValueError, match="size_divisibility must be >= 0"):
        pad_images(batch["images"], -32)
