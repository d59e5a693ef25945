"""Evaluation speed on the CPU: semantic (mIoU, PQ^St) and panoptic (PQ) evaluators.

Semantic: N ADE20K-size (512x683) predictions, K = 150, one image per update as in an
evaluation loop over variable-size images; target: 2000 images in under a minute on 2 cores.
Reference: torchmetrics MulticlassJaccardIndex on the same inputs.
Panoptic: COCO-size (480x640) id maps with ~40 segments, streamed in memory and through
pq_compute on PNG + JSON files; reference: panopticapi's pq_compute (multiprocessing over all
cores) on the same files.

    python benchmarks/bench_evaluation.py [--semantic-images 2000] [--panoptic-images 200]

Each measurement is repeated (--repeats) and the median reported, with the minimum beside it:
the cores may be shared. Prints a Markdown table and writes it with the JSON to
benchmarks/results/cpu-evaluation-<YYYY-MM-DD>.json / .md (--json to choose the path).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import result_path, write_results  # noqa: E402

from fastmaskformer.evaluation import (  # noqa: E402
    PanopticEvaluator,
    SemanticEvaluator,
    SemanticPQEvaluator,
    pq_compute,
)

ADE_SIZE = (512, 683)
COCO_SIZE = (480, 640)
POOL = 8  # distinct inputs cycled through; generating 2000 maps would dominate the run


def _blocky_labels(rng, shape, num_values, block=32):
    """Piecewise-constant random labels [H, W] (segments of realistic extent, not salt noise)."""
    h, w = shape
    coarse = rng.integers(0, num_values, size=(-(-h // block), -(-w // block)))
    return np.repeat(np.repeat(coarse, block, 0), block, 1)[:h, :w]


def semantic_inputs(rng, num_classes):
    """POOL pairs (pred int64 tensor [H, W], gt uint8 tensor [H, W] with ~5% ignore 255)."""
    pairs = []
    for _ in range(POOL):
        gt = _blocky_labels(rng, ADE_SIZE, num_classes)
        pred = np.where(rng.random(ADE_SIZE) < 0.7, gt, _blocky_labels(rng, ADE_SIZE, num_classes, 16))
        gt = np.where(rng.random(ADE_SIZE) < 0.05, 255, gt).astype(np.uint8)
        pairs.append((torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt)))
    return pairs


def repeated(measure, repeats):
    """(median, min) seconds of ``repeats`` calls of ``measure() -> seconds``."""
    times = [measure() for _ in range(repeats)]
    return statistics.median(times), min(times)


def time_semantic(evaluator_factory, pairs, num_images):
    """Seconds to update ``num_images`` images one by one and compute."""
    evaluator = evaluator_factory()
    start = time.perf_counter()
    for i in range(num_images):
        pred, gt = pairs[i % len(pairs)]
        evaluator.update(pred, gt)
    evaluator.compute()
    return time.perf_counter() - start


def time_torchmetrics(pairs, num_images, num_classes):
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=255)
    start = time.perf_counter()
    for i in range(num_images):
        pred, gt = pairs[i % len(pairs)]
        metric.update(pred, gt.long())
    metric.compute()
    return time.perf_counter() - start


def panoptic_image(rng, categories, num_segments=40):
    """(id map int64 [H, W], segments_info) with stuff background blocks and thing blobs."""
    cat_ids = [c["id"] for c in categories]
    labels = _blocky_labels(rng, COCO_SIZE, num_segments, block=64) + 1
    segments = [{"id": i * 97 + 1000, "category_id": int(rng.choice(cat_ids)), "iscrowd": 0}
                for i in range(1, num_segments + 1)]
    id_map = np.where(rng.random(COCO_SIZE) < 0.03, 0, labels * 97 + 1000)
    id_map[labels == 1] = 0  # a void segment-sized region
    areas = dict(zip(*np.unique(id_map, return_counts=True)))
    segments = [{**s, "area": int(areas[s["id"]])} for s in segments if s["id"] in areas]
    return id_map, segments


def perturbed_prediction(rng, id_map, segments, categories):
    """Shifted map with ~1/4 of the segments relabelled."""
    pred = np.roll(id_map, shift=(int(rng.integers(0, 24)), int(rng.integers(0, 24))), axis=(0, 1))
    info = [{"id": s["id"], "category_id": s["category_id"]} for s in segments]
    for seg in info:
        if rng.random() < 0.25:
            seg["category_id"] = int(rng.choice([c["id"] for c in categories]))
    present = set(np.unique(pred).tolist())
    return pred, [s for s in info if s["id"] in present]


def write_panoptic(folder: pathlib.Path, name, images, categories):
    """COCO panoptic files folder/name.json + folder/name/*.png."""
    (folder / name).mkdir()
    annotations = []
    for image_id, (id_map, segments) in enumerate(images):
        file_name = f"{image_id:012d}.png"
        rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / name / file_name)
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return str(path)


def bench_panoptic(rng, num_images, repeats):
    categories = [{"id": i, "isthing": int(i <= 80)} for i in range(1, 134)]
    gt_images = [panoptic_image(rng, categories) for _ in range(POOL)]
    pred_images = [perturbed_prediction(rng, m, s, categories) for m, s in gt_images]
    results = {}

    def in_memory():
        evaluator = PanopticEvaluator(categories)
        start = time.perf_counter()
        for i in range(num_images):
            (gt_map, gt_info), (pred_map, pred_info) = gt_images[i % POOL], pred_images[i % POOL]
            evaluator.update(pred_map, pred_info, gt_map, gt_info)
        evaluator.compute()
        return time.perf_counter() - start

    results["panoptic in-memory (ours)"] = repeated(in_memory, repeats)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        files_gt = [gt_images[i % POOL] for i in range(num_images)]
        files_pred = [pred_images[i % POOL] for i in range(num_images)]
        gt_json = write_panoptic(tmp, "gt", files_gt, categories)
        pred_json = write_panoptic(tmp, "pred", files_pred, categories)
        outputs = {}

        def files(name, compute):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # panopticapi prints per-core progress
                outputs[name] = compute(gt_json, pred_json)
            return time.perf_counter() - start

        results["panoptic pq_compute files (ours)"] = repeated(lambda: files("ours", pq_compute), repeats)
        try:
            from panopticapi.evaluation import pq_compute as reference_pq_compute
        except ImportError:
            return results, None
        results["panoptic pq_compute files (panopticapi)"] = repeated(
            lambda: files("theirs", reference_pq_compute), repeats)
        ours, theirs = outputs["ours"], outputs["theirs"]
    max_diff = max(abs(ours[group][key] - theirs[group][key])
                   for group in ("All", "Things", "Stuff") for key in ("pq", "sq", "rq"))
    return results, max_diff


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device of the semantic inputs (panoptic: CPU)")
    parser.add_argument("--semantic-images", type=int, default=2000)
    parser.add_argument("--torchmetrics-images", type=int, default=200,
                        help="images for the torchmetrics reference (extrapolated per image)")
    parser.add_argument("--panoptic-images", type=int, default=200)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    k, reps = args.num_classes, args.repeats
    pairs = [(p.to(args.device), g.to(args.device)) for p, g in semantic_inputs(rng, k)]
    n_sem, n_tm = args.semantic_images, args.torchmetrics_images
    timings = [  # (evaluator, images, (median s, min s))
        ("semantic mIoU (ours)", n_sem,
         repeated(lambda: time_semantic(lambda: SemanticEvaluator(k), pairs, n_sem), reps)),
        ("semantic PQ^St (ours)", n_sem,
         repeated(lambda: time_semantic(lambda: SemanticPQEvaluator(k), pairs, n_sem), reps)),
        ("semantic mIoU (torchmetrics)", n_tm, repeated(lambda: time_torchmetrics(pairs, n_tm, k), reps)),
    ]
    panoptic, max_diff = bench_panoptic(rng, args.panoptic_images, reps)
    timings += [(name, args.panoptic_images, times) for name, times in panoptic.items()]

    rows = [{"evaluator": name, "images": images, "median_s": median, "min_s": fastest,
             "ms_per_image": 1000 * median / images, "s_per_2000": 2000 * median / images}
            for name, images, (median, fastest) in timings]
    columns = ["evaluator", "images", "median_s", "min_s", "ms_per_image", "s_per_2000"]
    extra = {"args": vars(args), "semantic_size": ADE_SIZE, "panoptic_size": COCO_SIZE,
             "panopticapi_max_abs_diff": max_diff}
    path = args.json or result_path("evaluation", args.device)
    print(write_results(path, rows, args.device, columns, extra))
    if max_diff is not None:
        print(f"max |ours - panopticapi| over All/Things/Stuff PQ, SQ, RQ: {max_diff:.2e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
