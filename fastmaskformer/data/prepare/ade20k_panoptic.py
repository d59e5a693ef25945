"""ADE20K panoptic and instance annotations from SceneParsing's instance release, as
Mask2Former's ``prepare_ade20k_sem_seg.py``, ``prepare_ade20k_pan_seg.py`` and
``prepare_ade20k_ins_seg.py`` write them.

Input (``SRC/ADEChallengeData2016/``): ``images/{training,validation}/*.jpg``,
``annotations/{training,validation}/*.png`` (class 1..150, 0 = other) and
``annotations_instance/{training,validation}/*.png`` (R = instance class 1..100, G = instance
number, 0 = none).
Output (``ROOT/ADEChallengeData2016/``):
- ``annotations_detectron2/{training,validation}/*.png``: class - 1 (uint8, 0 -> 255).
- ``ade20k_panoptic_{train,val}/*.png`` + ``ade20k_panoptic_{train,val}.json``: stuff classes of
  the semantic map first, then every instance pasted over them; segment ids are RGB colours
  (panopticapi's ``IdGenerator``): a stuff segment and a class's first instance take the class
  colour, later instances a colour drawn uniformly within +-30 of it per channel (clipped to
  0..255) until unused. The official script draws those from numpy's unseeded global RNG; we
  draw them the same way from ``RandomState(seed of the image name)``, so a re-run writes the
  same ids.
- ``ade20k_instance_{train,val}.json``: COCO instances (RLE masks, ``id`` counting from 1 per
  split, category ids = semantic class - 1).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from ._common import (PrepareError, ade20k_tables, link_tree, read_array, require, run_parallel, save_image,
                      write_json)

NAME = "ADEChallengeData2016"
SPLITS = (("train", "training"), ("val", "validation"))
DOWNLOAD_SCENE = "download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it into --src"
DOWNLOAD_INSTANCE = ("download annotations_instance.tar from http://sceneparsing.csail.mit.edu/ "
                     "(data/ChallengeData2017) and untar it into --src/ADEChallengeData2016")
WORK = ".fastmaskformer_prepare"  # per-image records while a split is in progress


# ----------------------------------------------------------------------------- tables
def categories() -> list:
    """The 150 panoptic categories as the official JSON lists them."""
    tables = ade20k_tables()
    things = {sem - 1 for _, sem, _ in tables["instance_100"]}
    return [{"name": name, "id": k, "isthing": int(k in things), "color": color}
            for k, (name, color) in enumerate(tables["panoptic_150"])]


def instance_to_semantic() -> dict:
    """instance class (1..100) -> contiguous semantic class (0..149)."""
    return {ins: sem - 1 for ins, sem, _ in ade20k_tables()["instance_100"]}


def instance_categories() -> list:
    return [{"id": sem - 1, "name": name} for _, sem, name in ade20k_tables()["instance_100"]]


# ----------------------------------------------------------------------------- colours, RLE, boxes
class ColourIds:
    """panopticapi's ``IdGenerator`` with the random colours from ``rng``."""

    def __init__(self, cats: dict, rng: np.random.RandomState):
        self.cats = cats
        self.rng = rng
        self.taken = {0}  # as the original: set([0, 0, 0]) holds the integer 0, not black
        self.taken.update(tuple(c["color"]) for c in cats.values() if c["isthing"] == 0)

    def colour(self, cat_id: int) -> tuple:
        cat = self.cats[cat_id]
        base = tuple(cat["color"])
        if cat["isthing"] == 0:
            return base
        if base not in self.taken:
            self.taken.add(base)
            return base
        while True:
            jitter = np.asarray(cat["color"]) + self.rng.randint(low=-30, high=31, size=3)
            colour = tuple(int(v) for v in np.clip(jitter, 0, 255))
            if colour not in self.taken:
                self.taken.add(colour)
                return colour


def segment_id(colour) -> int:
    return int(colour[0]) + 256 * int(colour[1]) + 65536 * int(colour[2])


