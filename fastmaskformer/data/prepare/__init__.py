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

import importlib
from pathlib import Path

# dataset -> its preparer module (imported on use: the command line lists these names without
# loading numpy / PIL); each module has ``NAME``, the release folder it expects under --src, and
# ``prepare(src, root, jobs, progress)``
PREPARERS = {
    "ade20k-full-847": "ade20k_full",
    "ade20k-panoptic": "ade20k_panoptic",
    "coco-stuff-10k": "coco_stuff",
    "cityscapes": "cityscapes",
    "cityscapes-panoptic": "cityscapes",  # the same run: train ids and the panoptic ground truth
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
    from ._common import PrepareError, default_jobs

    src = Path(src).expanduser()
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a directory")
    module = importlib.import_module(f"{__name__}.{PREPARERS[name]}")
    release = Path(module.NAME)
    if not (src / release).exists() and src.resolve().parts[-len(release.parts):] == release.parts:
        src = Path(*src.resolve().parts[: -len(release.parts)])  # --src named the release folder itself
    root = Path(root).expanduser() if root else src
    root.mkdir(parents=True, exist_ok=True)
    return module.prepare(src, root, jobs or default_jobs(), progress)


def __getattr__(name):
    if name == "PrepareError":
        from ._common import PrepareError

        return PrepareError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["prepare", "PREPARERS", "NOT_NEEDED", "PrepareError"]
