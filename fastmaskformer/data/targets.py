"""Fast NumPy construction of ``Target``s from augmented label / id maps.

Same results as ``Target.from_semantic`` / ``Target.from_panoptic`` (tested against them), in
O(H W) or O(H W log S) NumPy work instead of per-class torch passes: the loader builds one
target per sample, and on the CPU workers that difference is most of the data-loading time.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..target import IGNORE_SEGMENT, Target


def semantic_target(label: np.ndarray, ignore_label: int) -> Target:
    """label: int ``[H, W]``, values in ``[0, K)`` or ``ignore_label`` (non-negative).

    One segment per class present, ascending class id; ignore -> -1.
    """
    flat = label.reshape(-1)
    counts = np.bincount(flat, minlength=ignore_label + 1) if flat.size else np.zeros(ignore_label + 1, np.int64)
    counts[ignore_label] = 0
    classes = np.flatnonzero(counts)
    lut = np.full(counts.shape[0], IGNORE_SEGMENT, np.int32)
    lut[classes] = np.arange(classes.size, dtype=np.int32)
    return Target(torch.from_numpy(classes.astype(np.int64)), torch.from_numpy(lut[label]))


def panoptic_target(ids: np.ndarray, segments_info: Sequence[Mapping], category_map: Mapping[int, int]) -> Target:
    """ids: int64 ``[H, W]`` segment ids (0 = void); ``segments_info`` as in the COCO JSON.

    One segment per non-crowd entry of ``segments_info``, in that order, including segments
    absent from ``ids`` (removed by a crop: no pixels, as the official mappers keep them);
    labels are ``category_map[category_id]``; every other pixel -> -1.
    """
    kept = [s for s in segments_info if not s.get("iscrowd", 0)]
    labels = torch.tensor([int(category_map[s["category_id"]]) for s in kept], dtype=torch.int64)
    if not kept:
        return Target(labels, torch.full(ids.shape, IGNORE_SEGMENT, dtype=torch.int32))
    seg_ids = np.array([int(s["id"]) for s in kept], np.int64)
    order = np.argsort(seg_ids)
    sorted_ids = seg_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    index = np.where(sorted_ids[pos] == ids, order[pos], IGNORE_SEGMENT).astype(np.int32)
    return Target(labels, torch.from_numpy(index))


def instance_target(ids: np.ndarray, labels: np.ndarray) -> Target:
    """ids: int ``[H, W]``, 0 = no instance, ``k + 1`` = instance k; labels: int64 ``[N]``.

    One segment per instance that has pixels in ``ids`` (an augmentation may crop one away: the
    official instance mapper drops those), in instance order; every other pixel -> -1.
    """
    counts = np.bincount(ids.reshape(-1), minlength=labels.shape[0] + 1)[: labels.shape[0] + 1]
    present = np.flatnonzero(counts[1:])
    lut = np.full(labels.shape[0] + 1, IGNORE_SEGMENT, np.int32)
    lut[present + 1] = np.arange(present.size, dtype=np.int32)
    return Target(torch.from_numpy(np.asarray(labels, np.int64)[present]), torch.from_numpy(lut[ids]))
