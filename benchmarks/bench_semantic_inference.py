"""Semantic inference (DESIGN 4, 7): eager vs torch.compile vs fused, time / peak memory / images/s.

    # GPU (H100), the full sweep; fits one 10-minute call:
    python benchmarks/bench_semantic_inference.py --device cuda --json benchmarks/results/h100-semantic-inference-DATE.json
    # CPU, small sizes (the fused provider is then a K-streaming torch stand-in, see below):
    python benchmarks/bench_semantic_inference.py --device cpu --json benchmarks/results/cpu-semantic-inference-DATE.json

Providers, side by side in one process on the same inputs (labels are checked against eager's
on the pixels whose eager top-2 margin exceeds the precision's tolerance before timing: 1e-5,
or 4e-3 of the top score for tf32):
- ``eager``: ``ops.semantic_inference(impl="torch")``, the official per-image loop: mask logits
  upsampled to the padded input ``[Q,Hp,Wp]``, sigmoid, ``einsum`` with the class probabilities
  into ``[K,Hp,Wp]``, crop, resize, argmax.
- ``compile``: the same per-image body (``semantic_scores_reference`` + max) ``torch.compile``-d.
- ``fused``: on CUDA the Triton kernel (``impl="triton"``) with its default tf32 class sum, and
  ``fused-tf32x3`` (3-pass tf32 tensor-core products, ~fp32 accuracy) and ``fused-ieee`` (exact
  fp32 products on the CUDA cores). On a CPU
  the interpreter is no performance path, so ``fused`` is ``k-stream-torch``: the reference
  written to stream the classes in blocks of 64 with a running argmax (``[Q,Hp,Wp]`` masks and a
  ``[64,H,W]`` block alive, never ``[K,H,W]``) - a stand-in for the memory behaviour, labelled.

Sizes: Q=100, C=256, outputs 512x512, 512x683 (ADE20K-like), 1024x2048 (Cityscapes), the
image at its original size inside a /32-padded input; K in {19, 150, 847}; batch 1 and 16 on a
GPU (``--quick``: K in {150, 847}, batch 1 and 16, 512x683 and 1024x2048). On a CPU: outputs
128x128 and 128x171, batch 1. Reported: median ms (``triton.testing.do_bench`` on CUDA,
perf_counter median after warm-up on CPU), peak memory above the inputs (CUDA
``max_memory_allocated`` delta; not measured on CPU), images/s.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from common import compare_to_baseline, measure, report, result_path
from fastmaskformer import ops
from fastmaskformer.ops.inference import crop_and_resize, semantic_scores_reference
from fastmaskformer.ops.mask_logits import mask_logits_reference

COLUMNS = ["provider", "batch", "K", "output", "median_ms", "speedup_vs_eager", "peak_mem_mib",
           "mem_ratio_vs_eager", "images_per_s"]
# provider -> (absolute margin, margin relative to the top score) above which labels must agree
MARGINS = {"fused": (0.0, 4e-3)}
DEFAULT_MARGIN = (1e-5, 0.0)


def time_ms(fn, device) -> dict:
    """Median time (do_bench on CUDA) and, on CUDA, the peak memory above the inputs (MiB)."""
    if torch.device(device).type != "cuda":
        return measure(fn, device, warmup=1, repeats=3)
    import triton

    median, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5, 0.2, 0.8])
    peak = measure(fn, device, warmup=0, repeats=1)["peak_mem_mib"]
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_mib": peak}


def _labels_and_score(class_logits, mask_embed, pixel_embed, image_size, output_size):
    """One image of the reference: -> (score [H,W], labels [H,W])."""
    return semantic_scores_reference(class_logits, mask_embed, pixel_embed, image_size, output_size).max(0)


@torch.no_grad()
def k_stream_torch(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, block=64):
    """CPU stand-in for the fused kernel: per image, the classes in blocks of ``block`` with a
    running (max, argmax); temporaries [Q,Hp,Wp] masks + [block,H,W] scores, never [K,H,W]."""
    padded = (4 * pixel_embed.shape[-2], 4 * pixel_embed.shape[-1])
    results = []
    for b in range(class_logits.shape[0]):
        masks = mask_logits_reference(mask_embed[b][None], pixel_embed[b][None], padded)[0].sigmoid()
        probs = class_logits[b].float().softmax(-1)[:, :-1]
        best = labels = None
        for k0 in range(0, probs.shape[1], block):
            scores = torch.einsum("qk,qhw->khw", probs[:, k0:k0 + block], masks)
            top, idx = crop_and_resize(scores, image_sizes[b], output_sizes[b]).max(0)
            if best is None:
                best, labels = top, idx
            else:
                better = top > best  # strict: the first class wins exact ties, like argmax
                best, labels = torch.where(better, top, best), torch.where(better, idx + k0, labels)
        results.append(labels)
    return results


def providers(device) -> dict:
    """name -> fn(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes) -> list of labels."""
    compiled = torch.compile(_labels_and_score)

    def compiled_loop(cl, me, pe, sizes, outs):
        return [compiled(cl[b], me[b], pe[b], sizes[b], outs[b])[1] for b in range(cl.shape[0])]

    out = {
        "eager": lambda cl, me, pe, sizes, outs: ops.semantic_inference(cl, me, pe, sizes, outs, impl="torch"),
        "compile": compiled_loop,
    }
    if torch.device(device).type == "cuda":
        from fastmaskformer.kernels import semantic as kernel

        out["fused"] = lambda cl, me, pe, sizes, outs: kernel.semantic_inference(cl, me, pe, sizes, outs, False)
        for precision in ("tf32x3", "ieee"):
            out[f"fused-{precision}"] = lambda cl, me, pe, sizes, outs, precision=precision: \
                kernel.semantic_inference(cl, me, pe, sizes, outs, False, precision=precision)
    else:
        out["k-stream-torch (CPU stand-in for fused)"] = k_stream_torch
    return out


def check_labels(labels, inputs, name):
    """Labels must equal the reference's where its top-2 margin exceeds the provider's MARGINS."""
    class_logits, mask_embed, pixel_embed, sizes, outs = inputs
    absolute, relative = MARGINS.get(name, DEFAULT_MARGIN)
    for b, got in enumerate(labels):
        scores = semantic_scores_reference(class_logits[b], mask_embed[b], pixel_embed[b], sizes[b], outs[b])
        top = scores.topk(min(2, scores.shape[0]), dim=0).values
        margin = top[0] - top[1] if scores.shape[0] > 1 else torch.full_like(top[0], float("inf"))
        decided = margin > absolute + relative * top[0].abs()
        if not torch.equal(got[decided], scores.argmax(0)[decided]):
            raise AssertionError(f"{name}: labels differ from the reference on decided pixels")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--json", default=None,
                   help="output JSON (default benchmarks/results/<device>-semantic-inference-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # eager/compile in true fp32, like the fused default
        sizes = [(512, 683), (1024, 2048)] if args.quick else [(512, 512), (512, 683), (1024, 2048)]
        classes = (150, 847) if args.quick else (19, 150, 847)
        batches = (1, 16)
    else:
        sizes, classes, batches = [(128, 128), (128, 171)], (19, 150, 847), (1,)
    queries, channels = 100, 256
    funcs = providers(device)
    rows = []
    for (height, width), k, batch in itertools.product(sizes, classes, batches):
        torch.manual_seed(0)
        h, w = -(-height // 32) * 8, -(-width // 32) * 8  # the /32-padded input at stride 4
        class_logits = torch.randn(batch, queries, k + 1, device=device) * 3
        mask_embed = torch.randn(batch, queries, channels, device=device) / channels ** 0.5 * 3
        pixel_embed = torch.randn(batch, channels, h, w, device=device)
        inputs = (class_logits, mask_embed, pixel_embed, [(height, width)] * batch, [(height, width)] * batch)
        # Check one image (the reference's K x H x W scores for 16 Cityscapes images are not needed).
        one = tuple(t[:1] for t in inputs[:3]) + tuple(s[:1] for s in inputs[3:])
        for name, fn in funcs.items():
            check_labels(fn(*one), one, name)
            result = time_ms(lambda: fn(*inputs), device)
            row = {"provider": name, "batch": batch, "K": k, "output": f"{height}x{width}", "Q": queries,
                   "C": channels, **result, "images_per_s": batch / (result["median_ms"] * 1e-3)}
            rows.append(row)
            compare_to_baseline(row, rows, ("batch", "K", "output"))
            print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(args.json or result_path("semantic-inference", device), rows, device, COLUMNS, {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
