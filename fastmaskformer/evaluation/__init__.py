"""Evaluation: mIoU & co. (detectron2's SemSegEvaluator, in percent), PQ^St of semantic
predictions, and panoptic quality with the COCO rules (panopticapi's ``pq_compute``, fractions).

Every evaluator streams with O(classes) memory (``update`` per batch, ``compute`` at the end)
and sums its state across ranks with ``sync()`` or ``compute(distributed=True)``.
"""
from .panoptic import PanopticEvaluator, pq_compute, read_id_png
from .semantic import SemanticEvaluator, SemanticPQEvaluator

__all__ = [
    "PanopticEvaluator",
    "SemanticEvaluator",
    "SemanticPQEvaluator",
    "pq_compute",
    "read_id_png",
]
