"""The dataset registry: where each dataset lives under the datasets root and how it is read.

``build_dataset(data_cfg, split, train)`` is the single entry point; ``DATASETS`` maps names to
``DatasetSpec``s. Paths follow the Detectron2/MaskFormer ``datasets/`` conventions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .datasets import (
    InstanceSegmentation,
    PanopticSegmentation,
    SemanticSegmentation,
    cityscapes_image_file,
    decode_ade20k,
    decode_identity,
    pair_files,
)
from .errors import DatasetError
from .files import require_dir, resolve_root
from .metadata import get_metadata
from .transforms import build_augmentation

_SPLITS = {"train": "train", "training": "train", "train2017": "train",
           "val": "val", "validation": "val", "val2017": "val", "test": "val"}


@dataclass(frozen=True)
class DatasetSpec:
    """name: registry key; task: "semantic" | "panoptic" | "instance"; splits: canonical split ("train" /
    "val") -> the folder word the layout uses (plus "image_<word>" where the image folders use
    another word); layout: the expected tree, for error messages;
    make(root, split_word, spec, metadata, augment, train, seed) -> Dataset."""

    name: str
    task: str
    splits: dict
    layout: str
    make: Callable


def _semantic(image_dir, label_dir, label_suffixes, decode, image_suffix=None, recursive=False):
    def make(root, split, spec, metadata, augment, train, seed):
        images = root / image_dir.format(split=split)
        labels = root / label_dir.format(split=split)
        pairs = pair_files(images, labels, label_suffixes, image_suffix, recursive, spec.layout)
        return SemanticSegmentation(pairs, metadata, decode, augment, train, seed)
    return make


def _panoptic(json_file, png_dir, image_dir, city_folders=False):
    def make(root, split, spec, metadata, augment, train, seed):
        # ADE20K panoptic names its JSON/PNGs "train"/"val" but its image folders "training"/...
        image_split = spec.splits.get("image_" + split, split)
        paths = [root / p.format(split=split, image_split=image_split) for p in (json_file, png_dir, image_dir)]
        released = paths[0].parent / "annotations" / paths[0].name  # COCO's zip (and detectron2) keep it there
        if not paths[0].is_file() and released.is_file():
            paths[0] = released
        if not paths[0].is_file():
            raise DatasetError(f"panoptic JSON {paths[0]} not found; expected layout: {spec.layout}")
        image_file = cityscapes_image_file(require_dir(paths[2], spec.layout)) if city_folders else None
        return PanopticSegmentation(*paths, metadata, augment, train, seed, image_file=image_file)
    return make


def _instance(json_file, image_dir):
    def make(root, split, spec, metadata, augment, train, seed):
        json_path, images = root / json_file.format(split=split), root / image_dir.format(split=split)
        if not json_path.is_file():
            raise DatasetError(f"instance JSON {json_path} not found; expected layout: {spec.layout}")
        return InstanceSegmentation(json_path, images, metadata, augment, train, seed)
    return make


_ADE = "ADEChallengeData2016"
_ADE_LAYOUT = f"{_ADE}/images/{{training,validation}}/*.jpg + {_ADE}/annotations/{{training,validation}}/*.png"
_COCO_PAN_LAYOUT = ("coco/panoptic_{train,val}2017.json (or coco/annotations/, as released) + "
                    "coco/panoptic_{train,val}2017/*.png + coco/{train,val}2017/*.jpg")

_CITYSCAPES_PAN_LAYOUT = ("cityscapes/gtFine/cityscapes_panoptic_{train,val}.json + "
                          "cityscapes/gtFine/cityscapes_panoptic_{train,val}/*_gtFine_panoptic.png + "
                          "cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png "
                          "(fastmaskformer prepare cityscapes, or cityscapesScripts' createPanopticImgs)")

DATASETS = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "ade20k-150", "semantic", {"train": "training", "val": "validation"}, _ADE_LAYOUT,
            _semantic(_ADE + "/images/{split}", _ADE + "/annotations/{split}", (".png",), decode_ade20k),
        ),
        DatasetSpec(
            "ade20k-full-847", "semantic", {"train": "training", "val": "validation"},
            "ADE20K_2021_17_01/images_detectron2/{training,validation}/*.jpg + "
            "ADE20K_2021_17_01/annotations_detectron2/{training,validation}/*.tif (uint16, or .png)",
            _semantic("ADE20K_2021_17_01/images_detectron2/{split}", "ADE20K_2021_17_01/annotations_detectron2/{split}",
                      (".tif", ".tiff", ".png"), decode_identity),
        ),
        DatasetSpec(
            "coco-stuff-10k", "semantic", {"train": "train", "val": "test"},
            "coco/coco_stuff_10k/images_detectron2/{train,test}/*.jpg + "
            "coco/coco_stuff_10k/annotations_detectron2/{train,test}/*.png",
            _semantic("coco/coco_stuff_10k/images_detectron2/{split}", "coco/coco_stuff_10k/annotations_detectron2/{split}",
                      (".png",), decode_identity),
        ),
        DatasetSpec(
            "cityscapes", "semantic", {"train": "train", "val": "val"},
            "cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + "
            "cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png",
            _semantic("cityscapes/leftImg8bit/{split}", "cityscapes/gtFine/{split}", ("_gtFine_labelTrainIds.png",),
                      decode_identity, image_suffix="_leftImg8bit.png", recursive=True),
        ),
        DatasetSpec(
            "mapillary", "semantic", {"train": "training", "val": "validation"},
            "mapillary_vistas/{training,validation}/images/*.jpg + mapillary_vistas/{training,validation}/labels/*.png",
            _semantic("mapillary_vistas/{split}/images", "mapillary_vistas/{split}/labels", (".png",), decode_identity),
        ),
        DatasetSpec(
            "coco-panoptic", "panoptic", {"train": "train", "val": "val"}, _COCO_PAN_LAYOUT,
            _panoptic("coco/panoptic_{split}2017.json", "coco/panoptic_{split}2017", "coco/{split}2017"),
        ),
        DatasetSpec(
            "coco-instance", "instance", {"train": "train", "val": "val"},
            "coco/annotations/instances_{train,val}2017.json + coco/{train,val}2017/*.jpg",
            _instance("coco/annotations/instances_{split}2017.json", "coco/{split}2017"),
        ),
        DatasetSpec(
            "cityscapes-panoptic", "panoptic", {"train": "train", "val": "val"}, _CITYSCAPES_PAN_LAYOUT,
            _panoptic("cityscapes/gtFine/cityscapes_panoptic_{split}.json", "cityscapes/gtFine/cityscapes_panoptic_{split}",
                      "cityscapes/leftImg8bit/{split}", city_folders=True),
        ),
        DatasetSpec(
            "ade20k-panoptic", "panoptic",
            {"train": "train", "val": "val", "image_train": "training", "image_val": "validation"},
            f"{_ADE}/ade20k_panoptic_{{train,val}}.json + {_ADE}/ade20k_panoptic_{{train,val}}/*.png + "
            f"{_ADE}/images/{{training,validation}}/*.jpg",
            _panoptic(_ADE + "/ade20k_panoptic_{split}.json", _ADE + "/ade20k_panoptic_{split}",
                      _ADE + "/images/{image_split}"),
        ),
        DatasetSpec(
            "synthetic-semantic", "semantic", {"train": "training", "val": "validation"},
            _ADE_LAYOUT + " + synthetic_metadata.json (see fastmaskformer.data.synthetic.generate)",
            _semantic(_ADE + "/images/{split}", _ADE + "/annotations/{split}", (".png",), decode_ade20k),
        ),
        DatasetSpec(
            "synthetic-panoptic", "panoptic", {"train": "train", "val": "val"},
            _COCO_PAN_LAYOUT + " + synthetic_metadata.json (see fastmaskformer.data.synthetic.generate)",
            _panoptic("coco/panoptic_{split}2017.json", "coco/panoptic_{split}2017", "coco/{split}2017"),
        ),
    ]
}


def build_dataset(data_cfg, split: str, train: bool, augment: Callable | None = None, seed: int = 0):
    """The dataset ``data_cfg.dataset`` under ``data_cfg.root`` (or ``$FASTMASKFORMER_DATASETS``).

    split: "train"/"training"/"val"/"validation"/"test" (e.g. ``data_cfg.train_split``).
    train: selects the augmentation (``build_augmentation(data_cfg, train)``) unless ``augment``
    is given, and whether items carry the un-augmented ground truth (test items do).
    seed: base seed for integer-indexed items (the loaders' samplers pass per-sample seeds).
    """
    name = data_cfg.dataset
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(_SPLITS)}")
    spec = DATASETS[name]
    root = resolve_root(data_cfg.root)
    metadata = get_metadata(name, root)
    if augment is None:  # padding: the ignore label in label maps, void (0) in panoptic / instance id maps
        augment = build_augmentation(data_cfg, train, metadata.ignore_label if spec.task == "semantic" else 0)
    return spec.make(Path(root), spec.splits[_SPLITS[split]], spec, metadata, augment, train, seed)
