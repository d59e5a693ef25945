"""ADE20K-Full (847 classes) from the ``ADE20K_2021_17_01`` release, as MaskFormer's
``datasets/prepare_ade20k_full_sem_seg.py`` writes it.

Input (``SRC/ADE20K_2021_17_01/``): ``index_ade20k.pkl`` (``filename`` and ``folder`` lists,
folders relative to SRC) and per image ``<name>.jpg`` + ``<name>_seg.png``, whose class of a
pixel is ``(R // 10) * 256 + G`` (the release's object index).
Output (``ROOT/ADE20K_2021_17_01/``): ``images_detectron2/{training,validation}/<name>.jpg`` and
``annotations_detectron2/{training,validation}/<name>.tif``: images whose shorter side is over
512 px shrunk to 512 (OpenCV bilinear for the image, nearest for the classes, as the official
script), labels uint16 with the 847 train ids and 65535 for every other object index;
the split is the file name's second word (``ADE_val_*`` -> validation, all else training).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ._common import PrepareError, ade20k_tables, read_array, require, run_parallel, save_image

NAME = "ADE20K_2021_17_01"
DOWNLOAD = "download ADE20K_2021_17_01.zip from https://groups.csail.mit.edu/vision/datasets/ADE20K/ and unzip it into --src"
MAX_SIZE = 512
IGNORE = 65535


def load_index(path: Path) -> dict:
    """The release's ``index_ade20k.pkl`` through the numpy-only unpickler (no code runs)."""
    from ...convert.detectron2 import _PICKLE_GLOBALS

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return _PICKLE_GLOBALS[(module, name)]
            except KeyError:
                raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}") from None

    try:
        with open(path, "rb") as f:
            index = _Unpickler(f, encoding="latin1").load()
        names, folders = list(index["filename"]), list(index["folder"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise PrepareError(f"{path} is not the ADE20K index (a dict with 'filename' and 'folder'): {exc}") from exc
    if len(names) != len(folders):
        raise PrepareError(f"{path}: 'filename' and 'folder' differ in length ({len(names)} vs {len(folders)})")
    return {"filename": [str(n) for n in names], "folder": [str(f) for f in folders]}


def _lookup_table() -> np.ndarray:
    """object index -> train id (uint16), 65535 for the objects outside the 847 classes."""
    ids = ade20k_tables()["full_847_object_ids"]
    top = (255 // 10) * 256 + 255  # the largest index a _seg.png can encode
    lut = np.full(top + 1, IGNORE, np.uint16)
    lut[np.asarray(ids)] = np.arange(len(ids), dtype=np.uint16)
    return lut


def _resized_shape(h: int, w: int):
    if w >= h > MAX_SIZE:
        return MAX_SIZE, round(w / float(h) * MAX_SIZE)
    if h >= w > MAX_SIZE:
        return round(h / float(w) * MAX_SIZE), MAX_SIZE
    return None


def convert_one(image_path: Path, out_image: Path, out_label: Path, lut: np.ndarray) -> None:
    """One image of the index -> its resized JPEG and uint16 TIFF (skipped if both exist)."""
    if out_image.is_file() and out_label.is_file():
        return
    seg_path = image_path.with_name(image_path.name.replace(".jpg", "_seg.png"))
    seg = read_array(seg_path)
    if seg.ndim != 3 or seg.shape[2] < 2 or seg.dtype != np.uint8:
        raise PrepareError(f"{seg_path}: expected an 8-bit RGB class encoding, got {seg.dtype} {seg.shape}")
    classes = (seg[:, :, 0] // 10).astype(np.int32) * 256 + seg[:, :, 1].astype(np.int32)
    img = read_array(image_path)
    if img.dtype != np.uint8:
        raise PrepareError(f"{image_path}: expected an 8-bit image, got {img.dtype}")
    if img.shape[:2] != classes.shape:
        raise PrepareError(f"{image_path} is {img.shape[1]}x{img.shape[0]} but {seg_path} is "
                           f"{classes.shape[1]}x{classes.shape[0]}")
    shape = _resized_shape(*img.shape[:2])
    if shape is not None:
        import cv2

        h_new, w_new = shape
        img = cv2.resize(img, (w_new, h_new), interpolation=cv2.INTER_LINEAR)
        classes = cv2.resize(classes, (w_new, h_new), interpolation=cv2.INTER_NEAREST)
    label = lut[classes]
    save_image(img, out_image, "JPEG")
    save_image(label, out_label, "TIFF")


def prepare(src: Path, root: Path, jobs: int, progress: bool) -> list:
    base = require(src / NAME, "the ADE20K 2021 release folder", DOWNLOAD)
    index = load_index(require(base / "index_ade20k.pkl", "the ADE20K index", DOWNLOAD))
    try:
        import cv2  # noqa: F401  (the official resize; checked before any work starts)
    except ImportError:
        raise PrepareError("preparing ade20k-full-847 needs OpenCV for the official resize: "
                           "pip install 'fastmaskformer[prepare]' (opencv-python-headless)") from None
    out = root / NAME
    lut = _lookup_table()
    tasks, absent = [], []
    for folder, name in zip(index["folder"], index["filename"]):
        split = "validation" if name.split("_")[1:2] == ["val"] else "training"
        image = src / folder / name
        if not image.is_file():
            absent.append(image)
            continue
        tasks.append((image, out / "images_detectron2" / split / name,
                      out / "annotations_detectron2" / split / name.replace(".jpg", ".tif"), lut))
    if absent:
        raise PrepareError(f"{len(absent)} image(s) of {base / 'index_ade20k.pkl'} missing under {src}, "
                           f"e.g. {absent[0]} ({DOWNLOAD})")
    run_parallel(convert_one, tasks, jobs, "ade20k-full-847", progress)
    return [out / "images_detectron2", out / "annotations_detectron2"]
