"""Panoptic quality (PQ, SQ, RQ) with the COCO rules, streaming or from COCO panoptic files.

- :class:`PanopticEvaluator` takes in-memory id maps (what ``ops.panoptic_inference`` returns)
  image by image, with O(num_categories) state, and can sum its counts across ranks.
- :func:`pq_compute` has panopticapi's signature and result format and scores the PNG + JSON
  files of the COCO panoptic format, with hotcoco (default when installed; Rust PNG decoding
  and matching) or with the same core as the streaming evaluator (``backend="reference"``).

Results are fractions in [0, 1] (multiply by 100 for the usual tables), exactly as panopticapi.
Deviations from panopticapi, all on inputs it mishandles (hotcoco: see :func:`pq_compute`): bad inputs raise ValueError /
FileNotFoundError naming the image and id or path (panopticapi raises KeyError or crashes); a
group with no category (e.g. "Things" on a stuff-only dataset) reports NaN with n = 0 instead of
dividing by zero; GT PNG ids missing from the GT JSON are an error (panopticapi silently counts
them as neither void nor segment); GT areas are counted from the PNG (panopticapi trusts the
JSON "area", which equals the PNG count in valid COCO files); an unmatched prediction's
pixels on *every* crowd segment of its category are excused (panopticapi only looks at the last
one listed; COCO has at most one crowd segment per category and image).
"""
from __future__ import annotations

import collections
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ._backend import resolve_backend
from ._pq import PQAccumulator, accumulate_image, parse_categories

VOID = 0  # id of unlabelled pixels in COCO panoptic id maps
LOOKUP_IDS = 1 << 24  # id maps whose ids all lie below this are indexed through a table


def _as_id_map(id_map, what: str, image) -> np.ndarray:
    """int array/tensor [H, W] -> int64 numpy [H, W]."""
    if isinstance(id_map, torch.Tensor):
        id_map = id_map.detach().cpu().numpy()
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(
            f"image {image}: {what} id map must be 2-D [H, W], got shape {id_map.shape}")
    if not np.issubdtype(id_map.dtype, np.integer):
        raise TypeError(f"image {image}: {what} id map must hold integers, got {id_map.dtype}")
    return id_map.astype(np.int64, copy=False)


def _segment_table(segments_info: Sequence[dict], category_index: dict, what: str, image):
    """Segments sorted by id: (ids int64 [S], category index int64 [S], crowd bool [S])."""
    ids, categories, crowd = [], [], []
    for seg in segments_info:
        if "id" not in seg or "category_id" not in seg:
            raise ValueError(f"image {image}: {what} segment {seg!r} lacks 'id' or 'category_id'")
        seg_id, cat_id = int(seg["id"]), int(seg["category_id"])
        if seg_id <= VOID:
            raise ValueError(
                f"image {image}: {what} segment id {seg_id} is not positive (0 = void)")
        if cat_id not in category_index:
            raise ValueError(
                f"image {image}: {what} segment {seg_id} has unknown category_id {cat_id}")
        ids.append(seg_id)
        categories.append(category_index[cat_id])
        crowd.append(seg.get("iscrowd", 0) == 1)
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    duplicated = ids[1:][ids[1:] == ids[:-1]]
    if len(duplicated):
        raise ValueError(f"image {image}: {what} segment id {int(duplicated[0])} is listed twice")
    return ids, np.asarray(categories, dtype=np.int64)[order], np.asarray(crowd, dtype=bool)[order]


def _unlisted_id_error(id_map: np.ndarray, unlisted: np.ndarray, what: str, image) -> ValueError:
    """The error for the first pixel of ``id_map`` whose id is not listed (unlisted: bool mask)."""
    bad = int(id_map[unlisted][0])
    return ValueError(f"image {image}: {what} id map contains segment id {bad}, "
                      f"which is not in its segments_info")


