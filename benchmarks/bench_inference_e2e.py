"""End-to-end inference: model forward + semantic (K = 150, 847) or panoptic post-processing,
images/s and peak memory, reference torch ops vs fused Triton kernels, side by side.

``--arch eomt``: an ``eomt-*`` preset (default ``eomt-coco-panoptic-dinov2-s-640``; ``--preset``
names another) with masking off (a trained model), ours (our EoMT + fused post-processing;
reference ops on the CPU) vs ``transformers`` (``EomtForUniversalSegmentation`` + its
``EomtImageProcessor`` post-processing), the same weights (ours converted from HF), semantic and
panoptic (every query kept: threshold 0, overlap 0.8 in both, so the whole post-processing runs).

GPU:  python benchmarks/bench_inference_e2e.py --device cuda --size 512 --batch 16
      python benchmarks/bench_inference_e2e.py --device cuda --arch eomt --preset eomt-coco-panoptic-dinov2-l-640 \
          --size 640 --batch 8 --classes 133 --amp
CPU:  python benchmarks/bench_inference_e2e.py --device cpu --size 128 --batch 2
      python benchmarks/bench_inference_e2e.py --device cpu --arch eomt --size 256 --batch 2 --classes 133
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_train_step import EOMT_DEFAULT_PRESET, base_models  # noqa: E402
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


def infer_transformers(model, processor, images, task: str, amp: bool):
    """transformers' EoMT forward + its image processor's post-processing (square inputs, no
    windows), thresholds as ``infer``'s."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(pixel_values=images)
    out.masks_queries_logits, out.class_queries_logits = out.masks_queries_logits.float(), out.class_queries_logits.float()
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    if task == "semantic":
        return processor.post_process_semantic_segmentation(out, target_sizes=sizes)
    return processor.post_process_panoptic_segmentation(out, target_sizes=sizes, threshold=0.0,
                                                        overlap_mask_area_threshold=0.8,
                                                        stuff_classes=list(range(80, model.config.num_labels)))


def eomt_rows(args, device, images) -> list[dict]:
    """Ours vs transformers' EoMT (same weights, masking off) for each K, semantic and panoptic."""
    from transformers import EomtImageProcessor

    rows = []
    for num_classes in args.classes:
        cfg = fmf.get_config(args.preset if args.preset.startswith("eomt-") else EOMT_DEFAULT_PRESET)
        cfg.model.num_classes, cfg.model.backbone.img_size = num_classes, args.size
        ours, hf = base_models(cfg)
        if hf is None:
            raise SystemExit(f"--arch eomt needs transformers and a DINOv2 EoMT preset, got {cfg.name}")
        with torch.no_grad():
            hf.attn_mask_probs.zero_()  # a trained model: no masks, no intermediate predictions
        ours.mask_annealing.probs = [0.0] * len(ours.mask_annealing.probs)
        ours, hf = ours.to(device).eval(), hf.to(device).eval()
        processor = EomtImageProcessor(size={"shortest_edge": args.size, "longest_edge": args.size})
        impl = "triton" if device.type == "cuda" else "torch"
        for task in ("semantic", "panoptic"):
            for provider, fn in (("ours", lambda: infer(ours, images, task, impl, args.amp)),
                                 ("transformers", lambda: infer_transformers(hf, processor, images, task, args.amp))):
                timing = measure(fn, device, warmup=1, repeats=args.repeats)
                rows.append({"task": task, "K": num_classes, "impl": provider if provider != "ours" else f"ours ({impl})",
                             "batch": args.batch, "size": args.size, **timing,
                             "images_per_s": args.batch / (timing["median_ms"] / 1e3)})
        del ours, hf
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=["maskformer", "eomt"], default="maskformer",
                   help=f"eomt: ours vs transformers' EoMT (an eomt-* --preset, default {EOMT_DEFAULT_PRESET})")
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
    rows = eomt_rows(args, device, images) if args.arch == "eomt" else []
    for num_classes in args.classes if args.arch != "eomt" else ():
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
    path = args.json or result_path("inference-e2e" + ("-eomt" if args.arch == "eomt" else ""), device)
    report(path, rows, device, columns, {"args": vars(args)})


if __name__ == "__main__":
    main()
