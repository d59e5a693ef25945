"""Panoptic inference (DESIGN 4, 7): eager vs torch.compile vs fused, time / peak memory / images/s.

    # GPU (H100), the full sweep; fits one 10-minute call:
    python benchmarks/bench_panoptic_inference.py --device cuda --json benchmarks/results/h100-panoptic-inference-DATE.json
    # CPU, small sizes (the fused provider is then a chunked torch stand-in, see below):
    python benchmarks/bench_panoptic_inference.py --device cpu --json benchmarks/results/cpu-panoptic-inference-DATE.json

Providers, side by side in one process on the same inputs (id maps and segments_info are
checked against eager's before timing):
- ``eager``: ``ops.panoptic_inference(impl="torch")``: per image, the kept queries' logits
  upsampled to the padded input, cropped and resized (``[k,H,W]``), sigmoid, argmax, counts.
- ``compile``: the same with the per-pixel part (``panoptic_assign_reference``) ``torch.compile``-d.
- ``fused``: on CUDA the Triton kernel (``impl="triton"``): ids and per-query counts straight
  from the low-res logits, nothing of size ``k x H x W``. On a CPU the interpreter is no
  performance path, so ``fused`` is ``row-chunk-torch``: the reference's per-pixel part over
  blocks of 64 output rows (``[k,64,W]`` alive) - a stand-in for the memory behaviour, labelled.

Sizes: Q=100, C=256, about half the queries kept; outputs 512x512, 512x683, 1024x2048; K in
{19, 150, 847} (only the class softmax depends on K); batch 1 and 16 on a GPU (``--quick``: K=150,
512x683 and 1024x2048). On a CPU: outputs 128x128 and 128x171, batch 1, K in {19, 150}.
Reported: median ms (``triton.testing.do_bench`` on CUDA, perf_counter median after warm-up on
CPU), peak memory above the inputs (CUDA ``max_memory_allocated`` delta), images/s.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from bench_semantic_inference import time_ms
from common import compare_to_baseline, report, result_path
from fastmaskformer import ops
from fastmaskformer.ops import inference
from fastmaskformer.ops.mask_logits import mask_logits_reference

COLUMNS = ["provider", "batch", "K", "output", "median_ms", "speedup_vs_eager", "peak_mem_mib",
           "mem_ratio_vs_eager", "images_per_s"]
THRESHOLDS = dict(object_mask_threshold=0.8, overlap_threshold=0.8)


@torch.no_grad()
def row_chunk_assign(scores, mask_embed, pixel_embed, image_size, output_size, rows=64):
    """CPU stand-in for the fused assignment: the reference's per-pixel part over blocks of
    ``rows`` output rows. The upsampled [k,Hp,Wp] logits stay; the [k,H,W] ones never exist."""
    padded = (4 * pixel_embed.shape[-2], 4 * pixel_embed.shape[-1])
    logits = mask_logits_reference(mask_embed[None], pixel_embed[None], padded)[0]
    logits = logits[:, : image_size[0], : image_size[1]]
    height, width = output_size
    ids = torch.empty(height, width, dtype=torch.int64)
    full = torch.zeros(scores.shape[0], dtype=torch.int64)
    if tuple(logits.shape[-2:]) != (height, width):
        raise ValueError("the stand-in covers the benchmark's case: output size = image size")
    for y0 in range(0, height, rows):
        masks = logits[:, y0:y0 + rows].sigmoid()
        ids[y0:y0 + rows] = (scores[:, None, None] * masks).argmax(0)
        full += (masks >= 0.5).flatten(1).sum(1)
    return ids, torch.bincount(ids.flatten(), minlength=scores.shape[0]), full


def with_assign(assign):
    """ops.panoptic_inference(impl="torch") with its per-pixel part replaced by ``assign``."""
    def run(cl, me, pe, sizes, outs, thing_classes):
        original = inference.panoptic_assign_reference
        inference.panoptic_assign_reference = assign
        try:
            return ops.panoptic_inference(cl, me, pe, sizes, outs, thing_classes=thing_classes, impl="torch",
                                          **THRESHOLDS)
        finally:
            inference.panoptic_assign_reference = original
    return run


def providers(device) -> dict:
    """name -> fn(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, thing_classes)."""
    out = {
        "eager": lambda cl, me, pe, sizes, outs, things: ops.panoptic_inference(
            cl, me, pe, sizes, outs, thing_classes=things, impl="torch", **THRESHOLDS),
        # dynamic: the number of kept queries changes from image to image.
        "compile": with_assign(torch.compile(inference.panoptic_assign_reference, dynamic=True)),
    }
    if torch.device(device).type == "cuda":
        out["fused"] = lambda cl, me, pe, sizes, outs, things: ops.panoptic_inference(
            cl, me, pe, sizes, outs, thing_classes=things, impl="triton", **THRESHOLDS)
    else:
        out["row-chunk-torch (CPU stand-in for fused)"] = with_assign(row_chunk_assign)
    return out


def panoptic_inputs(batch, queries, classes, channels, h, w, device):
    """Random embeddings with spatially smooth masks; about half the queries confident."""
    class_logits = torch.randn(batch, queries, classes + 1, device=device)
    confident = torch.rand(batch, queries, device=device) < 0.5
    labels = torch.randint(0, classes, (batch, queries), device=device)
    class_logits.scatter_add_(2, labels[..., None], (confident.float() * 15)[..., None])
    mask_embed = torch.randn(batch, queries, channels, device=device) / channels ** 0.5 * 4
    low = torch.randn(batch, channels, max(1, h // 8), max(1, w // 8), device=device)
    pixel_embed = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return class_logits, mask_embed, pixel_embed


def same_result(got, ref) -> bool:
    return all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(got, ref))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--json", default=None,
                   help="output JSON (default benchmarks/results/<device>-panoptic-inference-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        sizes = [(512, 683), (1024, 2048)] if args.quick else [(512, 512), (512, 683), (1024, 2048)]
        classes = (150,) if args.quick else (19, 150, 847)
        batches = (1, 16)
    else:
        sizes, classes, batches = [(128, 128), (128, 171)], (19, 150), (1,)
    queries, channels = 100, 256
    funcs = providers(device)
    rows = []
    for (height, width), k, batch in itertools.product(sizes, classes, batches):
        torch.manual_seed(0)
        h, w = -(-height // 32) * 8, -(-width // 32) * 8  # the /32-padded input at stride 4
        cl, me, pe = panoptic_inputs(batch, queries, k, channels, h, w, device)
        things = set(range(k // 2))
        inputs = (cl, me, pe, [(height, width)] * batch, [(height, width)] * batch, things)
        reference = None
        for name, fn in funcs.items():
            out = fn(*inputs)
            if reference is None:
                reference = out
            elif not same_result(out, reference):
                # fp32 rounding may flip a pixel whose two best products tie within ~1e-6.
                agree = min((a[0] == b[0]).float().mean().item() for a, b in zip(out, reference))
                print(f"note: {name} id maps agree on {100 * agree:.5f}% of pixels", flush=True)
            result = time_ms(lambda: fn(*inputs), device)
            row = {"provider": name, "batch": batch, "K": k, "output": f"{height}x{width}", "Q": queries,
                   "C": channels, "segments": sum(len(r[1]) for r in out), **result,
                   "images_per_s": batch / (result["median_ms"] * 1e-3)}
            rows.append(row)
            compare_to_baseline(row, rows, ("batch", "K", "output"))
            print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(args.json or result_path("panoptic-inference", device), rows, device, COLUMNS, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
