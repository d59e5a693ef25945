"""Panoptic inference (DESIGN 4, 7): eager vs torch.compile vs fused, time / peak memory / images/s.

    # GPU (H100), the full sweep; fits one 10-minute call:
    python benchmarks/bench_panoptic_inference.py --device cuda --json benchmarks/results/h100-panoptic-inference-DATE.json
    # CPU, small sizes (the fused provider is then a chunked torch stand-in, see below):
    python benchmarks/bench_panoptic_inference.py --device cpu --json benchmarks/results/cpu-panoptic-inference-DATE.json

Providers, side by side in one process on the same inputs (id maps and segments_info are
checked against eager's before timing, and eager must find segments: see ``panoptic_inputs``):
- ``eager``: ``ops.panoptic_inference(impl="torch")``: per image, the kept queries' logits
  upsampled to the padded input, cropped and resized (``[k,H,W]``), sigmoid, argmax, counts.
- ``compile``: the same with the per-pixel part (``panoptic_assign_reference``) ``torch.compile``-d.
- ``fused``: on CUDA the Triton kernel (``impl="triton"``): ids and per-query counts straight
  from the low-res logits, nothing of size ``k x H x W``. On a CPU the interpreter is no
  performance path, so ``fused`` is ``row-chunk-torch``: the reference's per-pixel part over
  blocks of 64 output rows (``[k,64,W]`` alive) - a stand-in for the memory behaviour, labelled.

Sizes: Q=100, C=256, half the queries kept (up to 45 segments per image, fewer where stuff
segments merge); outputs 512x512, 512x683, 1024x2048; K in {19, 150, 847} (only the class
softmax depends on K); batch 1 and 16 on a GPU (``--quick``: K=150, 512x683 and 1024x2048). On a
CPU: outputs 128x128 and 128x171, batch 1, K in {19, 150}.
Reported: segments found (all images of the batch), median ms (``triton.testing.do_bench`` on
CUDA, perf_counter median after warm-up on CPU), peak memory above the inputs (CUDA
``max_memory_allocated`` delta), images/s.
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

COLUMNS = ["provider", "batch", "K", "output", "segments", "median_ms", "speedup_vs_eager", "peak_mem_mib",
           "mem_ratio_vs_eager", "images_per_s"]
THRESHOLDS = dict(object_mask_threshold=0.8, overlap_threshold=0.8)


@torch.no_grad()
def row_chunk_assign(scores, mask_embed, pixel_embed, image_size, output_size, input_size=None, rows=64):
    """CPU stand-in for the fused assignment, with ``panoptic_assign_reference``'s signature: its
    per-pixel part over blocks of ``rows`` output rows. The upsampled [k,Hp,Wp] logits stay; the
    [k,H,W] ones never exist."""
    padded = input_size or (4 * pixel_embed.shape[-2], 4 * pixel_embed.shape[-1])
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


def panoptic_inputs(batch, queries, classes, channels, h, w, device, seed=0):
    """Inputs whose panoptic output has real segments, drawn from a generator seeded with
    ``seed`` on ``device``: class_logits [B,Q,K+1], mask_embed [B,Q,C], pixel_embed [B,C,h,w].

    Per image, half the queries are kept (their class gets +15: probability > 0.99 up to
    K=847); the other half are random and fail the confidence test. Nine in ten kept queries own
    one region of a random Voronoi partition of the h x w grid: pixel embeddings carry one-hot
    region codes (channels 0..R-1, plus noise everywhere) and an owner's mask embedding is +L on
    its code and -L on the other codes (L in [4, 8)), so its mask logit is about +L inside its
    region and -L outside, with smooth boundaries once upsampled. Each remaining kept query
    duplicates a region with L = 2, loses it to the owner and fails the overlap test, as
    duplicate queries do. With ``things`` = half the classes, stuff segments of a class merge.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    kept = queries // 2
    regions = kept - kept // 10
    if regions > channels:
        raise ValueError(f"{regions} regions need as many channels, got {channels}")
    class_logits = torch.randn(batch, queries, classes + 1, generator=g, device=device)
    mask_embed = torch.randn(batch, queries, channels, generator=g, device=device) / channels ** 0.5
    pixel_embed = torch.randn(batch, channels, h, w, generator=g, device=device) * 0.02
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    grid = torch.stack([ys, xs], -1).reshape(-1, 2).float()
    # Kept query i owns region i (i < regions) or duplicates a random one.
    region = torch.cat([torch.arange(regions, device=device),
                        torch.randint(0, regions, (kept - regions,), generator=g, device=device)])
    code = torch.full((kept, regions), -1.0, device=device)
    code[torch.arange(kept, device=device), region] = 1.0
    for b in range(batch):
        chosen = torch.randperm(queries, generator=g, device=device)[:kept]
        labels = torch.randint(0, classes, (kept,), generator=g, device=device)
        class_logits[b, chosen, labels] += 15.0
        centres = torch.rand(regions, 2, generator=g, device=device) * torch.tensor([h, w], device=device)
        owner = torch.cdist(grid, centres).argmin(1).reshape(h, w)
        pixel_embed[b, :regions] += F.one_hot(owner, regions).permute(2, 0, 1)
        strength = torch.rand(kept, 1, generator=g, device=device) * 4 + 4
        strength[regions:] = 2.0
        mask_embed[b, chosen, :regions] = strength * code
    return class_logits, mask_embed, pixel_embed


def count_segments(results) -> int:
    return sum(len(segments) for _, segments in results)


def check_agreement(name: str, got, ref, max_flipped: float = 1e-4) -> None:
    """``got`` must have eager's segments_info exactly and its id maps on all but
    ``max_flipped`` of the pixels: fp32 rounding may flip a pixel whose two best products tie
    within ~1e-6 (a fused kernel forms the logits in another order)."""
    for i, ((ids, segments), (ref_ids, ref_segments)) in enumerate(zip(got, ref)):
        if segments != ref_segments:
            raise SystemExit(f"{name}: image {i}: segments_info differs from eager's")
        flipped = (ids != ref_ids).float().mean().item()
        if flipped > max_flipped:
            raise SystemExit(f"{name}: image {i}: id map differs from eager's on "
                             f"{100 * flipped:.4f}% of pixels")
        if flipped:
            print(f"note: {name}: image {i}: id map differs on {100 * flipped:.5f}% of pixels",
                  flush=True)


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
        h, w = -(-height // 32) * 8, -(-width // 32) * 8  # the /32-padded input at stride 4
        cl, me, pe = panoptic_inputs(batch, queries, k, channels, h, w, device)
        things = set(range(k // 2))
        inputs = (cl, me, pe, [(height, width)] * batch, [(height, width)] * batch, things)
        reference = None
        for name, fn in funcs.items():
            out = fn(*inputs)
            if reference is None:
                reference = out
                if not all(segments for _, segments in out):
                    raise SystemExit(f"{name}: an image without segments (K={k}, {height}x{width}): "
                                     "the comparison below would be vacuous")
            else:
                check_agreement(name, out, reference)
            result = time_ms(lambda: fn(*inputs), device)
            row = {"provider": name, "batch": batch, "K": k, "output": f"{height}x{width}", "Q": queries,
                   "C": channels, "segments": count_segments(out), **result,
                   "images_per_s": batch / (result["median_ms"] * 1e-3)}
            rows.append(row)
            compare_to_baseline(row, rows, ("batch", "K", "output"))
            print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(args.json or result_path("panoptic-inference", device), rows, device, COLUMNS, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
