"""Semantic, panoptic and instance segmentation datasets over the standard Detectron2/MaskFormer
layouts.

Every item is a dict::

    image       uint8 [3, H', W'] RGB after augmentation
    target      fastmaskformer.Target built from the augmented label / id map (ignore -> -1)
    file_name   str, the image path;   image_id  str (semantic: file stem) or the JSON image id
    height, width  int, the original image size (the size predictions are evaluated at)
  test items (``train=False``) also carry the un-augmented ground truth for evaluation:
    sem_seg     int64 [H, W] label map with the dataset's ignore label      (semantic)
    pan_seg     int64 [H, W] segment ids (0 = void), segments_info: list of the JSON's dicts
                with "isthing" added                                         (panoptic)
  (instance items carry no ground truth: the evaluator reads the COCO JSON, as detectron2's)

Randomness: ``dataset[(index, seed)]`` augments with ``numpy.random.default_rng(seed)`` (what
the samplers in ``fastmaskformer.data.loader`` yield); ``dataset[index]`` uses a seed derived
from ``(seed, epoch, index)``, see ``set_epoch``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DatasetError
from .files import IMAGE_EXTENSIONS, read_image, read_label, read_panoptic_ids, require_dir, safe_join
from .metadata import Metadata
from .targets import instance_target, panoptic_target, semantic_target


class _SegmentationDataset(Dataset):
    """Shared item plumbing: RNG per sample, augmentation, the output dict."""

    def __init__(self, metadata: Metadata, augment: Callable | None, train: bool, seed: int):
        self.metadata = metadata
        self.augment = augment
        self.train = train
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation of integer-indexed items (``dataset[i]``) between epochs."""
        self.epoch = int(epoch)

    def _rng(self, key) -> tuple:
        if isinstance(key, (tuple, list)):
            index, seed = key
            return int(index), np.random.default_rng(int(seed))
        return int(key), np.random.default_rng([self.seed, self.epoch, int(key)])

    def _augment(self, image: np.ndarray, seg: np.ndarray, rng) -> tuple:
        if self.augment is not None:
            image, seg = self.augment(image, seg, rng)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), np.ascontiguousarray(seg)

    @staticmethod
    def _check_size(image: np.ndarray, seg: np.ndarray, image_path, seg_path) -> None:
        if image.shape[:2] != seg.shape[:2]:
            raise DatasetError(
                f"size mismatch: image {image_path} is {image.shape[0]}x{image.shape[1]} but "
                f"its annotation {seg_path} is {seg.shape[0]}x{seg.shape[1]}"
            )


