"""CPU latency of one image through every way to run a model, side by side in one process:
eager (``predict --checkpoint``: the model + the torch reference post-processing), the
AOTInductor package (``.pt2``), onnxruntime (``.onnx``) and, for Mask2Former, transformers'
``Mask2FormerForUniversalSegmentation`` with its image processor's post-processing and the same
weights (ours is converted from it, as ``bench_train_step.py`` does).

    python benchmarks/bench_export.py [--cases PRESET:TASK[,TASK] ...] [--runtimes ...] [--threads 2]
    python benchmarks/bench_export.py --toy          # the demo's tiny MaskFormer (the old default)
    python benchmarks/bench_export.py --device cuda --batch 1 8   # GPU: pt2 compiled for CUDA, onnxruntime-gpu

``--batch B`` times B images per call: one batched ``predict`` call in eager, B calls of the
single-image programs (exported files and transformers' pipeline are per image), reported
as images/s too.

Default cases: the R50 presets at their real test sizes (shortest edge 512 for ADE20K, 800 for
COCO): ``ade20k-150-r50:semantic`` (MaskFormer), ``mask2former-ade20k-150-r50:semantic``,
``mask2former-coco-panoptic-r50:panoptic`` and ``mask2former-coco-instance-r50:instance``.
Random weights (the latency does not depend on them; the panoptic query threshold is 0 by
default so that eager, which skips the masks of dropped queries, computes what the
static-shape programs always compute). The image defaults to the first real COCO photo of
``../shared/data/coco_panoptic_sample`` (640 x 427), test-resized as ``predict`` does; outputs
at 640 x 427. The runtimes run in turn, ``--repeats`` rounds after ``--warmup`` rounds
(medians). Export and compile times are reported beside. Writes
``benchmarks/results/cpu-export-<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "coco_panoptic_sample" / "input_images" / "000000142238.jpg"
DEFAULT_CASES = ["ade20k-150-r50:semantic", "mask2former-ade20k-150-r50:semantic",
                 "mask2former-coco-panoptic-r50:panoptic", "mask2former-coco-instance-r50:instance"]
RUNTIMES = ("eager", "transformers", "onnxruntime", "pt2")


def interleaved(runs: dict, repeats: int, warmup: int = 3) -> dict:
    """Wall times (ms) of each callable, run in turn ``repeats`` times after ``warmup`` rounds:
    on a shared machine a burst of load then slows every runtime alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def parse_case(text: str) -> tuple[str, list[str]]:
    preset, _, tasks = text.partition(":")
    return preset, (tasks.split(",") if tasks else ["semantic"])


