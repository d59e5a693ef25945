"""Cityscapes train-id label maps as cityscapesScripts' ``createTrainIdLabelImgs.py`` writes them.

Input (``SRC/cityscapes/``): ``gtFine/{train,val,test}/<city>/*_gtFine_polygons.json`` (and
``gtCoarse/...`` if present, as the official script) plus ``leftImg8bit/`` for the loader.
Output (``ROOT/cityscapes/``): ``<same folder>/*_gtFine_labelTrainIds.png`` beside each polygon
file: an 8-bit map filled with 255 ("unlabeled"), then every polygon drawn in file order with
PIL's ``ImageDraw.polygon`` in its class's train id (deleted objects and classes with a negative
id skipped; "<class>group" falls back to "<class>").
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from ._common import PrepareError, link_tree, require, run_parallel, save_pil

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
    return sorted({out / t[1].relative_to(out).parts[0] for t in tasks})