def _dense_index(id_map: np.ndarray, ids: np.ndarray, what: str, image) -> np.ndarray:
    """Map segment ids to 1 + their position in ``ids`` (sorted [S]) and void to 0 with a
    binary search: the path for ids too large (or negative) for a lookup table.

    id_map: int [H, W] -> intp [H, W] in [0, S]. An id that is neither void nor listed is an
    error: its pixels would otherwise be silently dropped or miscounted.
    """
    table = np.concatenate([[VOID], ids])
    index = np.searchsorted(table, id_map)
    np.minimum(index, len(table) - 1, out=index)  # ids past the end: rejected just below
    unknown = table[index] != id_map
    if unknown.any():
        raise _unlisted_id_error(id_map, unknown, what, image)
    return index


def segment_intersections(gt_index: np.ndarray, num_gt: int, pred_index: np.ndarray,
                          num_pred: int) -> np.ndarray:
    """Pixel counts of every (GT, predicted) pair with one bincount over combined indices.

    gt_index, pred_index: int64 [H, W] dense indices (0 = void). Returns int64
    [num_gt + 1, num_pred + 1].
    """
    combined = gt_index.ravel() * (num_pred + 1)
    combined += pred_index.ravel()
    counts = np.bincount(combined, minlength=(num_gt + 1) * (num_pred + 1))
    return counts.reshape(num_gt + 1, num_pred + 1)


def _lookup_table(ids: np.ndarray, step: int) -> np.ndarray:
    """intp [max id + 2]: void -> step, ids[i] -> (i + 2) * step, every other id -> 0 ("not
    listed"); the last entry stands for every id above the largest listed one (``mode="clip"``).
    Zero-filled, so only the pages of listed ids are written (ids are RGB colours up to 2^24)."""
    table = np.zeros((int(ids[-1]) if len(ids) else 0) + 2, dtype=np.intp)
    table[VOID] = step
    table[ids] = np.arange(2, len(ids) + 2) * step
    return table


def _fits_lookup(id_map: np.ndarray, ids: np.ndarray) -> bool:
    """Whether the listed ids fit a lookup table and the map has no negative id (one pass over
    signed maps; a negative id would be clipped onto void)."""
    if len(ids) and ids[-1] >= LOOKUP_IDS:
        return False
    return not (np.issubdtype(id_map.dtype, np.signedinteger) and id_map.size and id_map.min() < 0)


def segment_pair_counts(gt_map: np.ndarray, gt_ids: np.ndarray, pred_map: np.ndarray,
                        pred_ids: np.ndarray, image, scratch: np.ndarray | None = None) -> np.ndarray:
    """Pixel counts of every (GT segment, predicted segment) pair of one image.

    gt_map, pred_map: int [H, W] segment ids (0 = void); gt_ids [G], pred_ids [P]: the listed
    ids, sorted. Returns int64 [G + 1, P + 1], row / column 0 = void, then the ids' order. An id
    in a map that is not listed raises ValueError naming it (GT first).

    Ids below 2^24 (every COCO colour) take two table gathers into one flat bin index per pixel
    and one bincount, written into ``scratch`` (intp, >= 2 H W elements; allocated when None or
    too small) so that no image-sized array is allocated; larger ids take a binary search.
    """
    num_gt, num_pred = len(gt_ids), len(pred_ids)
    if not (_fits_lookup(gt_map, gt_ids) and _fits_lookup(pred_map, pred_ids)):
        return segment_intersections(_dense_index(gt_map, gt_ids, "ground-truth", image), num_gt,
                                     _dense_index(pred_map, pred_ids, "predicted", image), num_pred)
    # Bins of a [G + 2, P + 2] grid: row / column 0 collect pixels of unlisted ids, 1 is void.
    width = num_pred + 2
    pixels = gt_map.size
    if scratch is None or scratch.size < 2 * pixels:
        scratch = np.empty(2 * pixels, dtype=np.intp)
    flat = scratch[:pixels].reshape(gt_map.shape)
    pred_bins = scratch[pixels:2 * pixels].reshape(gt_map.shape)
    np.take(_lookup_table(gt_ids, width), gt_map, out=flat, mode="clip")
    np.take(_lookup_table(pred_ids, 1), pred_map, out=pred_bins, mode="clip")
    flat += pred_bins
    counts = np.bincount(flat.ravel(), minlength=(num_gt + 2) * width).reshape(num_gt + 2, width)
    if counts[0].any():
        raise _unlisted_id_error(gt_map, flat < width, "ground-truth", image)
    if counts[:, 0].any():
        raise _unlisted_id_error(pred_map, flat % width == 0, "predicted", image)
    return counts[1:, 1:]


