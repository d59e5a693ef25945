"""COCO mask AP of instance predictions: detectron2's ``COCOEvaluator`` for the "segm" task.

Predictions (what ``ops.instance_inference`` returns at the original image size: bool masks,
scores, contiguous labels) are RLE-encoded with pycocotools image by image (O(instances) state,
no masks kept), mapped back to the dataset's category ids, gathered across ranks, and scored
by pycocotools' ``COCOeval(gt, dt, "segm")`` against the COCO instances JSON, on the images
that were evaluated. Results in percent, as detectron2 reports them: AP, AP50, AP75, APs, APm,
APl (NaN where undefined, e.g. no predictions at all or no object of a size), and per-class AP.

pycocotools is the ``instance`` extra (``pip install 'fastmaskformer[instance]'``).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ._distributed import all_gather_objects

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _pycocotools():
    try:
        from pycocotools import mask as mask_util
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise ImportError("instance evaluation needs pycocotools: pip install 'fastmaskformer[instance]' "
                          "(or pip install pycocotools)") from exc
    return mask_util, COCO, COCOeval


def encode_masks(masks) -> list[dict]:
    """bool ``[N, H, W]`` (tensor or array) -> N COCO RLEs with ``counts`` as str (JSON-ready)."""
    mask_util, _, _ = _pycocotools()
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"instance masks must be [N, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def load_coco_gt(gt):
    """A pycocotools ``COCO`` from a JSON path, a loaded dict or a ``COCO`` (quietly); invalid
    polygons are filtered as the loader filters them (see ``_valid_annotations``)."""
    _, COCO, _ = _pycocotools()
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        with open(gt) as f:
            gt = json.load(f)
    coco = COCO()
    coco.dataset = dict(gt, annotations=_valid_annotations(gt.get("annotations", [])))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _valid_annotations(annotations: list) -> list:
    """Polygons with an odd number or fewer than 6 coordinates removed, annotations left without
    any dropped: the loader's (detectron2's ``load_coco_json``) filter. pycocotools would read a
    4-number polygon as a box (and fails on it); such an object has no area to find."""
    out = []
    for ann in annotations:
        segm = ann.get("segmentation")
        if isinstance(segm, list):
            polys = [p for p in segm if isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6]
            if not polys:
                continue
            if len(polys) != len(segm):
                ann = dict(ann, segmentation=polys)
        out.append(ann)
    return out


def coco_mask_ap(coco_gt, results: Sequence[dict], image_ids: Sequence | None = None,
                 class_names: dict | None = None) -> dict:
    """``COCOeval(coco_gt, results, "segm")`` on ``image_ids`` (None: every GT image).

    results: COCO result dicts ``{"image_id", "category_id", "segmentation" (RLE), "score"}``.
    class_names: category id -> name for the per-class table (default: the GT's names).
    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {name: AP}}`` in percent.
    """
    _, _, COCOeval = _pycocotools()
    coco_gt = load_coco_gt(coco_gt)
    if class_names is None:
        class_names = {c["id"]: c["name"] for c in coco_gt.dataset.get("categories", [])}
    if not results:  # detectron2: no predictions -> every metric NaN
        return {**{k: math.nan for k in METRICS}, "per_class": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds area/bbox/id in place
        ev = COCOeval(coco_gt, coco_dt, "segm")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: float(ev.stats[i] * 100) if ev.stats[i] >= 0 else math.nan for i, k in enumerate(METRICS)}
    # per class: area "all", maxDets 100, mean of the defined precisions over IoUs and recalls
    precision = ev.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M maxDets]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[class_names.get(cat_id, str(cat_id))] = float(p.mean() * 100) if p.size else math.nan
    out["per_class"] = per_class
    return out


class InstanceEvaluator:
    """Streaming COCO mask AP.

    gt: the COCO instances JSON (path, dict or pycocotools ``COCO``); dataset_ids: the category id
    of each contiguous class (``metadata.dataset_ids``); class_names: per contiguous class, for
    the per-class table (default: the JSON's names).
    """

    def __init__(self, gt, dataset_ids: Sequence[int], class_names: Sequence[str] | None = None):
        self.gt = gt
        self.dataset_ids = [int(i) for i in dataset_ids]
        self.class_names = None if class_names is None else dict(zip(self.dataset_ids, class_names))
        self.results: list[dict] = []
        self.image_ids: list = []

    def reset(self) -> None:
        self.results, self.image_ids = [], []

    def update(self, image_id, masks, scores, labels) -> None:
        """One image's predictions at its original size: masks bool ``[N, H, W]``, scores
        ``[N]``, labels ``[N]`` (contiguous class ids). Images without predictions count too."""
        scores = torch.as_tensor(scores).detach().cpu().float().tolist()
        labels = torch.as_tensor(labels).detach().cpu().long().tolist()
        rles = encode_masks(masks)
        if not len(rles) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(rles)} masks, {len(scores)} scores and {len(labels)} labels")
        self.image_ids.append(image_id)
        for rle, score, label in zip(rles, scores, labels):
            if not 0 <= label < len(self.dataset_ids):
                raise ValueError(f"image {image_id}: label {label} outside [0, {len(self.dataset_ids)})")
            self.results.append({"image_id": image_id, "category_id": self.dataset_ids[label],
                                 "segmentation": rle, "score": score})

    def compute(self, distributed: bool = False) -> dict:
        """Mask AP over the images seen (on every rank when ``distributed``)."""
        results, image_ids = self.results, self.image_ids
        if distributed:
            gathered = all_gather_objects((results, image_ids))
            results = [r for rs, _ in gathered for r in rs]
            image_ids = [i for _, ids in gathered for i in ids]
        return coco_mask_ap(self.gt, results, image_ids, self.class_names)