def hf_runner(hf_model, cfg, metadata, task: str, batch, size):
    """transformers' forward + its image processor's post-processing of ``task`` (the pipeline a
    transformers user runs), on our preprocessed batch (same normalisation and padding)."""
    import torch
    from transformers import Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor()
    stuff = {c for c in range(metadata.num_classes) if c not in set(metadata.thing_classes)}

    def run():
        with torch.no_grad():
            out = hf_model(pixel_values=batch)
        if task == "semantic":
            return processor.post_process_semantic_segmentation(out, target_sizes=[size])
        if task == "panoptic":
            return processor.post_process_panoptic_segmentation(
                out, threshold=cfg.test.object_mask_threshold, overlap_mask_area_threshold=cfg.test.overlap_threshold,
                label_ids_to_fuse=stuff, target_sizes=[size])
        return processor.post_process_instance_segmentation(out, threshold=0.0, return_binary_maps=True,
                                                            target_sizes=[size])

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="PRESET:TASK[,TASK...]")
    p.add_argument("--toy", action="store_true", help="the demo's tiny MaskFormer (133 COCO classes, 128 px test size)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--image", default=str(PHOTO), help="an image file (default: a real COCO photo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (pt2 compiled for it; onnxruntime's CUDA provider)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="images per timed call")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads for every runtime (default 2: this machine's cores)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--object-mask-threshold", type=float, default=0.0,
                   help="panoptic query threshold (default 0: a random model keeps no query at the presets' 0.8, "
                        "and eager would skip the masks the static-shape programs always compute)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch: the AOTInductor kernels use OpenMP

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train_step import base_models
    from common import _quantile, report, result_path

    import fastmaskformer as fmf
    from fastmaskformer.data import get_metadata
    from fastmaskformer.engine.demo import demo_config
    from fastmaskformer.engine.export import ExportedModel, export_program
    from fastmaskformer.engine.predictor import Predictor, infer, load_image, resize_image

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def synced(fn):
        def run():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return run

    image = load_image(args.image)
    size = (int(image.shape[1]), int(image.shape[2]))
    rows, compile_s = [], {}
    cases = [("demo-maskformer", ["semantic", "panoptic"])] if args.toy else [parse_case(c) for c in args.cases]
    for preset, tasks in cases:
        if preset == "demo-maskformer":
            cfg = demo_config("unused")
            cfg.model.num_classes, cfg.data.dataset = 133, "coco-panoptic"
            torch.manual_seed(0)
            model, hf_model = fmf.build_model(cfg.model), None
        else:
            cfg = fmf.get_config(preset)
            model, hf_model = base_models(cfg)
        model.eval()
        cfg.test.object_mask_threshold = args.object_mask_threshold
        metadata = get_metadata(cfg.data.dataset)
        resized = resize_image(image, Predictor(model, cfg, metadata)._test_size(*size))
        for task in tasks:
            single = {}  # runtime -> one image's call
            if "transformers" in args.runtimes and hf_model is not None:
                batch, _ = model.preprocess([resized])
                single["transformers"] = hf_runner(hf_model.to(device).eval(), cfg, metadata, task, batch.to(device),
                                                   size)
            with tempfile.TemporaryDirectory() as tmp:
                for runtime, fmt in (("onnxruntime", "onnx"), ("pt2", "pt2")):
                    if runtime not in args.runtimes:
                        continue
                    start = time.perf_counter()
                    path = export_program(model, cfg, metadata, task, fmt, pathlib.Path(tmp) / f"m.{fmt}",
                                          device=args.device if fmt == "pt2" else "cpu")
                    compile_s[f"{preset} {task} {fmt}"] = round(time.perf_counter() - start, 1)
                    exported = ExportedModel(path)
                    if fmt == "onnx":
                        import onnxruntime as ort

                        options = ort.SessionOptions()
                        options.intra_op_num_threads = options.inter_op_num_threads = args.threads
                        provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
                        if provider not in ort.get_available_providers():
                            print(f"onnxruntime has no {provider} (pip install onnxruntime-gpu): skipped")
                            continue
                        exported._session = ort.InferenceSession(str(path), options, providers=[provider])
                    single[runtime] = (lambda exported=exported: exported(resized, size))
                model.to(device)
                for batch_size in args.batch:
                    runs = {}
                    if "eager" in args.runtimes:
                        def eager(task=task, n=batch_size):
                            with torch.no_grad():
                                return infer(model, [resized] * n, [size] * n, cfg.test, (task,),
                                             metadata.thing_classes)

                        runs["eager"] = synced(eager)
                    for name, fn in single.items():
                        runs[name] = synced(lambda fn=fn, n=batch_size: [fn() for _ in range(n)])
                    times = interleaved(runs, args.repeats, args.warmup)
                    base = statistics.median(times["eager"]) if "eager" in times else None
                    for name, ts in times.items():
                        median = statistics.median(ts)
                        rows.append({"preset": preset, "arch": cfg.model.meta_arch, "task": task, "runtime": name,
                                     "batch": batch_size, "input": f"{resized.shape[2]}x{resized.shape[1]}",
                                     "output": f"{size[1]}x{size[0]}", "median_ms": median,
                                     "p20_ms": _quantile(ts, 0.2), "p80_ms": _quantile(ts, 0.8), "repeats": len(ts),
                                     "images_per_s": batch_size / median * 1e3,
                                     "x_eager": base / median if base else None})
                    print(rows[-len(times):], flush=True)
                model.cpu()
        del model, hf_model
    columns = ["preset", "task", "runtime", "batch", "input", "output", "median_ms", "p20_ms", "p80_ms",
               "images_per_s", "x_eager"]
    path = args.json or result_path("export", device)
    report(path, rows, device, columns, {"weights": "random (transformers' Mask2Former converted to ours where present)",
                                        "threads": args.threads, "image": pathlib.Path(args.image).name,
                                        "object_mask_threshold": args.object_mask_threshold,
                                        "export_and_compile_s": compile_s})


if __name__ == "__main__":
    main()
