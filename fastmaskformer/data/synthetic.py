"""A small, learnable synthetic dataset written in the ADE20K and COCO panoptic layouts.

``generate(root, num_train, num_val)`` renders images of textured shapes ("things", several
instances of a class per image) over textured backgrounds ("stuff") with ignore regions, and
writes them twice::

    root/synthetic_metadata.json                                  (classes, ids, colours)
    root/ADEChallengeData2016/images/{training,validation}/syn_NNNNNN.png
    root/ADEChallengeData2016/annotations/{training,validation}/syn_NNNNNN.png
        uint8, class + 1, 0 = ignore (the ADE20K-150 encoding)
    root/coco/{train,val}2017/syn_NNNNNN.png                      (the same images)
    root/coco/panoptic_{train,val}2017/syn_NNNNNN.png             (RGB-encoded segment ids)
    root/coco/panoptic_{train,val}2017.json                       (COCO panoptic JSON)

Read them back with ``build_dataset`` as ``"synthetic-semantic"`` / ``"synthetic-panoptic"``.
Every class has its own colour *and* texture so that a small model learns them in minutes.
Output is a pure function of ``seed`` (each image draws from its own generator).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .metadata import SYNTHETIC_METADATA

# (name, colour, texture, shape); things get COCO-style ids 1.., stuff ids 101..
THINGS = [
    ("red disc", (220, 40, 40), "solid", "disc"),
    ("green square", (40, 180, 60), "hstripes", "square"),
    ("blue triangle", (40, 70, 220), "checker", "triangle"),
    ("yellow diamond", (230, 210, 40), "vstripes", "diamond"),
    ("magenta ellipse", (200, 50, 200), "dots", "ellipse"),
    ("cyan cross", (40, 200, 210), "dstripes", "cross"),
    ("orange ring", (240, 140, 30), "solid", "ring"),
    ("purple rectangle", (120, 60, 180), "checker", "rectangle"),
    ("white triangle", (235, 235, 235), "hstripes", "triangle"),
    ("brown disc", (140, 90, 40), "noise", "disc"),
]
STUFF = [
    ("sky", (120, 170, 240), "solid"),
    ("grass", (70, 140, 50), "noise"),
    ("water", (30, 80, 140), "waves"),
    ("sand", (210, 190, 140), "dots"),
    ("wall", (150, 150, 150), "bricks"),
    ("road", (70, 70, 70), "dstripes"),
]
NUM_CLASSES = len(THINGS) + len(STUFF)
IGNORE_LABEL = 255
_ID_STRIDE = 4099  # panoptic segment ids k * stride + 1 use the R and G bytes of the PNG


def metadata_dict() -> dict:
    """The synthetic label space in the package metadata schema (things first, then stuff)."""
    classes = [
        {"id": i + 1, "name": n, "isthing": 1, "color": list(c)} for i, (n, c, _, _) in enumerate(THINGS)
    ] + [{"id": 101 + i, "name": n, "isthing": 0, "color": list(c)} for i, (n, c, _) in enumerate(STUFF)]
    return {"name": "synthetic", "ignore_label": IGNORE_LABEL, "classes": classes}


# ----------------------------------------------------------------------------- rendering
def _texture(kind: str, yy, xx, rng) -> np.ndarray:
    """Texture intensity in [0, 1], float32 [H, W]."""
    if kind == "solid":
        return np.ones_like(yy)
    if kind == "hstripes":
        return (yy // 3 % 2).astype(np.float32)
    if kind == "vstripes":
        return (xx // 3 % 2).astype(np.float32)
    if kind == "dstripes":
        return ((xx + yy) // 4 % 2).astype(np.float32)
    if kind == "checker":
        return ((xx // 4 + yy // 4) % 2).astype(np.float32)
    if kind == "dots":
        return (((xx % 6) - 2.5) ** 2 + ((yy % 6) - 2.5) ** 2 > 4).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(yy * 0.8 + 2.0 * np.sin(xx * 0.2))
    if kind == "bricks":
        return ((yy % 8 != 0) & ((xx + 8 * (yy // 8 % 2)) % 16 != 0)).astype(np.float32)
    if kind == "noise":
        return rng.random(yy.shape, dtype=np.float32)
    raise ValueError(kind)


def _shape(kind: str, yy, xx, cy, cx, r) -> np.ndarray:
    """Boolean mask [H, W] of a shape of radius ``r`` centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        return dy**2 + dx**2 <= r**2
    if kind == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
    if kind == "rectangle":
        return (np.abs(dy) <= r * 0.5) & (np.abs(dx) <= r)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if kind == "ellipse":
        return (dy / (0.6 * r)) ** 2 + (dx / r) ** 2 <= 1
    if kind == "cross":
        return ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r))
    if kind == "triangle":
        return (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(kind)


def render(rng: np.random.Generator, size=(128, 128)):
    """One sample.

    Returns ``image`` uint8 [H, W, 3], ``semantic`` uint8 [H, W] (contiguous class, 255 ignore),
    ``ids`` int64 [H, W] panoptic segment ids (0 = void) and ``segments`` (list of
    ``(id, contiguous_class, iscrowd)``).
    """
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), np.float32)
    semantic = np.full((h, w), IGNORE_LABEL, np.uint8)
    ids = np.zeros((h, w), np.int64)
    segments = []

    def paint(mask, cls, colour, texture, crowd=0):
        seg_id = len(segments) * _ID_STRIDE + 1
        shade = 0.55 + 0.45 * _texture(texture, yy, xx, rng)
        image[mask] = (shade[..., None] * np.array(colour, np.float32))[mask]
        semantic[mask] = cls
        ids[mask] = seg_id
        segments.append((seg_id, cls, crowd))

    # stuff: 1-3 bands of distinct classes, cut along y or x
    n_stuff = int(rng.integers(1, 4))
    stuff = rng.choice(len(STUFF), n_stuff, replace=False)
    coord, extent = (yy, h) if rng.random() < 0.5 else (xx, w)
    cuts = np.sort(rng.integers(extent // 5, extent - extent // 5, n_stuff - 1))
    band = np.searchsorted(cuts, coord, side="right")
    for b, s in enumerate(stuff):
        name, colour, texture = STUFF[s]
        paint(band == b, len(THINGS) + int(s), colour, texture)

    # ignore region (void in panoptic): a noisy rectangle
    if rng.random() < 0.4:
        rh, rw = int(rng.integers(h // 10, h // 4)), int(rng.integers(w // 10, w // 4))
        y0, x0 = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
        image[y0:y0 + rh, x0:x0 + rw] = rng.integers(0, 256, (rh, rw, 1)).astype(np.float32)
        semantic[y0:y0 + rh, x0:x0 + rw] = IGNORE_LABEL
        ids[y0:y0 + rh, x0:x0 + rw] = 0

    # things: 2-6 instances drawn from 1-3 classes, so classes repeat within an image
    n_inst = int(rng.integers(2, 7))
    classes = rng.choice(len(THINGS), int(rng.integers(1, 4)), replace=False)
    crowd_at = int(rng.integers(n_inst)) if rng.random() < 0.3 else -1
    r_lo, r_hi = min(h, w) / 12, min(h, w) / 5
    for i in range(n_inst):
        t = int(rng.choice(classes))
        name, colour, texture, shape = THINGS[t]
        r = rng.uniform(r_lo, r_hi)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        paint(_shape(shape, yy, xx, cy, cx, r), t, colour, texture, crowd=int(i == crowd_at))

    noise = rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, semantic, ids, segments


# ----------------------------------------------------------------------------- writing
def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def _segments_info(ids: np.ndarray, segments, meta_ids) -> list:
    """COCO ``segments_info`` for the segments still visible after occlusion."""
    infos = []
    for seg_id, cls, crowd in segments:
        ys, xs = np.nonzero(ids == seg_id)
        if ys.size == 0:
            continue  # fully covered by later shapes
        x0, y0 = int(xs.min()), int(ys.min())
        infos.append({
            "id": int(seg_id),
            "category_id": int(meta_ids[cls]),
            "iscrowd": int(crowd),
            "area": int(ys.size),
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        })
    return infos


def generate(root, num_train: int = 32, num_val: int = 8, size=128, seed: int = 0) -> Path:
    """Write the synthetic dataset under ``root`` (layout in the module docstring).

    ``size``: int or (h, w). Deterministic given ``seed``; returns ``Path(root)``.
    """
    root = Path(root)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    meta = metadata_dict()
    meta_ids = [c["id"] for c in meta["classes"]]
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNTHETIC_METADATA).write_text(json.dumps(meta, indent=1))
    for split_index, (ade_split, coco_split, count) in enumerate(
        [("training", "train2017", num_train), ("validation", "val2017", num_val)]
    ):
        ade = root / "ADEChallengeData2016"
        coco = root / "coco"
        dirs = [
            ade / "images" / ade_split,
            ade / "annotations" / ade_split,
            coco / coco_split,
            coco / f"panoptic_{coco_split}",
        ]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            image, semantic, ids, segments = render(rng, size)
            stem = f"syn_{i:06d}"
            _save_png(image, dirs[0] / f"{stem}.png")
            _save_png((semantic + 1).astype(np.uint8), dirs[1] / f"{stem}.png")  # 255 + 1 -> 0
            _save_png(image, dirs[2] / f"{stem}.png")
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            _save_png(rgb, dirs[3] / f"{stem}.png")
            images.append({"id": i, "file_name": f"{stem}.png", "height": size[0], "width": size[1]})
            annotations.append({
                "image_id": i,
                "file_name": f"{stem}.png",
                "segments_info": _segments_info(ids, segments, meta_ids),
            })
        categories = [dict(c, supercategory=("thing" if c["isthing"] else "stuff")) for c in meta["classes"]]
        with open(coco / f"panoptic_{coco_split}.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root
