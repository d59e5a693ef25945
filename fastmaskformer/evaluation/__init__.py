"""Evaluation: mIoU & co. (detectron2's SemSegEvaluator, in percent), PQ^St of semantic
predictions, panoptic quality with the COCO rules (panopticapi's ``pq_compute``, fractions) and
COCO mask AP (pycocotools' ``COCOeval``, percent; the ``instance`` extra).

Every evaluator streams (``update`` per batch, ``compute`` at the end) with O(classes) memory,
O(instances) RLEs for mask AP, and sums or gathers its state across ranks with ``sync()`` or
``compute(distributed=True)``. ``backend="auto"|"hotcoco"|"reference"`` picks the engine of
mask AP, PQ from files and the semantic confusion counts: hotcoco (Rust, the default when
installed) or the references (pycocotools, our NumPy / torch code); the numbers are the
references' either way (see ``_backend``).
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
