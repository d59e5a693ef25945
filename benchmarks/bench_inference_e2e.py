"""End-to-end inference: model forward + semantic (K = 150, 847) or panoptic post-processing,
images/s and peak memory, reference torch ops vs fused Triton kernels, side by side.

GPU:  python benchmarks/bench_inference_e2e.py --device cuda --size 512 --batch 16
CPU:  python benchmarks/bench_inference_e2e.py --device cpu --size 128 --batch 2
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import measure, report, result_path  # noqa: E402

import fastmaskformer as fmf  # noqa: E402
from fastmaskformer import ops  # noqa: E402


def infer(model, images, task: str, impl: str, amp: bool):
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(images)
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    last = (out.class_logits[-1].float(), out.mask_embed[-1].float(), ops.final_pixel_embed(out.pixel_embed).float())
    if task == "semantic":
        return ops.semantic_inference(*last, sizes, impl=impl)
    return ops.panoptic_inference(*last, sizes, object_mask_threshold=0.0, thing_classes=range(80), impl=impl)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="ade20k-150-r50")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--classes", type=int, nargs="+", default=[150, 847])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model forward")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    impls = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rows = []
    for num_classes in args.classes:
        cfg = fmf.get_config(args.preset)
        cfg.model.num_classes = num_classes
        cfg.model.backbone.img_size = args.size
        torch.manual_seed(0)
        model = fmf.build_model(cfg.model).to(device).eval()
        for task in ("semantic", "panoptic"):
            for impl in impls:
                timing = measure(lambda: infer(model, images, task, impl, args.amp), device, warmup=1,
                                 repeats=args.repeats)
                rows.append({"task": task, "K": num_classes, "impl": impl, "batch": args.batch, "size": args.size,
                             **timing, "images_per_s": args.batch / (timing["median_ms"] / 1e3)})
        del model
    columns = ["task", "K", "impl", "batch", "size", "median_ms", "images_per_s", "peak_mem_mib"]
    path = args.json or result_path("inference-e2e", device)
    report(path, rows, device, columns, {"args": vars(args)})


if __name__ == "__main__":
    main()
