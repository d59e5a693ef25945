"""Cityscapes train-id label maps as cityscapesScripts' ``createTrainIdLabelImgs.py`` writes them,
and the COCO-format panoptic ground truth as its ``createPanopticImgs.py`` writes it.

Input (``SRC/cityscapes/``): ``gtFine/{train,val,test}/<city>/*_gtFine_polygons.json`` (and
``gtCoarse/...`` if present, as the official script) plus ``leftImg8bit/`` for the loader.
Output (``ROOT/cityscapes/``): ``<same folder>/*_gtFine_labelTrainIds.png`` beside each polygon
file: an 8-bit map filled with 255 ("unlabeled"), then every polygon drawn in file order with
PIL's ``ImageDraw.polygon`` in its class's train id (deleted objects and classes with a negative
id skipped; "<class>group" falls back to "<class>").

Panoptic (for every split with ``gtFine/<split>/<city>/*_gtFine_instanceIds.png``, the release's
instance maps: value = label id, or label id x 1000 + instance for objects):
``gtFine/cityscapes_panoptic_<split>/<stem>_gtFine_panoptic.png`` (RGB = id % 256, id // 256,
id // 65536 for every segment whose label is evaluated, 0 elsewhere) and
``gtFine/cityscapes_panoptic_<split>.json`` (``json.dump(..., sort_keys=True, indent=4)``):
images ``{"id": <stem>, "width", "height", "file_name": "<stem>_gtFine_leftImg8bit.png"}`` (sic),
annotations ``{"image_id", "file_name", "segments_info": [{"id", "category_id" (label id),
"area", "bbox" [x, y, w, h], "iscrowd"}]}`` with segments in ascending id order, ``iscrowd`` 1
for a thing class's group region (value < 1000); categories: the 19 evaluated labels in label
order ``{"id", "name", "color", "supercategory", "isthing"}`` (the script's defaults: label ids,
not train ids). The JSON is written last, after every PNG: a run that stopped before it
re-reads the instance maps (finished PNGs are kept) and then writes it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._common import PrepareError, _commit, _temporary, link_tree, read_array, require, run_parallel, save_image, save_pil

NAME = "cityscapes"
DOWNLOAD = ("download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from "
            "https://www.cityscapes-dataset.com/downloads/ and unzip them into --src/cityscapes")

# name -> (id, train id) of cityscapesScripts' labels.py
LABELS = {
    "unlabeled": (0, 255), "ego vehicle": (1, 255), "rectification border": (2, 255), "out of roi": (3, 255),
    "static": (4, 255), "dynamic": (5, 255), "ground": (6, 255), "road": (7, 0), "sidewalk": (8, 1),
    "parking": (9, 255), "rail track": (10, 255), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
    "guard rail": (14, 255), "bridge": (15, 255), "tunnel": (16, 255), "pole": (17, 5), "polegroup": (18, 255),
    "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8), "terrain": (22, 9), "sky": (23, 10),
    "person": (24, 11), "rider": (25, 12), "car": (26, 13), "truck": (27, 14), "bus": (28, 15),
    "caravan": (29, 255), "trailer": (30, 255), "train": (31, 16), "motorcycle": (32, 17), "bicycle": (33, 18),
    "license plate": (-1, -1),
}

# label id -> (category, hasInstances, ignoreInEval, color) of cityscapesScripts' labels.py
LABEL_INFO = {
    0: ("void", False, True, (0, 0, 0)), 1: ("void", False, True, (0, 0, 0)), 2: ("void", False, True, (0, 0, 0)),
    3: ("void", False, True, (0, 0, 0)), 4: ("void", False, True, (0, 0, 0)), 5: ("void", False, True, (111, 74, 0)),
    6: ("void", False, True, (81, 0, 81)), 7: ("flat", False, False, (128, 64, 128)),
    8: ("flat", False, False, (244, 35, 232)), 9: ("flat", False, True, (250, 170, 160)),
    10: ("flat", False, True, (230, 150, 140)), 11: ("construction", False, False, (70, 70, 70)),
    12: ("construction", False, False, (102, 102, 156)), 13: ("construction", False, False, (190, 153, 153)),
    14: ("construction", False, True, (180, 165, 180)), 15: ("construction", False, True, (150, 100, 100)),
    16: ("construction", False, True, (150, 120, 90)), 17: ("object", False, False, (153, 153, 153)),
    18: ("object", False, True, (153, 153, 153)), 19: ("object", False, False, (250, 170, 30)),
    20: ("object", False, False, (220, 220, 0)), 21: ("nature", False, False, (107, 142, 35)),
    22: ("nature", False, False, (152, 251, 152)), 23: ("sky", False, False, (70, 130, 180)),
    24: ("human", True, False, (220, 20, 60)), 25: ("human", True, False, (255, 0, 0)),
    26: ("vehicle", True, False, (0, 0, 142)), 27: ("vehicle", True, False, (0, 0, 70)),
    28: ("vehicle", True, False, (0, 60, 100)), 29: ("vehicle", True, True, (0, 0, 90)),
    30: ("vehicle", True, True, (0, 0, 110)), 31: ("vehicle", True, False, (0, 80, 100)),
    32: ("vehicle", True, False, (0, 0, 230)), 33: ("vehicle", True, False, (119, 11, 32)),
    -1: ("vehicle", False, True, (0, 0, 142)),
}
ID_TO_NAME = {label_id: name for name, (label_id, _) in LABELS.items()}
PANOPTIC_SPLITS = ("val", "train", "test")  # createPanopticImgs' default set names, in its order


def panoptic_categories() -> list:
    """The JSON's ``categories``: evaluated labels in labels.py order, with their label ids."""
    return [{"id": label_id, "name": name, "color": list(LABEL_INFO[label_id][3]),
             "supercategory": LABEL_INFO[label_id][0], "isthing": 1 if LABEL_INFO[label_id][1] else 0}
            for name, (label_id, _) in LABELS.items() if not LABEL_INFO[label_id][2]]