def bbox(mask: np.ndarray) -> list:
    """[x, y, w, h] of a non-empty boolean mask."""
    cols = np.nonzero(mask.any(axis=0))[0]
    rows = np.nonzero(mask.any(axis=1))[0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of a boolean ``[H, W]`` mask, as ``pycocotools.mask.encode`` + ``.decode()``:
    run lengths over the column-major pixels starting with a (possibly empty) run of zeros,
    each written as 5-bit groups (sign-extended; from the third on, as the difference to the
    run two before), low group first, 0x20 = more follows, offset by 48 into printable ASCII."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(chars)}


# ----------------------------------------------------------------------------- per image
def _check_pair(a: np.ndarray, b: np.ndarray, pa: Path, pb: Path) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise PrepareError(f"{pb} is {b.shape[1]}x{b.shape[0]} but {pa} is {a.shape[1]}x{a.shape[0]}")


def _instances(ins_seg: np.ndarray, path: Path, ins_to_sem: dict, offset: int):
    """(instance number, mask, semantic class) for every instance, in increasing number."""
    cat_ids, numbers = ins_seg[..., 0], ins_seg[..., 1]
    for number in np.unique(numbers):
        if number == 0:
            continue
        mask = numbers == number
        cls = np.unique(cat_ids[mask])
        if len(cls) != 1:
            raise PrepareError(f"{path}: instance {int(number)} has several classes {cls.tolist()}")
        ins_class = int(cls[0]) + offset
        if ins_class not in ins_to_sem:
            raise PrepareError(f"{path}: instance {int(number)} has class {int(cls[0])}, not an instance class 1..100")
        yield int(number), mask, ins_to_sem[ins_class]


def convert_image(image: Path, semantic: Path, instance: Path, out_sem: Path, out_pan: Path, record: Path) -> dict:
    """One image -> its semantic PNG, panoptic PNG and a record of its JSON entries (the record
    file lets an interrupted run resume without redoing finished images)."""
    if out_sem.is_file() and out_pan.is_file() and record.is_file():
        with open(record) as f:
            return json.load(f)
    sem = read_array(semantic)
    ins = read_array(instance)
    if sem.dtype != np.uint8 or sem.ndim != 2:
        raise PrepareError(f"{semantic}: expected an 8-bit one-channel class map, got {sem.dtype} {sem.shape}")
    if ins.dtype != np.uint8 or ins.ndim != 3 or ins.shape[2] < 2:
        raise PrepareError(f"{instance}: expected an 8-bit RGB instance map, got {ins.dtype} {ins.shape}")
    picture = read_array(image)
    _check_pair(picture, sem, image, semantic)
    _check_pair(picture, ins, image, instance)
    height, width = int(picture.shape[0]), int(picture.shape[1])
    image_id = image.name.split(".")[0]

    # semantic: class - 1 (uint8 wrap: 0 = other -> 255)
    classes = sem - np.uint8(1)
    if not out_sem.is_file():
        save_image(classes, out_sem, "PNG")

    # panoptic: stuff from the semantic map first, then the instances over it
    cats = {c["id"]: c for c in categories()}
    ids = ColourIds(cats, np.random.RandomState(zlib.crc32(image_id.encode())))
    pan = np.zeros((height, width, 3), np.uint8)
    segments = []
    for cls in np.unique(classes):
        if cls == 255:
            continue
        if int(cls) not in cats:
            raise PrepareError(f"{semantic}: class {int(cls) + 1} is not one of ADE20K's 150")
        if cats[int(cls)]["isthing"]:
            continue
        mask = classes == cls
        colour = ids.colour(int(cls))
        pan[mask] = colour
        segments.append({"id": segment_id(colour), "category_id": int(cls), "area": int(mask.sum()),
                         "bbox": bbox(mask), "iscrowd": 0})
    ins_to_sem = instance_to_semantic()
    instances = []
    for _, mask, cls in _instances(ins, instance, ins_to_sem, 0):
        colour = ids.colour(cls)
        pan[mask] = colour
        segments.append({"id": segment_id(colour), "category_id": int(cls), "area": int(mask.sum()),
                         "bbox": bbox(mask), "iscrowd": 0})
        rle = rle_encode(mask)
        instances.append({"iscrowd": 0, "category_id": int(cls), "bbox": bbox(mask), "segmentation": rle,
                          "area": int(mask.sum())})
    if not out_pan.is_file():
        save_image(pan, out_pan, "PNG")
    entry = {
        "image": {"id": image_id, "file_name": image.name, "width": width, "height": height},
        "annotation": {"image_id": image_id, "file_name": image_id + ".png", "segments_info": segments},
        "instances": instances,
    }
    write_json(entry, record)
    return entry


def prepare(src: Path, root: Path, jobs: int, progress: bool) -> list:
    base = require(src / NAME, "the SceneParsing release folder", DOWNLOAD_SCENE)
    out = root / NAME
    for _, split in SPLITS:
        require(base / "images" / split, "the ADE20K images", DOWNLOAD_SCENE)
        require(base / "annotations" / split, "the ADE20K class maps", DOWNLOAD_SCENE)
        require(base / "annotations_instance" / split, "the ADE20K instance maps", DOWNLOAD_INSTANCE)
    if out.resolve() != base.resolve():  # the loaders read the images and class maps beside the outputs
        for folder in ("images", "annotations"):
            link_tree(base / folder, out / folder)
    written = []
    for name, split in SPLITS:
        pan_json = out / f"ade20k_panoptic_{name}.json"
        ins_json = out / f"ade20k_instance_{name}.json"
        images = sorted(p for p in (base / "images" / split).iterdir() if p.suffix == ".jpg")
        work = out / WORK / name
        tasks, absent = [], []
        for image in images:
            stem = image.name.split(".")[0]
            semantic = base / "annotations" / split / f"{stem}.png"
            instance = base / "annotations_instance" / split / f"{stem}.png"
            absent += [p for p in (semantic, instance) if not p.is_file()]
            tasks.append((image, semantic, instance, out / "annotations_detectron2" / split / f"{stem}.png",
                          out / f"ade20k_panoptic_{name}" / f"{stem}.png", work / f"{stem}.json"))
        if absent:
            raise PrepareError(f"{len(absent)} annotation(s) missing for the images in {base / 'images' / split}, "
                               f"e.g. {absent[0]}")
        if not images:
            raise PrepareError(f"no .jpg images in {base / 'images' / split} ({DOWNLOAD_SCENE})")
        written += [pan_json, out / f"ade20k_panoptic_{name}", ins_json, out / "annotations_detectron2" / split]
        if pan_json.is_file() and ins_json.is_file() and all(t[3].is_file() and t[4].is_file() for t in tasks):
            continue
        work.mkdir(parents=True, exist_ok=True)
        entries = run_parallel(convert_image, tasks, jobs, f"ade20k-panoptic {name}", progress)
        write_json({"images": [e["image"] for e in entries], "annotations": [e["annotation"] for e in entries],
                    "categories": categories()}, pan_json)
        annotations, ann_id = [], 1
        for e in entries:
            for inst in e["instances"]:
                annotations.append({"id": ann_id, "image_id": e["image"]["id"], **inst})
                ann_id += 1
        write_json({"images": [e["image"] for e in entries], "categories": instance_categories(),
                    "annotations": annotations}, ins_json)
        for task in tasks:
            task[5].unlink(missing_ok=True)
        work.rmdir()
    _remove_empty(out / WORK)
    return written


def _remove_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
