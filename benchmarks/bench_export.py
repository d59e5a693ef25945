"""CPU latency of one image through the three ways to run a model: eager (``predict
--checkpoint``: the model + the torch reference post-processing), the AOTInductor package
(``.pt2``) and onnxruntime (``.onnx``), same image, same process, median of repeats.

    python benchmarks/bench_export.py [--image PHOTO] [--tasks semantic panoptic] [--threads 2]

Model: the demo's ResNet-18 MaskFormer (``fastmaskformer.engine.demo.demo_config``: 24
queries, widths 64, 2 decoder layers, 133 COCO panoptic classes here), random weights (the
latency does not depend on them), test size 128 px shortest edge. The three runtimes run in
turn, ``--repeats`` rounds after 3 warm-up rounds; medians. The image defaults to the
first real COCO photo of ``../shared/data/coco_panoptic_sample`` (640 x 480, resized to 170 x
128, outputs at 640 x 480). Writes ``benchmarks/results/cpu-export-<date>.{json,md}``.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=str(PHOTO), help="an image file (default: a real COCO photo)")
    p.add_argument("--tasks", nargs="+", default=["semantic", "panoptic"], choices=("semantic", "panoptic"))
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for all three runtimes (default 1: on a busy shared machine more OpenMP "
                        "threads than free cores stall eager and pt2)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--object-mask-threshold", type=float, default=0.0,
                   help="panoptic query threshold (default 0: a random model keeps no query at the demo's 0.5, "
                        "and eager would skip the masks the static-shape programs always compute)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch: the AOTInductor kernels use OpenMP

    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import _quantile, report, result_path

    from fastmaskformer.data import get_metadata
    from fastmaskformer.engine.demo import demo_config
    from fastmaskformer.engine.export import ExportedModel, export_program
    from fastmaskformer.engine.predictor import Predictor, infer, load_image, resize_image
    from fastmaskformer.modeling import build_model

    torch.set_num_threads(args.threads)
    cfg = demo_config("unused")
    cfg.model.num_classes = 133
    cfg.data.dataset = "coco-panoptic"
    cfg.test.object_mask_threshold = args.object_mask_threshold
    metadata = get_metadata("coco-panoptic")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    image = load_image(args.image)
    size = (int(image.shape[1]), int(image.shape[2]))
    resized = resize_image(image, Predictor(model, cfg, metadata)._test_size(*size))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            files = {fmt: export_program(model, cfg, metadata, task, fmt, pathlib.Path(tmp) / f"m.{fmt}")
                     for fmt in ("pt2", "onnx")}
            pt2 = ExportedModel(files["pt2"])
            onnx = ExportedModel(files["onnx"])
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = args.threads
            onnx._session = ort.InferenceSession(str(files["onnx"]), options, providers=["CPUExecutionProvider"])

            def eager():
                with torch.no_grad():
                    return infer(model, [resized], [size], cfg.test, (task,), metadata.thing_classes)

            runs = {"eager": eager, "pt2": lambda: pt2(resized, size), "onnxruntime": lambda: onnx(resized, size)}
            times = interleaved(runs, args.repeats)
            base = statistics.median(times["eager"])
            for name, ts in times.items():
                rows.append({"task": task, "runtime": name, "input": f"{resized.shape[2]}x{resized.shape[1]}",
                             "output": f"{size[1]}x{size[0]}", "median_ms": statistics.median(ts),
                             "p20_ms": _quantile(ts, 0.2), "p80_ms": _quantile(ts, 0.8), "repeats": len(ts),
                             "x_eager": base / statistics.median(ts)})
    columns = ["task", "runtime", "input", "output", "median_ms", "p20_ms", "p80_ms", "x_eager"]
    path = args.json or result_path("export", "cpu")
    report(path, rows, "cpu", columns, {"model": "demo ResNet-18 MaskFormer, 133 classes, random weights",
                                        "threads": args.threads, "image": pathlib.Path(args.image).name,
                                        "object_mask_threshold": args.object_mask_threshold})


if __name__ == "__main__":
    main()
