"""Panoptic quality core shared by every PQ evaluator (panoptic PNGs, in-memory id maps, PQ^St).

An image is reduced to one pixel-count matrix ``inter [G+1, P+1]``: ``inter[g, p]`` = pixels in
GT segment g and predicted segment p, where row 0 / column 0 collect GT void / predicted void.
The COCO rules (Kirillov et al., and panopticapi's ``pq_compute_single_core``) then only need
this matrix plus each segment's category and crowd flag:

- a GT and a predicted segment of the same category match when IoU > 0.5, where the union
  leaves out the predicted pixels on GT void; crowd GT never matches;
- unmatched non-crowd GT segments are false negatives;
- an unmatched predicted segment is a false positive unless more than half of its pixels lie on
  GT void or on crowd GT of its own category.

Results are fractions in [0, 1], as panopticapi returns them.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from ._distributed import all_reduce_sum

MATCH_IOU = 0.5  # a match needs IoU strictly above this (unique matches are then guaranteed)
IGNORED_FRACTION = 0.5  # an unmatched prediction mostly on void/crowd is not a false positive


class PQStats:
    """Per-category PQ counts, the whole state a PQ evaluator streams.

    tp, fp, fn: int64 [C] match counts; iou: float64 [C] sum of the IoUs of the matches. C is
    the number of categories; index c refers to the evaluator's c-th category.
    """

    def __init__(self, num_categories: int):
        self.tp = np.zeros(num_categories, dtype=np.int64)
        self.fp = np.zeros(num_categories, dtype=np.int64)
        self.fn = np.zeros(num_categories, dtype=np.int64)
        self.iou = np.zeros(num_categories, dtype=np.float64)

    def all_reduced(self) -> "PQStats":
        """Sums over all ranks (a copy when not distributed). Every rank must call it."""
        counts = all_reduce_sum(torch.from_numpy(np.stack([self.tp, self.fp, self.fn])))
        iou = all_reduce_sum(torch.from_numpy(self.iou))
        summed = PQStats(len(self.tp))
        summed.tp, summed.fp, summed.fn = (row.numpy() for row in counts)
        summed.iou = iou.numpy()
        return summed


def accumulate_image(
    stats: PQStats,
    inter: np.ndarray,
    gt_category: np.ndarray,
    gt_crowd: np.ndarray,
    pred_category: np.ndarray,
) -> None:
    """Add one image's matches to ``stats`` (COCO rules, see the module docstring).

    inter: int64 [G+1, P+1] pixel counts, row 0 = GT void, column 0 = predicted void.
    gt_category: int64 [G] category index of each GT segment; gt_crowd: bool [G].
    pred_category: int64 [P] category index of each predicted segment.
    """
    num_categories = len(stats.tp)
    gt_area = inter[1:].sum(axis=1)  # (G,)
    pred_area = inter[:, 1:].sum(axis=0)  # (P,)
    pred_on_void = inter[0, 1:]  # (P,)
    overlap = inter[1:, 1:]  # (G, P)

    same_category = gt_category[:, None] == pred_category[None, :]  # (G, P)
    candidate = same_category & ~gt_crowd[:, None] & (overlap > 0)
    union = gt_area[:, None] + pred_area[None, :] - overlap - pred_on_void[None, :]
    iou = np.divide(overlap, union, out=np.zeros(overlap.shape), where=candidate)
    matched = iou > MATCH_IOU  # at most one True per row and per column
    gt_idx, pred_idx = np.nonzero(matched)
    matched_category = gt_category[gt_idx]
    stats.tp += np.bincount(matched_category, minlength=num_categories)
    stats.iou += np.bincount(matched_category, weights=iou[gt_idx, pred_idx],
                             minlength=num_categories)

    missed = ~matched.any(axis=1) & ~gt_crowd
    stats.fn += np.bincount(gt_category[missed], minlength=num_categories)

    # Pixels of each prediction that are not held against it: GT void plus crowd GT of its class.
    on_crowd = (overlap * (same_category & gt_crowd[:, None])).sum(axis=0)  # (P,)
    ignored = pred_on_void + on_crowd
    spurious = ~matched.any(axis=0) & (ignored <= IGNORED_FRACTION * pred_area)
    stats.fp += np.bincount(pred_category[spurious], minlength=num_categories)


def _group_average(stats: PQStats, selected: np.ndarray) -> dict:
    """Mean PQ/SQ/RQ over the selected categories that occur (tp + fp + fn > 0).

    selected: bool [C]. ``n`` = number of categories averaged; with n = 0 the means are NaN
    (panopticapi divides by zero there).
    """
    tp, fp, fn, iou = stats.tp, stats.fp, stats.fn, stats.iou
    occurs = selected & (tp + fp + fn > 0)
    n = int(occurs.sum())
    if n == 0:
        return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}
    denom = tp[occurs] + 0.5 * fp[occurs] + 0.5 * fn[occurs]
    sq = np.divide(iou[occurs], tp[occurs], out=np.zeros(n), where=tp[occurs] > 0)
    return {
        "pq": float(np.mean(iou[occurs] / denom)),
        "sq": float(np.mean(sq)),
        "rq": float(np.mean(tp[occurs] / denom)),
        "n": n,
    }


def _per_class(stats: PQStats, category_ids: Sequence[int]) -> dict:
    """{category id: {"pq", "sq", "rq"}}; 0.0 for categories that never occur (panopticapi)."""
    results = {}
    for c, cat_id in enumerate(category_ids):
        tp, fp, fn, iou = int(stats.tp[c]), int(stats.fp[c]), int(stats.fn[c]), float(stats.iou[c])
        denom = tp + 0.5 * fp + 0.5 * fn
        if denom == 0:
            results[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        else:
            results[cat_id] = {"pq": iou / denom, "sq": iou / tp if tp else 0.0, "rq": tp / denom}
    return results


def summarize(stats: PQStats, category_ids: Sequence[int], isthing: np.ndarray) -> dict:
    """panopticapi's result dict: {"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class"}.

    isthing: bool [C]. Values are fractions in [0, 1].
    """
    everything = np.ones(len(category_ids), dtype=bool)
    return {
        "All": _group_average(stats, everything),
        "Things": _group_average(stats, isthing),
        "Stuff": _group_average(stats, ~isthing),
        "per_class": _per_class(stats, category_ids),
    }


def parse_categories(categories) -> tuple[list[int], np.ndarray, dict[int, int]]:
    """Normalise COCO-style categories.

    categories: a sequence of dicts with "id" and optional "isthing" (1 = thing), or a mapping
    id -> such a dict (panopticapi's form). Returns (ids in the given order, isthing bool [C],
    id -> index).
    """
    infos = list(categories.values()) if isinstance(categories, Mapping) else list(categories)
    if not infos:
        raise ValueError("categories is empty")
    ids = []
    for info in infos:
        if "id" not in info:
            raise ValueError(f"category {info!r} has no 'id'")
        ids.append(int(info["id"]))
    index = {cat_id: i for i, cat_id in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"duplicate category ids in {ids}")
    isthing = np.array([info.get("isthing", 0) == 1 for info in infos], dtype=bool)
    return ids, isthing, index


class PQAccumulator:
    """Streaming PQ state with reset / sync / compute; subclasses add an ``update``.

    categories: see :func:`parse_categories`. Memory is O(C) whatever the dataset size.
    """

    def __init__(self, categories):
        self.category_ids, self.isthing, self.category_index = parse_categories(categories)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.stats = PQStats(len(self.category_ids))
        self._synced = False

    def _check_not_synced(self, action: str) -> None:
        if self._synced:
            raise RuntimeError(
                f"cannot {action} after sync(): the state already holds every rank's sum")

    def sync(self) -> None:
        """Replace the local counts by their sum over all ranks (every rank must call it once,
        after its last update)."""
        self._check_not_synced("sync again")
        self.stats = self.stats.all_reduced()
        self._synced = True

    def compute(self, distributed: bool = False) -> dict:
        """PQ/SQ/RQ as fractions: {"All"|"Things"|"Stuff": {"pq","sq","rq","n"},
        "per_class": {category id: {"pq","sq","rq"}}}.

        distributed=True sums over ranks first without changing the local state (every rank
        must call it).
        """
        stats = self.stats
        if distributed:
            self._check_not_synced("compute(distributed=True)")
            stats = stats.all_reduced()
        return summarize(stats, self.category_ids, self.isthing)
