"""COCO mask AP of instance predictions: detectron2's ``COCOEvaluator`` for the "segm" task.

Predictions (what ``ops.instance_inference`` returns at the original image size: bool masks,
scores, contiguous labels) are RLE-encoded image by image (O(instances) state, no masks kept),
mapped back to the dataset's category ids, gathered across ranks, and scored like pycocotools'
``COCOeval(gt, dt, "segm")`` against the COCO instances JSON, on the images that were evaluated.
Results in percent, as detectron2 reports them: AP, AP50, AP75, APs, APm, APl (NaN where
undefined, e.g. no predictions at all or no object of a size), and per-class AP.

Two backends (``backend=``, see ``_backend``): ``"hotcoco"`` (the default when installed) runs
hotcoco's Rust ``COCOeval``, whose precision table is bit-identical to pycocotools' (tested);
``"reference"`` runs pycocotools itself (the ``instance`` extra).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ._backend import resolve_backend
from ._distributed import all_gather_objects

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# COCOeval.summarize's first six numbers: (IoU threshold or None for all, area range index);
# every one at maxDets = 100, the last of params.maxDets.
_SUMMARY = ((None, 0), (0.5, 0), (0.75, 0), (None, 1), (None, 2), (None, 3))


def _pycocotools():
    try:
        from pycocotools import mask as mask_util
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise ImportError("instance evaluation with backend='reference' needs pycocotools: "
                          "pip install 'fastmaskformer[instance]' (or pip install pycocotools)") from exc
    return mask_util, COCO, COCOeval


def encode_masks(masks, backend: str = "auto") -> list[dict]:
    """bool ``[N, H, W]`` (tensor or array) -> N COCO RLEs with ``counts`` as str (JSON-ready).

    hotcoco reads the C-ordered masks as they are; pycocotools needs a column-major copy.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"instance masks must be [N, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    if masks.dtype != np.bool_:
        masks = masks != 0
    if resolve_backend(backend) == "hotcoco":
        from hotcoco import mask as hotcoco_mask

        rles = hotcoco_mask.encode(masks.transpose(1, 2, 0))  # (H, W, N) view, no copy
    else:
        mask_util, _, _ = _pycocotools()
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _gt_dataset(gt) -> dict:
    """The COCO instances dict of a JSON path, a dict or a pycocotools / hotcoco ``COCO``, with
    invalid polygons filtered (see ``_valid_annotations``)."""
    if isinstance(gt, (str, Path)):
        with open(gt) as f:
            gt = json.load(f)
    elif not isinstance(gt, dict):
        gt = gt.dataset  # a pycocotools or hotcoco COCO
    return dict(gt, annotations=_valid_annotations(gt.get("annotations", [])))


def load_coco_gt(gt, backend: str = "auto"):
    """A ``COCO`` of the backend (hotcoco's or pycocotools') from a JSON path, a loaded dict or
    either ``COCO`` (quietly); invalid polygons are filtered as the loader filters them."""
    if resolve_backend(backend) == "hotcoco":
        import hotcoco

        return gt if isinstance(gt, hotcoco.COCO) else hotcoco.COCO(_gt_dataset(gt))
    _, COCO, _ = _pycocotools()
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    coco.dataset = _gt_dataset(gt)
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


def summary_from_precision(precision: np.ndarray, iou_thresholds: Sequence[float]) -> list[float]:
    """COCOeval.summarize's AP, AP50, AP75, APs, APm, APl (fractions, -1 where undefined) from
    its precision table ``[T IoUs, R recalls, K classes, A areas, M maxDets]``: the mean of the
    defined (> -1) entries at maxDets = 100."""
    iou_thresholds = np.asarray(iou_thresholds)
    stats = []
    for iou, area in _SUMMARY:
        p = precision[:, :, :, area, -1]
        if iou is not None:
            p = p[np.flatnonzero(np.isclose(iou_thresholds, iou))]
        p = p[p > -1]
        stats.append(float(np.mean(p)) if p.size else -1.0)
    return stats


