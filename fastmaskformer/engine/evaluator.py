"""Evaluate a model over a test dataset: semantic mIoU & co. (percent, detectron2), panoptic
quality (COCO rules) and COCO mask AP (detectron2's COCOEvaluator "segm"), sharded over ranks
when a process group is running.

Items come from ``build_dataset(cfg.data, split, train=False)``: test-resized images plus the
original ground truth (``sem_seg`` or ``pan_seg`` + ``segments_info``). A panoptic dataset also
gets mIoU, from the semantic map its panoptic ground truth implies (void -> ignore). An instance
dataset (COCO instances JSON) is scored against its JSON, as detectron2 does.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import build_test_loader
from ..data.metadata import check_label_space
from ..evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator
from ..modeling import num_classes_of
from ..modeling.eomt import EoMT
from . import distributed as du
from .predictor import infer, semantic_tta


def panoptic_to_semantic(pan_seg, segments_info, category_map: dict, ignore_label: int) -> torch.Tensor:
    """GT id map [H, W] + segments_info (dataset category ids) -> int64 class map, void -> ignore."""
    pan = torch.as_tensor(pan_seg).long()
    out = torch.full_like(pan, ignore_label)
    for seg in segments_info:
        out[pan == int(seg["id"])] = category_map[int(seg["category_id"])]
    return out


def summarize_pq(result: dict) -> dict:
    """pq_compute-style fractions -> detectron2's percent keys PQ, SQ, RQ, PQ_th, ..., PQ_st."""
    out = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            out[key.upper() + suffix] = 100.0 * float(result[group][key])
    return out


@torch.no_grad()
def evaluate_dataset(model: nn.Module, dataset, cfg, device: str | torch.device = "cpu", num_workers: int = 0,
                     batch_size: int = 1, amp: bool = False, progress: bool = True) -> dict:
    """Run ``model`` over ``dataset`` (this rank's shard) and return
    ``{"sem_seg": {"mIoU", "fwIoU", "mACC", "pAcc", "IoU"}, "panoptic": {"PQ", "SQ", "RQ", ...},
    "segm": {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}}`` with the tasks that
    ``cfg.test`` enables and the dataset supports (instance datasets: ``segm`` only).
    Semantic TTA (``cfg.test.aug_scales`` / ``aug_flip``) evaluates one image at a time."""
    metadata = dataset.metadata
    check_label_space(num_classes_of(model), metadata, "the model", cfg.data.dataset)
    instance_data = getattr(dataset, "task", None) == "instance"  # InstanceSegmentation (or a wrapper saying so)
    panoptic_data = hasattr(dataset, "records") and not instance_data
    queries = isinstance(model, EoMT) or (hasattr(model, "predictor")
                                          and getattr(model.predictor, "class_embed", None) is not None)
    do_semantic = cfg.test.semantic_on and not instance_data
    do_panoptic = cfg.test.panoptic_on and panoptic_data and queries
    do_instance = cfg.test.instance_on and instance_data and queries
    if not (do_semantic or do_panoptic or do_instance):
        raise ValueError("nothing to evaluate: enable test.semantic_on, test.panoptic_on on a panoptic dataset "
                         "or test.instance_on on an instance dataset (with a mask-classification model)")
    use_tta = bool(cfg.test.aug_scales) or cfg.test.aug_flip
    model.eval()
    loader = build_test_loader(cfg, dataset=dataset, batch_size=1 if use_tta else batch_size, num_workers=num_workers)
    sem_eval = SemanticEvaluator(metadata.num_classes, metadata.ignore_label) if do_semantic else None
    categories = [{"id": i, "isthing": int(t)} for i, t in zip(metadata.dataset_ids, metadata.isthing)]
    pan_eval = PanopticEvaluator(categories) if do_panoptic else None
    ins_eval = InstanceEvaluator(dataset.json_file, metadata.dataset_ids, metadata.class_names) if do_instance else None
    tasks = [t for t, on in (("semantic", do_semantic and not use_tta), ("panoptic", do_panoptic),
                             ("instance", do_instance)) if on]
    iterator = loader
    if progress and du.is_main_process():
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", unit="img", dynamic_ncols=True)
    for batch in iterator:
        sizes = list(zip(batch["heights"], batch["widths"]))
        images = [im.to(device) for im in batch["images"]]
        results = infer(model, images, sizes, cfg.test, tasks, metadata.thing_classes, amp) if tasks \
            else [{} for _ in images]
        for i, result in enumerate(results):
            if sem_eval is not None:
                pred = semantic_tta(model, batch["images"][i], sizes[i], cfg.test, amp) if use_tta else result["semantic"]
                if "sem_segs" in batch:
                    gt = batch["sem_segs"][i]
                else:
                    gt = panoptic_to_semantic(batch["pan_segs"][i], batch["segments_infos"][i],
                                              metadata.category_map, metadata.ignore_label)
                sem_eval.update(pred.cpu(), gt)
            if pan_eval is not None:
                ids, segments = result["panoptic"]
                segments = [dict(s, category_id=metadata.dataset_ids[s["category_id"]]) for s in segments]
                pan_eval.update(ids.cpu().numpy(), segments, np.asarray(batch["pan_segs"][i]),
                                batch["segments_infos"][i], image_id=batch["image_ids"][i])
            if ins_eval is not None:
                inst = result["instance"]
                ins_eval.update(batch["image_ids"][i], inst["masks"], inst["scores"], inst["labels"])
    distributed = du.get_world_size() > 1
    out = {}
    if sem_eval is not None:
        out["sem_seg"] = sem_eval.compute(distributed=distributed)
    if pan_eval is not None:
        out["panoptic"] = summarize_pq(pan_eval.compute(distributed=distributed))
    if ins_eval is not None:
        out["segm"] = ins_eval.compute(distributed=distributed)
    return out
