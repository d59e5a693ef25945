"""Evaluation speed and peak memory on the CPU, ours beside the references and hotcoco 1.3.0.

- Semantic: N ADE20K-size (512x683) predictions, K = 150, one image per update as in an
  evaluation loop. Peers: torchmetrics MulticlassJaccardIndex, hotcoco SemanticEval.
- Panoptic: COCO-size (480x640) id maps with ~40 segments, streamed in memory and through
  pq_compute on PNG + JSON files (both backends). Peers: panopticapi's pq_compute
  (multiprocessing over all cores) and hotcoco's pq_compute on the same files.
- Mask AP: COCO-size images with 15 GT objects (10% crowd), scored with coco_mask_ap (both
  backends) beside pycocotools' and hotcoco's own COCOeval "segm" (load results, evaluate,
  accumulate, summarize): the issue's case (100 images, 90 RLE detections each, 9000 in all) and
  a COCO-val-sized run (5000 images x 100 detections = 500k RLEs); plus the streaming
  InstanceEvaluator (encode bool masks image by image, then compute) on the first case.

    python benchmarks/bench_evaluation.py [--semantic-images 2000] [--panoptic-images 200]
        [--instance-images 100] [--coco-val-images 5000] [--sections semantic panoptic instance]

Each measurement is repeated (--repeats; the COCO-val-sized run --val-repeats) and the median
reported, with the minimum beside it: the cores may be shared. Peak memory: the rise of the
process's peak resident set during the timed calls (MiB; panopticapi's worker processes are not
counted). Prints a Markdown table and writes it with the JSON to
benchmarks/results/cpu-evaluation-<YYYY-MM-DD>.json / .md (--json to choose the path).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import measure, result_path, track_cpu_memory, write_results  # noqa: E402

from fastmaskformer.evaluation import (  # noqa: E402
    InstanceEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
    SemanticPQEvaluator,
    coco_mask_ap,
    pq_compute,
)
from fastmaskformer.evaluation.instance import encode_masks  # noqa: E402

ADE_SIZE = (512, 683)
COCO_SIZE = (480, 640)
SECTIONS = ["semantic", "panoptic", "instance"]
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


def timed(fn, repeats: int, warmup: int = 0) -> dict:
    """{"median_s", "p20_s", "peak_mib"} of ``repeats`` calls (common.measure, CPU peak RSS)."""
    m = measure(fn, "cpu", warmup=warmup, repeats=repeats)
    return {"median_s": m["median_ms"] / 1e3, "p20_s": m["p20_ms"] / 1e3, "peak_mib": m.get("peak_mem_mib")}


def bench_semantic(rng, args):
    k, n = args.num_classes, args.semantic_images
    cpu_pairs = semantic_inputs(rng, k)
    pairs = [(p.to(args.device), g.to(args.device)) for p, g in cpu_pairs]

    def ours(factory):
        def run():
            evaluator = factory()
            for i in range(n):
                evaluator.update(*pairs[i % POOL])
            return evaluator.compute()
        return run

    def torchmetrics_miou():
        from torchmetrics.classification import MulticlassJaccardIndex

        metric = MulticlassJaccardIndex(num_classes=k, average="macro", ignore_index=255)
        for i in range(n):
            pred, gt = pairs[i % POOL]
            metric.update(pred, gt.long())
        return float(metric.compute())

    numpy_pairs = [(p.numpy(), g.numpy()) for p, g in cpu_pairs]

    def hotcoco_miou():
        from hotcoco import semantic

        evaluation = semantic.SemanticEval(k, ignore_index=255)
        for i in range(n):
            pred, gt = numpy_pairs[i % POOL]
            evaluation.update(gt, pred)
        return evaluation.confusion()

    rows = [("semantic mIoU", "ours", ours(lambda: SemanticEvaluator(k))),
            ("semantic mIoU", "torchmetrics", torchmetrics_miou),
            ("semantic mIoU", "hotcoco", hotcoco_miou),
            ("semantic PQ^St", "ours", ours(lambda: SemanticPQEvaluator(k)))]
    if args.skip_torchmetrics:
        rows = [row for row in rows if row[1] != "torchmetrics"]
    return [(case, provider, n, timed(fn, args.repeats, warmup=1)) for case, provider, fn in rows]


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


def bench_panoptic(rng, args):
    n = args.panoptic_images
    categories = [{"id": i, "isthing": int(i <= 80)} for i in range(1, 134)]
    gt_images = [panoptic_image(rng, categories) for _ in range(POOL)]
    pred_images = [perturbed_prediction(rng, m, s, categories) for m, s in gt_images]

    def in_memory():
        evaluator = PanopticEvaluator(categories)
        for i in range(n):
            (gt_map, gt_info), (pred_map, pred_info) = gt_images[i % POOL], pred_images[i % POOL]
            evaluator.update(pred_map, pred_info, gt_map, gt_info)
        return evaluator.compute()

    rows = [("panoptic in-memory", "ours", n, timed(in_memory, args.repeats, warmup=1))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        gt_json = write_panoptic(tmp, "gt", [gt_images[i % POOL] for i in range(n)], categories)
        pred_json = write_panoptic(tmp, "pred", [pred_images[i % POOL] for i in range(n)], categories)
        outputs = {}

        def files(name, compute):
            def run():
                with contextlib.redirect_stdout(io.StringIO()):  # panopticapi prints progress
                    outputs[name] = compute(gt_json, pred_json)
            return run

        from hotcoco.panoptic import PanopticEval
        from panopticapi.evaluation import pq_compute as panopticapi_pq_compute

        def hotcoco_pq(gt_file, pred_file):
            evaluation = PanopticEval(gt_file, pred_file)
            evaluation.evaluate()
            return evaluation.results()

        providers = [("ours (hotcoco backend)", lambda g, p: pq_compute(g, p, backend="hotcoco")),
                     ("ours (reference backend)", lambda g, p: pq_compute(g, p, backend="reference")),
                     ("panopticapi", panopticapi_pq_compute), ("hotcoco", hotcoco_pq)]
        for name, compute in providers:
            rows.append(("panoptic pq_compute files", name, n, timed(files(name, compute), args.repeats, warmup=1)))
    theirs = outputs["panopticapi"]
    max_diff = {name: max(abs(outputs[name][g][key] - theirs[g][key])
                          for g in ("All", "Things", "Stuff") for key in ("pq", "sq", "rq"))
                for name, _ in providers}
    return rows, max_diff


def _blob(rng):
    """bool [H, W] COCO-size rectangle of a random COCO size class (small / medium / large)."""
    h, w = COCO_SIZE
    side = int(rng.choice([20, 60, 160]) * rng.uniform(0.6, 1.4))
    dy, dx = max(2, int(side * rng.uniform(0.6, 1.4))), max(2, side)
    y, x = int(rng.integers(0, h - min(dy, h - 1))), int(rng.integers(0, w - min(dx, w - 1)))
    mask = np.zeros(COCO_SIZE, bool)
    mask[y:y + dy, x:x + dx] = True
    return mask


def instance_pool(rng, num_objects=15, num_detections=100, num_categories=80):
    """POOL images: (GT [(RLE, category, crowd, area)], detections bool [D, H, W] masks, categories [D]).
    Detections are shifted GT objects (label kept 80% of the time) and random blobs."""
    pool = []
    for _ in range(POOL):
        gts = [(_blob(rng), int(rng.integers(1, num_categories + 1)), bool(rng.random() < 0.1))
               for _ in range(num_objects)]
        masks, labels = [], []
        for _ in range(num_detections):
            if rng.random() < 0.6:
                mask, label, _ = gts[int(rng.integers(num_objects))]
                mask = np.roll(mask, (int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), (0, 1))
                label = label if rng.random() < 0.8 else int(rng.integers(1, num_categories + 1))
            else:
                mask, label = _blob(rng), int(rng.integers(1, num_categories + 1))
            masks.append(mask)
            labels.append(label)
        gt = [(encode_masks(m[None])[0], c, crowd, float(m.sum())) for m, c, crowd in gts]
        pool.append((gt, np.stack(masks), np.array(labels)))
    return pool


def instance_case(rng, pool, num_images, num_detections, num_categories=80):
    """(COCO GT dict, result dicts) of ``num_images`` images cycling through ``pool``."""
    h, w = COCO_SIZE
    images, annotations, results = [], [], []
    encoded = [encode_masks(masks[:num_detections]) for _, masks, _ in pool]
    for image_id in range(1, num_images + 1):
        gt, _, labels = pool[image_id % POOL]
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        for rle, category, crowd, area in gt:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": rle, "area": area, "bbox": [0, 0, 0, 0], "iscrowd": int(crowd)})
        scores = rng.random(num_detections)
        for rle, label, score in zip(encoded[image_id % POOL], labels, scores):
            results.append({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                            "score": float(score)})
    categories = [{"id": c, "name": f"class {c}"} for c in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def pycocotools_segm(gt, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(x) for x in evaluation.stats[:6]]


def hotcoco_segm(gt, results):
    import hotcoco

    coco = hotcoco.COCO(gt)
    evaluation = hotcoco.COCOeval(coco, coco.load_res(results), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()  # prints the table, as pycocotools does
    return [float(x) for x in evaluation.stats[:6]]


def bench_instance(rng, args):
    pool = instance_pool(rng)
    rows, diffs = [], {}
    cases = [("mask AP", args.instance_images, args.instance_detections, args.repeats),
             ("mask AP COCO-val-sized", args.coco_val_images, 100, args.val_repeats)]
    for case, num_images, num_detections, repeats in cases:
        if num_images == 0:
            continue
        gt, results = instance_case(rng, pool, num_images, num_detections)
        stats = {}
        providers = [("ours (hotcoco backend)", lambda: coco_mask_ap(gt, results, backend="hotcoco")),
                     ("hotcoco", lambda: hotcoco_segm(gt, results)),
                     ("ours (reference backend)", lambda: coco_mask_ap(gt, results, backend="reference")),
                     ("pycocotools", lambda: pycocotools_segm(gt, results))]
        for name, fn in providers:
            if "hotcoco" not in name and case.endswith("sized") and args.skip_val_references:
                continue
            out = {}
            rows.append((f"{case} ({len(results)} RLEs)", name, num_images,
                         timed(lambda: out.setdefault("r", fn()), repeats)))
            r = out["r"]
            stats[name] = [r[k] / 100 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] \
                if isinstance(r, dict) else r
        reference = stats.get("pycocotools", stats["hotcoco"])
        diffs[case] = {name: max(abs(a - b) for a, b in zip(v, reference) if a == a and b == b)
                       for name, v in stats.items()}
        if case == "mask AP":
            rows += bench_instance_streaming(gt, pool, num_images, num_detections, repeats)
        del gt, results
    return rows, diffs


def bench_instance_streaming(gt, pool, num_images, num_detections, repeats):
    """The in-training path: bool masks [N, H, W] encoded image by image, then mask AP. Ours is
    InstanceEvaluator.update + compute; hotcoco's is mask.encode per image + its COCOeval."""
    import hotcoco

    def images():
        for image_id in range(1, num_images + 1):
            _, masks, labels = pool[image_id % POOL]
            yield image_id, masks[:num_detections], labels[:num_detections]

    def ours(backend):
        def run():
            evaluator = InstanceEvaluator(gt, list(range(1, 81)), backend=backend)
            for image_id, masks, labels in images():
                evaluator.update(image_id, masks, torch.linspace(1, 0, len(masks)), torch.from_numpy(labels - 1))
            return evaluator.compute()
        return run

    def hotcoco_streaming():
        results = []
        for image_id, masks, labels in images():
            rles = hotcoco.mask.encode(masks.transpose(1, 2, 0))
            results += [{"image_id": image_id, "category_id": int(label), "segmentation": rle, "score": float(score)}
                        for rle, label, score in zip(rles, labels, np.linspace(1, 0, len(masks)))]
        return hotcoco_segm(gt, results)

    case = f"encode masks + mask AP ({num_images * num_detections} masks)"
    providers = [("ours InstanceEvaluator (hotcoco backend)", ours("hotcoco")), ("hotcoco", hotcoco_streaming),
                 ("ours InstanceEvaluator (reference backend)", ours("reference"))]
    return [(case, name, num_images, timed(fn, repeats)) for name, fn in providers]