class PanopticEvaluator(PQAccumulator):
    """Streaming PQ over in-memory panoptic predictions.

    categories: COCO-style category dicts with "id" and "isthing" (a list, or panopticapi's
    id -> dict mapping). Category ids in segments_info refer to these ids.
    """

    def reset(self) -> None:
        super().reset()
        self.num_images = 0
        self._scratch = None  # intp [2 H W] reused by segment_pair_counts (no per-image allocation)

    def update(self, pred_id_map, pred_segments_info, gt_id_map, gt_segments_info,
               image_id=None) -> None:
        """Add one image.

        pred_id_map, gt_id_map: int arrays or tensors [H, W] of segment ids, 0 = void.
        pred_segments_info: [{"id", "category_id", ...}] for every id in pred_id_map except 0.
        gt_segments_info: [{"id", "category_id", "iscrowd" (optional, default 0)}].
        image_id: only used to name the image in error messages.
        """
        self._check_not_synced("update")
        image = image_id if image_id is not None else f"#{self.num_images}"
        pred_map = _as_id_map(pred_id_map, "predicted", image)
        gt_map = _as_id_map(gt_id_map, "ground-truth", image)
        if pred_map.shape != gt_map.shape:
            raise ValueError(f"image {image}: predicted id map has size {pred_map.shape}, "
                             f"ground truth {gt_map.shape}")
        pred_ids, pred_category, _ = _segment_table(
            pred_segments_info, self.category_index, "predicted", image)
        gt_ids, gt_category, gt_crowd = _segment_table(
            gt_segments_info, self.category_index, "ground-truth", image)
        if self._scratch is None or self._scratch.size < 2 * gt_map.size:
            self._scratch = np.empty(2 * gt_map.size, dtype=np.intp)
        inter = segment_pair_counts(gt_map, gt_ids, pred_map, pred_ids, image, self._scratch)
        absent = pred_ids[inter[:, 1:].sum(axis=0) == 0]
        if len(absent):
            raise ValueError(f"image {image}: predicted segments {absent.tolist()} are in "
                             f"segments_info but not in the id map")
        accumulate_image(self.stats, inter, gt_category, gt_crowd, pred_category)
        self.num_images += 1