def label_image(polygons: Path) -> Image.Image:
    """The train-id map of one ``*_polygons.json``."""
    try:
        with open(polygons) as f:
            ann = json.load(f)
        size = (int(ann["imgWidth"]), int(ann["imgHeight"]))
        objects = ann["objects"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrepareError(f"{polygons} is not a Cityscapes polygon file: {exc!r}") from exc
    image = Image.new("L", size, LABELS["unlabeled"][1])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        label = str(obj.get("label"))
        if obj.get("deleted", 0):
            continue
        if label not in LABELS and label.endswith("group"):
            label = label[: -len("group")]
        if label not in LABELS:
            raise PrepareError(f"{polygons}: unknown label {label!r}")
        label_id, train_id = LABELS[label]
        if label_id < 0:
            continue
        try:
            draw.polygon([(p[0], p[1]) for p in obj["polygon"]], fill=train_id)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PrepareError(f"{polygons}: cannot draw the polygon of a {label!r}: {exc!r}") from exc
    return image


def convert_one(polygons: Path, out: Path) -> None:
    if out.is_file():
        return
    save_pil(label_image(polygons), out, "PNG")


def panoptic_one(instance_png: Path, out_png: Path) -> tuple:
    """Convert one ``*_gtFine_instanceIds.png``: writes ``out_png`` unless it exists and returns
    ``(image entry, annotation)`` of the panoptic JSON."""
    ids_map = read_array(instance_png)
    if ids_map.ndim != 2 or not np.issubdtype(ids_map.dtype, np.integer):
        raise PrepareError(f"{instance_png} is not a single-channel integer instance map (mode {Image.open(instance_png).mode})")
    height, width = ids_map.shape
    name = instance_png.name
    image = {"id": name.replace("_gtFine_instanceIds.png", ""), "width": int(width), "height": int(height),
             "file_name": name.replace("_instanceIds.png", "_leftImg8bit.png")}
    values, inverse = np.unique(ids_map, return_inverse=True)  # ascending, as the official loop
    inverse = inverse.reshape(-1)
    n = values.size
    area = np.bincount(inverse, minlength=n)
    cols = np.tile(np.arange(width), height)
    rows = np.repeat(np.arange(height), width)
    x0, y0 = np.full(n, width), np.full(n, height)
    x1, y1 = np.full(n, -1), np.full(n, -1)
    np.minimum.at(x0, inverse, cols)
    np.maximum.at(x1, inverse, cols)
    np.minimum.at(y0, inverse, rows)
    np.maximum.at(y1, inverse, rows)
    colors = np.zeros((n, 3), np.uint8)
    segments = []
    for k, segment_id in enumerate(int(v) for v in values):
        label_id, crowd = (segment_id, 1) if segment_id < 1000 else (segment_id // 1000, 0)
        if label_id not in LABEL_INFO:
            raise PrepareError(f"{instance_png}: value {segment_id} names no Cityscapes label id ({label_id})")
        _, has_instances, ignore_in_eval, _ = LABEL_INFO[label_id]
        if ignore_in_eval:
            continue
        if not has_instances:
            crowd = 0
        colors[k] = (segment_id % 256, segment_id // 256, segment_id // 256 // 256)
        segments.append({"id": segment_id, "category_id": label_id, "area": int(area[k]),
                         "bbox": [int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)],
                         "iscrowd": crowd})
    annotation = {"image_id": image["id"], "file_name": name.replace("_instanceIds.png", "_panoptic.png"),
                  "segments_info": segments}
    if not out_png.is_file():
        save_image(colors[inverse].reshape(height, width, 3), out_png, "PNG")
    return image, annotation


def _write_panoptic_json(data: dict, final: Path) -> None:
    """``json.dump(data, f, sort_keys=True, indent=4)`` (createPanopticImgs' call), atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, sort_keys=True, indent=4)
    _commit(_temporary(final), final, write)


def prepare_panoptic(base: Path, out: Path, jobs: int, progress: bool) -> list:
    """createPanopticImgs for every split with instance maps; returns the JSON files."""
    written = []
    for split in PANOPTIC_SPLITS:
        files = sorted((base / "gtFine" / split).glob("*/*_instanceIds.png"), key=str)
        if not files:
            continue
        stem = f"cityscapes_panoptic_{split}"
        json_file, folder = out / "gtFine" / f"{stem}.json", out / "gtFine" / stem
        outputs = [folder / f.name.replace("_instanceIds.png", "_panoptic.png") for f in files]
        written.append(json_file)
        if json_file.is_file() and all(p.is_file() for p in outputs):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        results = run_parallel(panoptic_one, list(zip(files, outputs)), jobs, f"cityscapes panoptic {split}", progress)
        _write_panoptic_json({"images": [r[0] for r in results], "annotations": [r[1] for r in results],
                              "categories": panoptic_categories()}, json_file)
    if not written:
        print(f"note: no gtFine/<split>/<city>/*_gtFine_instanceIds.png under {base}: the panoptic ground truth "
              "(cityscapes-panoptic) was not written", file=sys.stderr)
    return written


def prepare(src: Path, root: Path, jobs: int, progress: bool) -> list:
    base = require(src / NAME, "the Cityscapes folder", DOWNLOAD)
    require(base / "gtFine", "the fine annotations", DOWNLOAD)
    require(base / "leftImg8bit", "the images", DOWNLOAD)
    out = root / NAME
    files = sorted((base / "gtFine").glob("*/*/*_gt*_polygons.json"))
    files += sorted((base / "gtCoarse").glob("*/*/*_gt*_polygons.json")) if (base / "gtCoarse").is_dir() else []
    if not files:
        raise PrepareError(f"no */*/*_gtFine_polygons.json under {base / 'gtFine'} ({DOWNLOAD})")
    if out.resolve() != base.resolve():
        link_tree(base / "leftImg8bit", out / "leftImg8bit")
    tasks = [(f, out / f.relative_to(base).parent / f.name.replace("_polygons.json", "_labelTrainIds.png"))
             for f in files]
    run_parallel(convert_one, tasks, jobs, "cityscapes", progress)
    panoptic = prepare_panoptic(base, out, jobs, progress)
    return sorted({out / t[1].relative_to(out).parts[0] for t in tasks}) + panoptic
