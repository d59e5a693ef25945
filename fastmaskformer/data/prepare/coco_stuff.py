"""COCO-Stuff-10K as MaskFormer's ``prepare_coco_stuff_10k_v1.0_sem_seg.py`` writes it.

Input (``SRC/coco/coco_stuff_10k/``, the unzipped ``cocostuff-10k-v1.0.zip``):
``imageLists/{train,test}.txt``, ``images/<name>.jpg``, ``annotations/<name>.mat`` (``S``: the
class of each pixel, 0 = unlabeled, 1..182 = COCO-Stuff id + 1; MATLAB v7.3 (HDF5, read with
h5py) or an older MAT file (read with scipy)).
Output (``ROOT/coco/coco_stuff_10k/``): ``images_detectron2/{train,test}/<name>.jpg`` (byte
copies) and ``annotations_detectron2/{train,test}/<name>.png``: uint8 ``S - 2``, so unlabeled
wraps to 255 and the stuff ids count from 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import PrepareError, copy_file, read_array, require, run_parallel, save_image

NAME = "coco/coco_stuff_10k"
DOWNLOAD = ("download cocostuff-10k-v1.0.zip (https://github.com/nightrome/cocostuff10k) and put its annotations/, "
            "imageLists/ and images/ into --src/coco/coco_stuff_10k")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def read_mat_labels(path: Path) -> np.ndarray:
    """The ``S`` matrix of an annotation as ``[H, W]`` (as MATLAB shows it)."""
    with open(path, "rb") as f:
        head = f.read(520)
    try:
        if head[512:520] == HDF5_SIGNATURE or head[:8] == HDF5_SIGNATURE:
            try:
                import h5py
            except ImportError:
                raise PrepareError(f"{path} is a MATLAB v7.3 (HDF5) file: pip install 'fastmaskformer[prepare]' "
                                   "(h5py) to read it") from None
            with h5py.File(path, "r") as f:
                # HDF5 stores MATLAB's column-major matrix transposed
                return np.transpose(np.array(f["S"]))
        from scipy.io import loadmat

        return np.asarray(loadmat(path)["S"])
    except PrepareError:
        raise
    except Exception as exc:  # h5py / scipy raise many types for a bad file
        raise PrepareError(f"cannot read the label matrix S from {path}: {exc!r}") from exc


def convert_one(image: Path, mat: Path, out_image: Path, out_label: Path) -> None:
    if out_image.is_file() and out_label.is_file():
        return
    labels = read_mat_labels(mat).astype(np.uint8) - np.uint8(2)  # 1 (unlabeled) -> 255, others -2
    shape = read_array(image).shape[:2]
    if labels.shape != shape:
        raise PrepareError(f"{mat} is {labels.shape[1]}x{labels.shape[0]} but {image} is {shape[1]}x{shape[0]}")
    copy_file(image, out_image)
    save_image(labels, out_label, "PNG")


def prepare(src: Path, root: Path, jobs: int, progress: bool) -> list:
    base = require(src / NAME, "the COCO-Stuff-10K folder", DOWNLOAD)
    out = root / NAME
    tasks, absent = [], []
    for split in ("test", "train"):
        listing = require(base / "imageLists" / f"{split}.txt", "the image list", DOWNLOAD)
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not names:
            raise PrepareError(f"{listing} lists no images")
        for name in names:
            image, mat = base / "images" / f"{name}.jpg", base / "annotations" / f"{name}.mat"
            absent += [p for p in (image, mat) if not p.is_file()]
            tasks.append((image, mat, out / "images_detectron2" / split / f"{name}.jpg",
                          out / "annotations_detectron2" / split / f"{name}.png"))
    if absent:
        raise PrepareError(f"{len(absent)} file(s) named in {base / 'imageLists'} missing, e.g. {absent[0]} ({DOWNLOAD})")
    run_parallel(convert_one, tasks, jobs, "coco-stuff-10k", progress)
    return [out / "images_detectron2", out / "annotations_detectron2"]