def read_id_png(path: str) -> np.ndarray:
    """COCO panoptic PNG -> int64 [H, W] ids (id = R + 256 G + 256^2 B; single-channel PNGs
    hold the id directly)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    with Image.open(path) as img:
        pixels = np.asarray(img)
        mode = img.mode
    if mode == "RGB":
        rgb = pixels.astype(np.int64)
        return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    if pixels.ndim == 2 and np.issubdtype(pixels.dtype, np.integer):
        return pixels.astype(np.int64)
    raise ValueError(f"{path}: expected an RGB or single-channel PNG, got mode {mode}")


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSON file not found: {path}")
    with open(path) as f:
        return json.load(f)


def _default_folder(json_file: str, folder) -> str:
    # panopticapi's convention: annotations X.json come with the PNG folder X.
    folder = os.path.splitext(json_file)[0] if folder is None else folder
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"panoptic PNG folder not found: {folder}")
    return folder


def _read_ahead(paths: Iterable[tuple[str, str]], num_threads: int) -> Iterator[tuple]:
    """Decode (pred, gt) PNG pairs on ``num_threads`` threads, in order, at most
    2 * num_threads pairs ahead (bounded memory). PNG decoding releases the GIL and dominates
    file-based evaluation."""
    with ThreadPoolExecutor(num_threads) as pool:
        pending = collections.deque()
        for pred_path, gt_path in paths:
            pending.append((pool.submit(read_id_png, pred_path), pool.submit(read_id_png, gt_path)))
            if len(pending) > 2 * num_threads:
                pred, gt = pending.popleft()
                yield pred.result(), gt.result()
        for pred, gt in pending:
            yield pred.result(), gt.result()


def _from_hotcoco(result: dict) -> dict:
    """hotcoco's result dict -> panopticapi's keys and values. hotcoco marks what is undefined
    with -1: a group without categories (NaN here, see the module docstring) and a category
    that never occurs (0.0 in panopticapi)."""
    out = {}
    for group in ("All", "Things", "Stuff"):
        values = result[group]
        empty = values["n"] == 0
        out[group] = {k: math.nan if empty else values[k] for k in ("pq", "sq", "rq")}
        out[group]["n"] = values["n"]
    out["per_class"] = {cat_id: {k: max(v[k], 0.0) for k in ("pq", "sq", "rq")}
                        for cat_id, v in result["per_class"].items()}
    return out


def pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: str | None = None,
               pred_folder: str | None = None, *, num_threads: int | None = None,
               backend: str = "auto") -> dict:
    """PQ of COCO-format panoptic predictions against COCO-format ground truth.

    Same arguments, defaults (folder = JSON path without ".json") and result as panopticapi's
    ``pq_compute``: {"All"|"Things"|"Stuff": {"pq","sq","rq","n"}, "per_class": {category id:
    {"pq","sq","rq"}}}, fractions in [0, 1]. Categories come from the GT JSON; every GT image
    needs a prediction (extra predicted images are ignored).

    backend: "hotcoco" (the default when installed: Rust PNG decoding and matching, panopticapi's
    numbers to 3e-16, tested) or "reference" (:class:`PanopticEvaluator` on PIL-decoded PNGs,
    ``num_threads`` decoding threads, default the number of CPUs, at most 8). Both raise on bad
    predictions; only the reference checks that every GT PNG id is listed in the GT JSON
    (hotcoco, like panopticapi, ignores such pixels; valid COCO files have none).
    """
    backend = resolve_backend(backend)
    gt_json, pred_json = _load_json(gt_json_file), _load_json(pred_json_file)
    gt_folder = _default_folder(gt_json_file, gt_folder)
    pred_folder = _default_folder(pred_json_file, pred_folder)
    predictions = {ann["image_id"]: ann for ann in pred_json["annotations"]}
    pairs = []  # (gt annotation, pred annotation) in GT order
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] not in predictions:
            raise ValueError(f"no prediction for image {gt_ann['image_id']} in {pred_json_file}")
        pairs.append((gt_ann, predictions[gt_ann["image_id"]]))
    if backend == "hotcoco":
        from hotcoco import panoptic as hotcoco_panoptic

        category_index = parse_categories(gt_json["categories"])[2]
        for gt_ann, pred_ann in pairs:  # what the id maps cannot reveal: ids, keys, categories
            _segment_table(gt_ann["segments_info"], category_index, "ground-truth", gt_ann["image_id"])
            _segment_table(pred_ann["segments_info"], category_index, "predicted", gt_ann["image_id"])
        evaluation = hotcoco_panoptic.PanopticEval(gt_json, pred_json, gt_folder=gt_folder,
                                                   pred_folder=pred_folder)
        evaluation.evaluate()
        return _from_hotcoco(evaluation.results())
    paths = ((os.path.join(pred_folder, pred_ann["file_name"]),
              os.path.join(gt_folder, gt_ann["file_name"])) for gt_ann, pred_ann in pairs)
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    evaluator = PanopticEvaluator(gt_json["categories"])
    for (gt_ann, pred_ann), (pred_map, gt_map) in zip(pairs, _read_ahead(paths, num_threads)):
        evaluator.update(pred_map, pred_ann["segments_info"], gt_map, gt_ann["segments_info"],
                         image_id=gt_ann["image_id"])
    return evaluator.compute()
