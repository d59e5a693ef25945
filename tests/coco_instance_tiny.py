"""A tiny COCO-instance dataset in the released layout (``coco/annotations/instances_*.json`` +
``coco/{train,val}2017/*.jpg``), shared by the instance data, evaluation and engine tests.
Not a test module."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 40, 60


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths starting with a 0-run), written here from
    the format's definition."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def crowd_mask() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[30:38, 40:58] = True
    return m


def annotations(image_id: int, start_id: int) -> list:
    """Image 1: a person (rectangle polygon), a car of two polygons, a dog polygon on top of the
    person, a crowd of people (uncompressed RLE), a polygon with 4 coordinates only (invalid:
    skipped) and a toothbrush as a compressed RLE string (written by pycocotools)."""
    from pycocotools import mask as mask_util

    brush = np.zeros((H, W), np.uint8)
    brush[2:6, 50:56] = 1
    brush_rle = mask_util.encode(np.asfortranarray(brush))
    brush_rle["counts"] = brush_rle["counts"].decode()
    anns = [
        {"category_id": 1, "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]], "area": 400.0},
        {"category_id": 3, "iscrowd": 0, "segmentation": [[35, 5, 45, 5, 45, 15, 35, 15],
                                                          [47, 20, 55, 20, 55, 28, 47, 28]], "area": 164.0},
        {"category_id": 18, "iscrowd": 0, "segmentation": [[15, 10, 20, 10, 20, 15, 15, 15]], "area": 25.0},
        {"category_id": 1, "iscrowd": 1, "segmentation": _rle_uncompressed(crowd_mask()), "area": 144.0},
        {"category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 5, 5]], "area": 0.0},
        {"category_id": 90, "iscrowd": 0, "segmentation": brush_rle, "area": 24.0},
    ]
    for i, a in enumerate(anns):
        a.update(id=start_id + i, image_id=image_id, bbox=[0, 0, 1, 1])
    return anns


def make_coco_instance(root: Path, splits=("train", "val")) -> Path:
    """Two images per split: image 1 as in :func:`annotations`, image 2 with only the crowd."""
    root = Path(root)
    categories = json.loads((Path(__file__).resolve().parents[1] / "fastmaskformer/data/metadata/coco-instance-80.json")
                            .read_text())["classes"]
    rng = np.random.default_rng(0)
    for split in splits:
        folder = root / "coco" / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for image_id in (1, 2):
            name = f"{image_id:012d}.jpg"
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(folder / name)
            images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        anns = annotations(1, 1)
        crowd = dict(anns[3], id=100, image_id=2)
        data = {"images": images, "annotations": anns + [crowd],
                "categories": [{"id": c["id"], "name": c["name"], "supercategory": ""} for c in categories]}
        (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "coco" / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root
