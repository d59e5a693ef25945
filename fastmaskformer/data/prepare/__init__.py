"""``fastmaskformer prepare``: the released datasets -> the layouts the loaders read, with the
same files, names, dtypes and values as the official preparation scripts.

``prepare(name, src, root)`` reads the downloads under ``src`` (laid out as the official
MaskFormer / Mask2Former ``datasets/README.md`` places them: ``src/ADE20K_2021_17_01/``,
``src/ADEChallengeData2016/``, ``src/coco/coco_stuff_10k/``, ``src/cityscapes/``) and writes under
``root`` (default: ``src``, in place like the official scripts). When ``root`` is another
folder, raw folders the loaders still read (ADE20K images and class maps, Cityscapes
``leftImg8bit``) are symlinked into it.

Every run is idempotent: finished outputs are skipped, each file is written atomically, so an
interrupted run resumes where it stopped. Images are converted in ``jobs`` processes.
"""
from __future__ import annotations

from pathlib import Path

from . import ade20k_full, ade20k_panoptic, cityscapes, coco_stuff
from ._common import PrepareError, default_jobs

PREPARERS = {
    "ade20k-full-847": ade20k_full.prepare,
    "ade20k-panoptic": ade20k_panoptic.prepare,
    "coco-stuff-10k": coco_stuff.prepare,
    "cityscapes": cityscapes.prepare,
    "cityscapes-panoptic": cityscapes.prepare,  # the same run: train ids and the panoptic ground truth
}

# the release folder each preparer expects under --src
RELEASE_DIRS = {
    "ade20k-full-847": ade20k_full.NAME,
    "ade20k-panoptic": ade20k_panoptic.NAME,
    "coco-stuff-10k": coco_stuff.NAME,
    "cityscapes": cityscapes.NAME,
    "cityscapes-panoptic": cityscapes.NAME,
}

# datasets the loaders read as released, and why
NOT_NEEDED = {
    "ade20k-150": "reads ADEChallengeData2016/annotations as released (class - 1 while loading, 0 -> 255)",
    "coco-panoptic": "reads the released coco/annotations/panoptic_{train,val}2017.json and PNGs",
    "coco-instance": "reads the released coco/annotations/instances_{train,val}2017.json (polygons, RLE)",
    "mapillary": "reads mapillary_vistas/{training,validation}/labels as released (65 = unlabeled)",
}


def prepare(name: str, src, root=None, jobs: int | None = None, progress: bool = True) -> list:
    """Prepare dataset ``name`` from the downloads in ``src`` into ``root`` (default ``src``).

    Returns the output folders / files. Raises PrepareError (one line naming what is missing or
    malformed) on a wrong or incomplete ``src``, ValueError on an unknown ``name``.
    """
    if name not in PREPARERS:
        if name in NOT_NEEDED:
            raise ValueError(f"{name} needs no preparation: the loader {NOT_NEEDED[name]}")
        raise ValueError(f"unknown dataset {name!r} for prepare; choose one of: {', '.join(PREPARERS)}")
    src = Path(src).expanduser()
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a directory")
    release = Path(RELEASE_DIRS[name])
    if not (src / release).exists() and src.resolve().parts[-len(release.parts):] == release.parts:
        src = Path(*src.resolve().parts[: -len(release.parts)])  # --src named the release folder itself
    root = Path(root).expanduser() if root else src
    root.mkdir(parents=True, exist_ok=True)
    return PREPARERS[name](src, root, jobs or default_jobs(), progress)


__all__ = ["prepare", "PREPARERS", "NOT_NEEDED", "PrepareError"]