class SemanticSegmentation(_SegmentationDataset):
    """Image / label-map pairs.

    pairs: ``[(image_path, label_path), ...]``; labels are read as stored (PNG or TIFF, 8 or
    16 bit) and mapped to contiguous ids by ``decode(raw, path)`` (e.g. :func:`decode_ade20k`;
    None: the stored values are the ids), whose output is an integer ``[H, W]`` map with values
    in ``[0, K)`` or ``metadata.ignore_label``, kept in the stored dtype (uint8 / uint16) while
    augmenting because that is faster.
    """

    def __init__(
        self,
        pairs: Sequence,
        metadata: Metadata,
        decode: Callable | None = None,
        augment: Callable | None = None,
        train: bool = True,
        seed: int = 0,
    ):
        super().__init__(metadata, augment, train, seed)
        self.pairs = [(Path(i), Path(l)) for i, l in pairs]
        self.decode = decode or decode_identity

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple:
        """Un-augmented ``(image uint8 [H, W, 3], label [H, W])``, checked; the label keeps its
        stored integer dtype unless the ignore label does not fit it."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = self.decode(read_label(label_path), label_path)
        self._check_size(image, label, image_path, label_path)
        ignore, k = self.metadata.ignore_label, self.metadata.num_classes
        if np.iinfo(label.dtype).max < ignore:  # room for the ignore label used as padding
            label = label.astype(np.int64)
        bad = (label != ignore) & ((label < 0) | (label >= k))
        if bad.any():
            values = np.unique(label[bad])[:5].tolist()
            raise DatasetError(
                f"label map {label_path} has values {values} outside [0, {k}) that are not the "
                f"ignore label {ignore} (after decoding; dataset {self.metadata.name})"
            )
        return image, label

    def __getitem__(self, key) -> dict:
        index, rng = self._rng(key)
        image, label = self.load(index)
        image_path = self.pairs[index][0]
        aug_image, aug_label = self._augment(image, label, rng)
        item = {
            "image": aug_image,
            "target": semantic_target(aug_label, self.metadata.ignore_label),
            "file_name": str(image_path),
            "image_id": image_path.stem,
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
        }
        if not self.train:
            item["sem_seg"] = torch.from_numpy(label.astype(np.int64))
        return item


def decode_identity(raw: np.ndarray, path) -> np.ndarray:
    """Stored values are contiguous ids already (ADE20K-Full, COCO-Stuff, Cityscapes trainIds,
    Mapillary)."""
    return raw


def decode_ade20k(raw: np.ndarray, path) -> np.ndarray:
    """ADE20K-150: uint8 ``x - 1`` so that 0 ("other") wraps to the ignore label 255."""
    if raw.dtype != np.uint8:
        raise DatasetError(f"ADE20K label map {path} must be 8-bit, got {raw.dtype}")
    return raw - np.uint8(1)


class PanopticSegmentation(_SegmentationDataset):
    """COCO-format panoptic segmentation: a JSON, a folder of RGB-encoded id PNGs and a folder
    of images (any paths, so it also reads partial copies such as the 2-image COCO sample).

    Image files come from the JSON's ``images[*].file_name`` (joined to ``image_dir``; or
    ``image_file(image_dir, image_entry)`` when given, e.g. Cityscapes' city folders), id maps
    from ``annotations[*].file_name`` (joined to ``png_dir``); both must stay inside their
    folders. Category ids map to contiguous ids through ``metadata.dataset_ids``; crowd
    segments become -1 in the target (official mapper).
    """

    def __init__(
        self,
        json_file,
        png_dir,
        image_dir,
        metadata: Metadata,
        augment: Callable | None = None,
        train: bool = True,
        seed: int = 0,
        image_file: Callable | None = None,
    ):
        super().__init__(metadata, augment, train, seed)
        self.json_file = Path(json_file)
        if not self.json_file.is_file():
            raise DatasetError(f"panoptic JSON {self.json_file} not found")
        self.png_dir = require_dir(Path(png_dir), "a folder of panoptic PNGs named in the JSON")
        self.image_dir = require_dir(Path(image_dir), "a folder of the images named in the JSON")
        try:
            with open(self.json_file) as f:
                data = json.load(f)
            images = {img["id"]: img for img in data["images"]}
            annotations = data["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(f"panoptic JSON {self.json_file} is malformed: {exc!r}") from exc
        self.category_map = metadata.category_map
        if image_file is None:
            def image_file(folder, entry):
                return safe_join(folder, entry["file_name"], "image file_name")
        self.records = []
        for ann in annotations:
            if ann["image_id"] not in images:
                raise DatasetError(f"{self.json_file}: annotation {ann['file_name']} names unknown image_id {ann['image_id']}")
            for seg in ann["segments_info"]:
                if seg["category_id"] not in self.category_map:
                    raise DatasetError(
                        f"{self.json_file}: segment {seg['id']} of {ann['file_name']} has category_id "
                        f"{seg['category_id']} unknown to dataset {metadata.name}"
                    )
            self.records.append({
                "image_id": ann["image_id"],
                "image": image_file(self.image_dir, images[ann["image_id"]]),
                "png": safe_join(self.png_dir, ann["file_name"], "annotation file_name"),
                "segments_info": ann["segments_info"],
            })
        if not self.records:
            raise DatasetError(f"panoptic JSON {self.json_file} has no annotations")

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple:
        """Un-augmented ``(image uint8 [H, W, 3], ids int64 [H, W])``, checked against the JSON."""
        rec = self.records[index]
        image = read_image(rec["image"])
        ids = read_panoptic_ids(rec["png"])
        self._check_size(image, ids, rec["image"], rec["png"])
        known = np.array([0] + [s["id"] for s in rec["segments_info"]], dtype=np.int64)
        present = np.unique(ids)
        missing = present[~np.isin(present, known)]
        if missing.size:
            raise DatasetError(
                f"panoptic PNG {rec['png']} contains segment ids {missing[:5].tolist()} that are "
                f"not in its segments_info in {self.json_file}"
            )
        return image, ids

    def __getitem__(self, key) -> dict:
        index, rng = self._rng(key)
        rec = self.records[index]
        image, ids = self.load(index)
        aug_image, aug_ids = self._augment(image, ids, rng)
        item = {
            "image": aug_image,
            "target": panoptic_target(aug_ids, rec["segments_info"], self.category_map),
            "file_name": str(rec["image"]),
            "image_id": rec["image_id"],
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
        }
        if not self.train:
            thing = set(self.metadata.dataset_ids[k] for k in self.metadata.thing_classes)
            item["pan_seg"] = torch.from_numpy(ids)
            item["segments_info"] = [dict(s, isthing=s["category_id"] in thing) for s in rec["segments_info"]]
        return item


def cityscapes_image_file(image_dir: Path) -> Callable:
    """Cityscapes panoptic JSONs name images by ``image_id`` (``<city>_<seq>_<frame>``; their
    ``file_name`` is ``<id>_gtFine_leftImg8bit.png``, a cityscapesScripts quirk): find
    ``image_dir/<city>/<id>_leftImg8bit.png`` by scanning the city folders, as detectron2's
    ``get_cityscapes_panoptic_files``."""
    suffix = "_leftImg8bit.png"
    found = {p.name[: -len(suffix)]: p for p in sorted(Path(image_dir).glob(f"*/*{suffix}"))}

    def image_file(folder, entry):
        image_id = str(entry["id"])
        if image_id not in found:
            raise DatasetError(f"no image {Path(image_dir) / '<city>' / (image_id + suffix)} for image_id {image_id!r}")
        return found[image_id]
    return image_file


class InstanceSegmentation(_SegmentationDataset):
    """COCO-format instance segmentation (``instances_{train,val}2017.json`` + images), read as
    detectron2's ``load_coco_json`` and Mask2Former's COCO instance mapper do:

    - categories: contiguous id = position of the category id in ``metadata.dataset_ids``
      (COCO: the 80 ids in ascending order);
    - segmentations: polygons (lists with an even number >= 6 of coordinates; others dropped,
      an annotation left without any is skipped) or RLE (``counts`` a list or a string),
      decoded with pycocotools at the image size; several polygons of one object are unioned;
    - crowd annotations (``iscrowd: 1``) are dropped from the training targets (their pixels
      belong to no segment, i.e. negatives for every mask, as in the official mapper where
      they are simply absent); training (``train=True``) also drops images without any
      non-crowd annotation (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``);
    - targets: one segment per instance that still has pixels after augmentation (the official
      mapper's ``filter_empty_instances``).

    Instances overlap in COCO; a ``Target`` holds a segment map, so overlapping pixels go to the
    smaller instance (painted last; ties: the later annotation), the larger one loses them. The
    evaluator reads the JSON itself, so evaluation is unaffected.

    The augmentation sees an int32 id map: 0 = no instance, ``k + 1`` = the image's k-th kept
    instance (padding 0).
    """

    task = "instance"

    def __init__(
        self,
        json_file,
        image_dir,
        metadata: Metadata,
        augment: Callable | None = None,
        train: bool = True,
        seed: int = 0,
    ):
        super().__init__(metadata, augment, train, seed)
        self.json_file = Path(json_file)
        if not self.json_file.is_file():
            raise DatasetError(f"instance JSON {self.json_file} not found")
        self.image_dir = require_dir(Path(image_dir), "a folder of the images named in the JSON")
        try:
            with open(self.json_file) as f:
                data = json.load(f)
            images = data["images"]
            by_image: dict = {img["id"]: [] for img in images}
            for ann in data["annotations"]:
                if ann["image_id"] not in by_image:
                    raise DatasetError(f"{self.json_file}: annotation {ann.get('id')} names unknown image_id "
                                       f"{ann['image_id']}")
                by_image[ann["image_id"]].append(ann)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(f"instance JSON {self.json_file} is malformed: {exc!r}") from exc
        self.category_map = metadata.category_map
        self.records = []
        for img in sorted(images, key=lambda im: im["id"]):  # detectron2 sorts the image ids
            anns = []
            for ann in by_image[img["id"]]:
                if ann["category_id"] not in self.category_map:
                    raise DatasetError(f"{self.json_file}: annotation {ann.get('id')} has category_id "
                                       f"{ann['category_id']} unknown to dataset {metadata.name}")
                segm = _valid_segmentation(ann.get("segmentation"), self.json_file, ann)
                if segm is None:
                    continue
                anns.append({"category_id": ann["category_id"], "iscrowd": int(ann.get("iscrowd", 0)),
                             "segmentation": segm})
            if train and not any(a["iscrowd"] == 0 for a in anns):
                continue
            self.records.append({
                "image_id": img["id"],
                "image": safe_join(self.image_dir, img["file_name"], "image file_name"),
                "height": int(img["height"]),
                "width": int(img["width"]),
                "annotations": anns,
            })
        if not self.records:
            raise DatasetError(f"instance JSON {self.json_file} has no images" + (" with annotations" if train else ""))

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple:
        """Un-augmented ``(image uint8 [H, W, 3], ids int32 [H, W], labels int64 [N])``: the id
        map of the non-crowd instances (see the class docstring) and their contiguous classes."""
        rec = self.records[index]
        image = read_image(rec["image"])
        height, width = rec["height"], rec["width"]
        if image.shape[:2] != (height, width):
            raise DatasetError(f"size mismatch: image {rec['image']} is {image.shape[0]}x{image.shape[1]} but "
                               f"{self.json_file} says {height}x{width}")
        kept = [a for a in rec["annotations"] if not a["iscrowd"]]
        masks = [decode_segmentation(a["segmentation"], height, width) for a in kept]
        areas = np.array([int(m.sum()) for m in masks], np.int64)
        ids = np.zeros((height, width), np.int32)
        for k in sorted(range(len(kept)), key=lambda k: (-areas[k], k)):  # largest first: small ones on top
            ids[masks[k]] = k + 1
        labels = np.array([self.category_map[a["category_id"]] for a in kept], np.int64)
        return image, ids, labels

    def __getitem__(self, key) -> dict:
        index, rng = self._rng(key)
        rec = self.records[index]
        image, ids, labels = self.load(index)
        aug_image, aug_ids = self._augment(image, ids, rng)
        return {
            "image": aug_image,
            "target": instance_target(aug_ids, labels),
            "file_name": str(rec["image"]),
            "image_id": rec["image_id"],
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
        }


def pycocotools_mask():
    """``pycocotools.mask``, or a one-line error saying how to install it."""
    try:
        from pycocotools import mask
    except ImportError as exc:
        raise DatasetError("COCO instance data needs pycocotools: pip install 'fastmaskformer[instance]' "
                           "(or pip install pycocotools)") from exc
    return mask


def _valid_segmentation(segm, json_file, ann):
    """detectron2's ``load_coco_json`` filter: polygons with an even number (>= 6) of coordinates
    (None when none is left: the annotation is skipped), RLE dicts as they are."""
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise DatasetError(f"{json_file}: annotation {ann.get('id')} has an RLE without counts/size")
        return segm
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6]
        return polys or None
    raise DatasetError(f"{json_file}: annotation {ann.get('id')} has no polygon or RLE segmentation")


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> bool ``[H, W]``."""
    mask_util = pycocotools_mask()
    if isinstance(segm, list):  # polygons: one RLE each, unioned (the official mapper's any())
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segm, *segm["size"])
    else:
        rle = dict(segm, counts=segm["counts"].encode() if isinstance(segm["counts"], str) else segm["counts"])
    mask = mask_util.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise DatasetError(f"a segmentation of size {mask.shape} does not fit its {height}x{width} image")
    return mask


