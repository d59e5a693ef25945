"""Semantic segmentation metrics: mIoU & co. from a dataset-level confusion matrix, and PQ^St.

:class:`SemanticEvaluator` reports what detectron2's ``SemSegEvaluator`` reports, in percent:
mIoU, fwIoU, mACC, pAcc and per-class IoU / ACC. Conventions (detectron2's):

- pixels whose GT is ``ignore_label`` are dropped, whatever was predicted there;
- IoU_c = TP / (GT_c + PRED_c - TP); mIoU averages over classes present in the GT *or* the
  predictions (a class predicted but absent from the GT has IoU 0 and counts);
  classes absent from both are NaN and skipped;
- ACC_c = TP / GT_c, NaN when the class is absent from the GT; mACC averages the non-NaN ones;
- fwIoU weights IoU_c by GT_c; pAcc = sum TP / sum GT_c.

detectron2 prints NaN (not 0) as the per-class IoU of a class predicted but absent from the GT;
its mIoU counts that class as 0, as here. torchmetrics ``MulticlassJaccardIndex(
average="macro", ignore_index=...)`` gives the same mean: it also gives zero weight to classes
absent from both (checked with torchmetrics 1.9; older releases counted them as IoU 0, which
lowers the mean whenever a class never occurs).

:class:`SemanticPQEvaluator` is the paper's PQ^St ablation metric: each class present in an
image is one stuff segment, ignore pixels are void, then the COCO PQ rules apply.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._backend import resolve_backend
from ._distributed import all_reduce_sum
from ._pq import PQAccumulator, accumulate_image


def _as_label_tensor(x, what: str) -> Tensor:
    """Integer array/tensor [H, W] or [B, H, W] -> int64 tensor [B, H, W] (same device)."""
    if not isinstance(x, Tensor):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{what} must hold integer labels, got {x.dtype}")
        x = torch.from_numpy(x.astype(np.int64, copy=False))
    elif x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer labels, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{what} must be [H, W] or [B, H, W], got shape {tuple(x.shape)}")
    return (x if x.dim() == 3 else x[None]).long()


def _label_counts(pred, gt, num_classes: int, ignore_label: int) -> Tensor:
    """Per-image (GT class, predicted class) pixel counts with one bincount for the batch.

    pred: int [H, W] or [B, H, W] in [0, K); gt: same shape, in [0, K) or ``ignore_label``.
    Returns int64 [B, K + 1, K] on pred's device; row K counts the ignored GT pixels.
    """
    k = num_classes
    pred = _as_label_tensor(pred, "pred")
    gt = _as_label_tensor(gt, "gt").to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
    if pred.numel() == 0:
        return torch.zeros(pred.shape[0], k + 1, k, dtype=torch.int64, device=pred.device)
    lo, hi = torch.aminmax(pred)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise ValueError(f"pred contains label {bad}, outside [0, {k})")
    ignored = gt == ignore_label
    gt_rows = gt.masked_fill(ignored, k)  # ignored pixels go to the extra row K
    lo, hi = torch.aminmax(gt_rows)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi > k:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"gt contains label {bad}, outside [0, {k}) and not ignore_label {ignore_label}")
    # Flat bin of each pixel: (image, GT row, predicted class). In place: this is the hot loop.
    flat = gt_rows.mul_(k).add_(pred)
    if gt.shape[0] > 1:
        image_offset = torch.arange(gt.shape[0], device=gt.device) * ((k + 1) * k)
        flat.add_(image_offset.view(-1, 1, 1))
    counts = torch.bincount(flat.reshape(-1), minlength=gt.shape[0] * (k + 1) * k).view(-1, k + 1, k)
    # A genuine GT label K (not ignore) also landed in row K: the row must hold only ignores.
    if ignore_label != k and int(counts[:, k].sum()) != int(ignored.sum()):
        raise ValueError(
            f"gt contains label {k}, outside [0, {k}) and not ignore_label {ignore_label}")
    return counts


def _as_label_array(x, what: str) -> np.ndarray:
    """Integer CPU tensor / array [H, W] or [B, H, W] -> numpy view (no copy where possible)."""
    x = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{what} must hold integer labels, got {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{what} must be [H, W] or [B, H, W], got shape {tuple(x.shape)}")
    return x


class SemanticEvaluator:
    """Streaming mIoU, fwIoU, mACC, pAcc over a dataset (detectron2's SemSegEvaluator).

    State: ``confusion`` int64 [K, K] (rows = GT class, columns = predicted class) on the
    device of the first inputs; memory is O(K^2) whatever the dataset size.

    backend: "auto" | "hotcoco" | "reference". With hotcoco (the default when installed and
    ``ignore_label`` >= 0), CPU inputs are counted straight into a hotcoco ``SemanticEval``
    (Rust, one pass, no per-update allocation; the same integer counts, tested); CUDA tensors
    always take the reference ``torch.bincount`` on their device. The metrics are computed from
    the counts by the same code either way.
    """

    def __init__(self, num_classes: int, ignore_label: int = 255, backend: str = "auto"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if backend == "hotcoco" and ignore_label < 0:
            raise ValueError(f"backend='hotcoco' needs ignore_label >= 0, got {ignore_label}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.backend = "reference" if ignore_label < 0 else resolve_backend(backend)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._counted = None  # int64 [K, K] tensor: reference counts (and the synced sum)
        self._hotcoco = None  # hotcoco SemanticEval holding the CPU counts of the hotcoco backend
        self._synced = False

    @property
    def confusion(self) -> Tensor | None:
        """int64 [K, K] counts so far (rows = GT class), None before the first update."""
        if self._hotcoco is None:
            return self._counted
        counts = torch.from_numpy(self._hotcoco.confusion().astype(np.int64))
        return counts if self._counted is None else self._counted + counts.to(self._counted.device)

    def _matrix(self) -> Tensor:
        confusion = self.confusion
        if confusion is None:
            k = self.num_classes
            return torch.zeros(k, k, dtype=torch.int64)
        return confusion

    def update(self, pred, gt) -> None:
        """Add predictions and GT: int arrays or tensors [H, W] or [B, H, W] of equal shape.

        pred labels in [0, K); gt labels in [0, K) or ``ignore_label``. Anything else raises
        ValueError naming the offending value, and nothing of that call is counted.
        """
        if self._synced:
            raise RuntimeError(
                "cannot update after sync(): the state already holds every rank's sum")
        on_gpu = any(isinstance(x, Tensor) and x.device.type != "cpu" for x in (pred, gt))
        if self.backend == "hotcoco" and not on_gpu:
            pred, gt = _as_label_array(pred, "pred"), _as_label_array(gt, "gt")
            if pred.shape != gt.shape:
                raise ValueError(f"pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
            if self._hotcoco is None:
                from hotcoco.semantic import SemanticEval

                self._hotcoco = SemanticEval(self.num_classes, ignore_index=self.ignore_label)
            self._hotcoco.update(gt, pred)  # checks every label; counts nothing if one is bad
            return
        counts = _label_counts(pred, gt, self.num_classes, self.ignore_label)
        batch_confusion = counts[:, : self.num_classes].sum(0)  # drop the ignore row
        if self._counted is None:
            self._counted = batch_confusion
        else:
            self._counted += batch_confusion.to(self._counted.device)

    def sync(self) -> None:
        """Replace the local confusion matrix by its sum over all ranks (every rank must call
        it once, after its last update)."""
        if self._synced:
            raise RuntimeError("sync() was already called")
        self._counted = all_reduce_sum(self._matrix())
        self._hotcoco = None
        self._synced = True

    def compute(self, distributed: bool = False) -> dict:
        """Metrics in percent: {"mIoU", "fwIoU", "mACC", "pAcc": float, "IoU", "ACC": list of
        K floats (NaN where undefined, see the module docstring)}.

        distributed=True sums the confusion matrix over ranks first without changing the local
        state (every rank must call it).
        """
        confusion = self._matrix()
        if distributed:
            if self._synced:
                raise RuntimeError("compute(distributed=True) after sync() would count twice")
            confusion = all_reduce_sum(confusion)
        return _metrics_from_confusion(confusion.cpu().double())


def _mean_or_nan(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _metrics_from_confusion(confusion: Tensor) -> dict:
    """confusion: float64 [K, K], rows = GT, columns = prediction -> metrics in percent."""
    tp = confusion.diagonal()
    gt_pixels = confusion.sum(1)
    pred_pixels = confusion.sum(0)
    union = gt_pixels + pred_pixels - tp
    in_gt = gt_pixels > 0
    occurs = union > 0
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(occurs, tp / union.clamp(min=1), nan)
    acc = torch.where(in_gt, tp / gt_pixels.clamp(min=1), nan)
    total = gt_pixels.sum()
    fwiou = float((iou[in_gt] * gt_pixels[in_gt]).sum() / total) if total > 0 else math.nan
    pacc = float(tp.sum() / total) if total > 0 else math.nan
    return {
        "mIoU": 100 * _mean_or_nan(iou[occurs]),
        "fwIoU": 100 * fwiou,
        "mACC": 100 * _mean_or_nan(acc[in_gt]),
        "pAcc": 100 * pacc,
        "IoU": (100 * iou).tolist(),
        "ACC": (100 * acc).tolist(),
    }


class SemanticPQEvaluator(PQAccumulator):
    """PQ^St of semantic predictions (the MaskFormer paper's ablation metric).

    Every class is stuff: per image, the pixels of class c in the GT form one GT segment and
    those in the prediction one predicted segment; GT ``ignore_label`` pixels are void. PQ, SQ,
    RQ then follow the COCO rules (IoU > 0.5 match, void-aware union, predictions mostly on void
    are not false positives). Results as :func:`panoptic.pq_compute`: fractions, per_class keyed
    by class index; "Things" is empty (NaN, n = 0).
    """

    def __init__(self, num_classes: int, ignore_label: int = 255):
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        super().__init__([{"id": c, "isthing": 0} for c in range(num_classes)])

    def update(self, pred, gt) -> None:
        """Add images: int arrays or tensors [H, W] or [B, H, W], as SemanticEvaluator.update."""
        self._check_not_synced("update")
        counts = _label_counts(pred, gt, self.num_classes, self.ignore_label).cpu().numpy()
        for image_counts in counts:  # (K + 1, K): rows = GT class then void, columns = pred
            self._add_image(image_counts)

    def _add_image(self, counts: np.ndarray) -> None:
        k = self.num_classes
        gt_classes = np.flatnonzero(counts[:k].sum(1))  # (G,) classes present in the GT
        pred_classes = np.flatnonzero(counts.sum(0))  # (P,) classes present in the prediction
        # Segment-pair matrix in the core's layout: row 0 = GT void (the ignore row K), column 0
        # = predicted void (always empty for semantic predictions).
        inter = np.zeros((len(gt_classes) + 1, len(pred_classes) + 1), dtype=np.int64)
        inter[0, 1:] = counts[k, pred_classes]
        inter[1:, 1:] = counts[np.ix_(gt_classes, pred_classes)]
        crowd = np.zeros(len(gt_classes), dtype=bool)
        accumulate_image(self.stats, inter, gt_classes, crowd, pred_classes)