@contextlib.contextmanager
def _quiet_native_stdout():
    """Send file descriptor 1 to /dev/null: hotcoco's summarize prints from Rust, past
    ``sys.stdout`` (and so past ``contextlib.redirect_stdout``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _run_cocoeval(coco_gt, results: list[dict], image_ids, backend: str) -> tuple[list, dict]:
    """(six summary stats as fractions, -1 where undefined; {category id: per-class AP as a
    fraction, NaN where undefined}). Per class: area "all", maxDets 100, the mean of the defined
    precisions over IoUs and recalls."""
    if backend == "hotcoco":
        import hotcoco

        ev = hotcoco.COCOeval(coco_gt, coco_gt.load_res(results), "segm")
        if image_ids is not None:
            ev.params.img_ids = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        names = {c["name"]: cat_id for cat_id, c in coco_gt.cats.items()}
        if len(names) == len(coco_gt.cats):  # hotcoco reports per class by name
            with _quiet_native_stdout():
                ev.summarize()
            reported = {names[name]: ap for name, ap in ev.results(per_class=True)["per_class"].items()}
            # it leaves out categories without GT; pycocotools lists them, undefined
            per_class = {cat_id: reported[cat_id] if reported.get(cat_id, -1) >= 0 else math.nan
                         for cat_id in sorted(coco_gt.cats)}
            return list(ev.stats[:len(METRICS)]), per_class
        precision = np.asarray(ev.eval["precision"])  # a copy of the whole table: ~10 ms
        stats = summary_from_precision(precision, ev.params.iou_thrs)
        return stats, _per_class_from_precision(precision, ev.params.cat_ids)
    _, _, COCOeval = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds area/bbox/id in place
        ev = COCOeval(coco_gt, coco_dt, "segm")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats[:len(METRICS)]), _per_class_from_precision(ev.eval["precision"], ev.params.catIds)


def _per_class_from_precision(precision: np.ndarray, category_ids) -> dict:
    """{category id: AP fraction (NaN where no precision is defined)} from the [T, R, K, A, M]
    table at area "all", maxDets 100."""
    per_class = {}
    for k, cat_id in enumerate(category_ids):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[cat_id] = float(p.mean()) if p.size else math.nan
    return per_class


def coco_mask_ap(coco_gt, results: Sequence[dict], image_ids: Sequence | None = None,
                 class_names: dict | None = None, backend: str = "auto") -> dict:
    """``COCOeval(coco_gt, results, "segm")`` on ``image_ids`` (None: every GT image).

    coco_gt: instances JSON path, dict, or a ``COCO`` of the backend (see :func:`load_coco_gt`).
    results: COCO result dicts ``{"image_id", "category_id", "segmentation" (RLE), "score"}``.
    class_names: category id -> name for the per-class table (default: the GT's names).
    backend: "auto" | "hotcoco" | "reference" (pycocotools); identical numbers.
    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {name: AP}}`` in percent.
    """
    backend = resolve_backend(backend)
    coco_gt = load_coco_gt(coco_gt, backend)
    if class_names is None:
        # .cats, not .dataset: hotcoco builds .dataset anew from Rust, annotations included
        class_names = {cat_id: c["name"] for cat_id, c in coco_gt.cats.items()}
    if not results:  # detectron2: no predictions -> every metric NaN
        return {**{k: math.nan for k in METRICS}, "per_class": {}}
    stats, per_class = _run_cocoeval(coco_gt, list(results), image_ids, backend)
    out = {k: float(s * 100) if s >= 0 else math.nan for k, s in zip(METRICS, stats)}
    out["per_class"] = {class_names.get(cat_id, str(cat_id)): 100 * ap for cat_id, ap in per_class.items()}
    return out


class InstanceEvaluator:
    """Streaming COCO mask AP.

    gt: the COCO instances JSON (path, dict or ``COCO``); dataset_ids: the category id of each
    contiguous class (``metadata.dataset_ids``); class_names: per contiguous class, for the
    per-class table (default: the JSON's names); backend: see :func:`coco_mask_ap`. State: one
    RLE per predicted instance; the ground truth is loaded once, at the first ``compute``.
    """

    def __init__(self, gt, dataset_ids: Sequence[int], class_names: Sequence[str] | None = None,
                 backend: str = "auto"):
        self.gt = gt
        self.backend = resolve_backend(backend)
        self.dataset_ids = [int(i) for i in dataset_ids]
        self.class_names = None if class_names is None else dict(zip(self.dataset_ids, class_names))
        self._coco_gt = None
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self.image_ids: list = []

    def update(self, image_id, masks, scores, labels) -> None:
        """One image's predictions at its original size: masks bool ``[N, H, W]``, scores
        ``[N]``, labels ``[N]`` (contiguous class ids). Images without predictions count too."""
        scores = torch.as_tensor(scores).detach().cpu().float().tolist()
        labels = torch.as_tensor(labels).detach().cpu().long().tolist()
        if not len(masks) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(masks)} masks, {len(scores)} scores and {len(labels)} labels")
        bad = [label for label in labels if not 0 <= label < len(self.dataset_ids)]
        if bad:
            raise ValueError(f"image {image_id}: label {bad[0]} outside [0, {len(self.dataset_ids)})")
        rles = encode_masks(masks, self.backend)
        self.image_ids.append(image_id)
        for rle, score, label in zip(rles, scores, labels):
            self.results.append({"image_id": image_id, "category_id": self.dataset_ids[label],
                                 "segmentation": rle, "score": score})

    def compute(self, distributed: bool = False) -> dict:
        """Mask AP over the images seen (on every rank when ``distributed``)."""
        results, image_ids = self.results, self.image_ids
        if distributed:
            gathered = all_gather_objects((results, image_ids))
            results = [r for rs, _ in gathered for r in rs]
            image_ids = [i for _, ids in gathered for i in ids]
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self.gt, self.backend)
        return coco_mask_ap(self._coco_gt, results, image_ids, self.class_names, self.backend)
