"""The synthetic dataset generator: determinism, content, speed, and reading it back in both
layouts through the registry."""
import hashlib
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

import fastmaskformer as fmf
from fastmaskformer.data import build_dataset, get_metadata, synthetic


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("syn"), num_train=12, num_val=4, size=64, seed=3)


def test_deterministic_given_seed(tmp_path):
    a = synthetic.generate(tmp_path / "a", 3, 2, size=(40, 56), seed=1)
    b = synthetic.generate(tmp_path / "b", 3, 2, size=(40, 56), seed=1)
    c = synthetic.generate(tmp_path / "c", 3, 2, size=(40, 56), seed=2)
    assert _digest(a) == _digest(b) != _digest(c)
    # an image does not depend on how many others are generated
    d = synthetic.generate(tmp_path / "d", 5, 1, size=(40, 56), seed=1)
    rel = "ADEChallengeData2016/images/training/syn_000002.png"
    assert (a / rel).read_bytes() == (d / rel).read_bytes()


def test_fast(tmp_path):
    start = time.perf_counter()
    synthetic.generate(tmp_path, 32, 8, size=128, seed=0)
    assert time.perf_counter() - start < 2.0


def test_content_semantic_and_panoptic_agree(syn_root):
    meta = get_metadata("synthetic-panoptic", syn_root)
    assert 12 <= meta.num_classes <= 20 and 0 < len(meta.thing_classes) < meta.num_classes
    assert len(set(meta.colors)) == meta.num_classes
    data = json.loads((syn_root / "coco/panoptic_train2017.json").read_text())
    repeated = crowd = ignore = 0
    for ann in data["annotations"]:
        stem = ann["file_name"]
        ids = np.asarray(Image.open(syn_root / "coco/panoptic_train2017" / stem)).astype(np.int64)
        ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        sem = np.asarray(Image.open(syn_root / "ADEChallengeData2016/annotations/training" / stem))
        infos = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids)) - {0} == set(infos)
        for seg_id, s in infos.items():
            mask = ids == seg_id
            assert s["area"] == int(mask.sum())
            assert (sem[mask] == meta.category_map[s["category_id"]] + 1).all()  # ADE encoding
        assert ((ids == 0) == (sem == 0)).all()  # void == ignore
        things = [s["category_id"] for s in infos.values() if meta.isthing[meta.category_map[s["category_id"]]]]
        repeated += len(things) > len(set(things))
        crowd += any(s["iscrowd"] for s in infos.values())
        ignore += bool((ids == 0).any())
    assert repeated >= 6  # several instances of one class in most images
    assert crowd >= 1 and ignore >= 2


def test_registry_reads_both_layouts(syn_root):
    cfg = fmf.get_config("ade20k-150-r50")
    cfg.data.root = str(syn_root)
    cfg.data.crop_size = (48, 48)
    cfg.data.dataset = "synthetic-semantic"
    sem = build_dataset(cfg.data, "training", train=True)
    assert len(sem) == 12
    item = sem[(0, 0)]
    assert item["image"].shape == (3, 48, 48)
    assert int(item["target"].labels.max()) < 16
    cfg.data.dataset = "synthetic-panoptic"
    pan = build_dataset(cfg.data, "val", train=False)
    assert len(pan) == 4
    item = pan[0]
    assert torch.is_tensor(item["pan_seg"]) and item["target"].num_segments >= 2


def test_classes_are_separable_by_colour(syn_root):
    # a nearest-mean-colour classifier is far above chance: the data is learnable
    meta = get_metadata("synthetic-semantic", syn_root)
    feats, labels = [], []
    for p in sorted((syn_root / "ADEChallengeData2016/images/training").glob("*.png")):
        img = np.asarray(Image.open(p)).reshape(-1, 3).astype(np.float32)
        sem = np.asarray(Image.open(syn_root / "ADEChallengeData2016/annotations/training" / p.name)).reshape(-1)
        keep = sem > 0
        feats.append(img[keep]), labels.append(sem[keep].astype(np.int64) - 1)
    x, y = np.concatenate(feats), np.concatenate(labels)
    means = np.stack([x[y == k].mean(0) if (y == k).any() else np.full(3, 1e6) for k in range(meta.num_classes)])
    pred = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == y).mean() > 0.6