def pair_files(image_dir: Path, label_dir: Path, label_suffixes: Sequence[str], image_suffix: str | None = None,
               recursive: bool = False, layout: str = "") -> list:
    """Match every image under ``image_dir`` to its label file under ``label_dir``.

    Image names end in ``image_suffix`` (None: any image extension); the label has the same
    relative folder and stem with one of ``label_suffixes`` (e.g. ``.png``, ``.tif``).
    """
    require_dir(image_dir, layout)
    require_dir(label_dir, layout)
    pattern = "**/*" if recursive else "*"
    pairs = []
    for image in sorted(image_dir.glob(pattern)):
        name = image.name
        if image_suffix is None:
            if image.suffix not in IMAGE_EXTENSIONS:
                continue
            stem = image.stem
        elif name.endswith(image_suffix):
            stem = name[: -len(image_suffix)]
        else:
            continue
        folder = label_dir / image.parent.relative_to(image_dir)
        for suffix in label_suffixes:
            label = folder / f"{stem}{suffix}"
            if label.is_file():
                pairs.append((image, label))
                break
        else:
            raise DatasetError(
                f"no label map for image {image}: expected {folder / stem}{'|'.join(label_suffixes)}"
            )
    if not pairs:
        raise DatasetError(f"no images found in {image_dir}; expected layout: {layout}")
    return pairs