def main():
    track_cpu_memory()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device of our semantic inputs (everything else: CPU)")
    parser.add_argument("--semantic-images", type=int, default=2000)
    parser.add_argument("--panoptic-images", type=int, default=200)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--instance-images", type=int, default=100)
    parser.add_argument("--instance-detections", type=int, default=90)
    parser.add_argument("--coco-val-images", type=int, default=5000, help="0 skips the COCO-val-sized run")
    parser.add_argument("--skip-val-references", action="store_true",
                        help="COCO-val-sized run: time only the hotcoco providers")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS,
                        help="which cases to run (default all)")
    parser.add_argument("--skip-torchmetrics", action="store_true",
                        help="semantic: leave out torchmetrics (about 75 s a call on 2 cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--val-repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    timings, panoptic_diff, instance_diff = [], None, None
    if "semantic" in args.sections:
        timings += bench_semantic(rng, args)
    if "panoptic" in args.sections:
        panoptic, panoptic_diff = bench_panoptic(rng, args)
        timings += panoptic
    if "instance" in args.sections:
        instance, instance_diff = bench_instance(rng, args)
        timings += instance

    hotcoco_time = {case: t["median_s"] for case, provider, _, t in timings if provider == "hotcoco"}
    # hotcoco has no in-memory panoptic evaluator: its time from files (PNG decoding included)
    if "panoptic pq_compute files" in hotcoco_time:
        hotcoco_time["panoptic in-memory"] = hotcoco_time["panoptic pq_compute files"]
    rows = []
    for case, provider, images, t in timings:
        peer = hotcoco_time.get(case)  # PQ^St: no hotcoco counterpart
        rows.append({"case": case, "provider": provider, "images": images, **t,
                     "x_hotcoco": t["median_s"] / peer if peer else None})
    columns = ["case", "provider", "images", "median_s", "p20_s", "peak_mib", "x_hotcoco"]
    extra = {"args": vars(args), "semantic_size": ADE_SIZE, "coco_size": COCO_SIZE,
             "max_abs_diff_vs_panopticapi": panoptic_diff, "max_abs_diff_vs_pycocotools": instance_diff}
    path = args.json or result_path("evaluation", "cpu")
    print(write_results(path, rows, "cpu", columns, extra))
    print("max |x - panopticapi| over All/Things/Stuff PQ, SQ, RQ:", panoptic_diff)
    print("max |x - pycocotools| over the six AP numbers (fractions):", instance_diff)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
