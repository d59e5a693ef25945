"""Evaluation: mIoU & co. (detectron2's SemSegEvaluator, in percent), PQ^St of semantic
predictions, panoptic quality with the COCO rules (panopticapi's ``pq_compute``, fractions) and
COCO mask AP (pycocotools' ``COCOeval``, percent; the ``instance`` extra).

Every evaluator streams with O(classes) memory (``update`` per batch, ``compute`` at the end)
and sums its state across ranks with ``sync()`` or ``compute(distributed=True)``.
"""
from .instance import InstanceEvaluator, coco_mask_ap
from .panoptic import PanopticEvaluator, pq_compute, read_id_png
from .semantic import SemanticEvaluator, SemanticPQEvaluator

__all__ = [
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "SemanticPQEvaluator",
    "coco_mask_ap",
    "pq_compute",
    "read_id_png",
]
