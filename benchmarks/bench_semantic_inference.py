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

CPU memory (``--cpu-memory``, issue 17): K=847, Q=100, C=256, 512x683 images (input 512x704),
batch 1, 2, 4; each (provider, batch) in a fresh child process, which reports its peak RSS
(``VmHWM``; ``ru_maxrss`` would start at the parent's peak after exec) above the RSS once the
inputs exist, and the median time of a few calls:
- ``official``: the official MaskFormer post-processing (mask logits of the batch upsampled to
  the padded input, then per image softmax x sigmoid einsum into [K,Hp,Wp] and
  ``sem_seg_postprocess``; the list of [K,H,W] results is what the official model returns,
  argmax afterwards);
- ``untiled``: the previous ``impl="torch"`` loop (``semantic_scores_reference`` per image, the
  previous image's [K,H,W] scores still alive while the next is computed);
- ``eager``: ``ops.semantic_inference(impl="torch")``, now tiled over output rows
  (``semantic_labels_tiled``: O(K x tile x W) scores, bit-identical labels).
Labels of every provider are checked equal to the official's (batch 1) before measuring.

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

from common import compare_to_baseline, measure, report, result_path, status_mib
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


@torch.no_grad()
def official_postprocess(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes):
    """The official MaskFormer semantic post-processing (``MaskFormer.forward`` at inference):
    returns the list of [K, H, W] scores (``sem_seg``), argmax-ed by the caller."""
    import torch.nn.functional as F

    mask_pred = torch.einsum("bqc,bchw->bqhw", mask_embed, pixel_embed)  # the model's pred_masks
    padded = (4 * pixel_embed.shape[-2], 4 * pixel_embed.shape[-1])
    mask_pred = F.interpolate(mask_pred, size=padded, mode="bilinear", align_corners=False)
    processed = []
    for mask_cls, mask_pred_b, image_size, (height, width) in zip(class_logits, mask_pred, image_sizes, output_sizes):
        r = torch.einsum("qc,qhw->chw", F.softmax(mask_cls, dim=-1)[..., :-1], mask_pred_b.sigmoid())
        r = r[:, : image_size[0], : image_size[1]].expand(1, -1, -1, -1)  # sem_seg_postprocess
        processed.append(F.interpolate(r, size=(height, width), mode="bilinear", align_corners=False)[0])
    return processed


@torch.no_grad()
def untiled_loop(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes):
    """The previous ``impl="torch"`` loop: the reference's [K, H, W] per image, max over K."""
    results = []
    for b in range(class_logits.shape[0]):
        scores = semantic_scores_reference(class_logits[b], mask_embed[b], pixel_embed[b], image_sizes[b],
                                           output_sizes[b])
        results.append(scores.max(0)[1])
    return results


MEMORY_PROVIDERS = {
    "official": lambda *a: [r.argmax(0) for r in official_postprocess(*a)],
    "untiled": untiled_loop,
    "eager": lambda *a: ops.semantic_inference(*a, impl="torch"),
}


def memory_inputs(batch, k=847, queries=100, channels=256, size=(512, 683)):
    torch.manual_seed(0)
    h, w = -(-size[0] // 32) * 8, -(-size[1] // 32) * 8
    class_logits = torch.randn(batch, queries, k + 1) * 3
    mask_embed = torch.randn(batch, queries, channels) / channels ** 0.5 * 3
    pixel_embed = torch.randn(batch, channels, h, w)
    return class_logits, mask_embed, pixel_embed, [size] * batch, [size] * batch


def memory_child(provider, batch, repeats):
    """In a fresh process: peak RSS above the RSS with the inputs alive, then the median time."""
    import json
    import statistics
    import time

    inputs = memory_inputs(batch)
    fn = MEMORY_PROVIDERS[provider]
    base = status_mib("VmRSS")
    peak_before = status_mib("VmHWM")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        labels = fn(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) == 1:
            peak = status_mib("VmHWM")  # not ru_maxrss: after exec it starts at the parent's peak
        del labels
    print(json.dumps({"peak_rss_mib": peak - base, "median_ms": statistics.median(times), "repeats": repeats,
                      "rss_inputs_mib": base, "peak_rss_before_mib": peak_before}))


def check_memory_labels():
    one = memory_inputs(1)
    ref = MEMORY_PROVIDERS["official"](*one)
    for name, fn in MEMORY_PROVIDERS.items():
        if not all(torch.equal(a, b) for a, b in zip(fn(*one), ref)):
            raise AssertionError(f"{name}: labels differ from the official post-processing")


def cpu_memory_sweep(batches, repeats, json_path):
    import json
    import subprocess

    check_memory_labels()
    rows = []
    for batch in batches:
        for name in MEMORY_PROVIDERS:
            child = subprocess.run([sys.executable, __file__, "--_memory-child", name, str(batch), str(repeats)],
                                   capture_output=True, text=True)
            if child.returncode:
                raise RuntimeError(f"{name} batch {batch}: child exited {child.returncode}:\n{child.stderr[-3000:]}")
            out = child.stdout
            result = json.loads(out.strip().splitlines()[-1])
            row = {"provider": name, "batch": batch, "K": 847, "output": "512x683", "Q": 100, "C": 256, **result,
                   "images_per_s": batch / (result["median_ms"] * 1e-3)}
            base = next((r for r in rows if r["provider"] == "official" and r["batch"] == batch), row)
            row["speedup_vs_official"] = base["median_ms"] / row["median_ms"]
            row["mem_ratio_vs_official"] = base["peak_rss_mib"] / max(row["peak_rss_mib"], 1e-3)
            rows.append(row)
            print(row, flush=True)
    columns = ["provider", "batch", "K", "output", "median_ms", "speedup_vs_official", "peak_rss_mib",
               "mem_ratio_vs_official", "images_per_s"]
    report(json_path or result_path("semantic-inference-memory", "cpu"), rows, "cpu", columns,
           {"command": " ".join(sys.argv)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--json", default=None,
                   help="output JSON (default benchmarks/results/<device>-semantic-inference-<date>.json)")
    p.add_argument("--cpu-memory", action="store_true",
                   help="CPU peak RSS and time beside the official post-processing (K=847, 512x683, batch 1, 2, 4)")
    p.add_argument("--batches", default="1,2,4", help="batch sizes of --cpu-memory")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per --cpu-memory child")
    p.add_argument("--_memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory_child:
        name, batch, repeats = args._memory_child
        return memory_child(name, int(batch), int(repeats))
    if args.cpu_memory:
        return cpu_memory_sweep([int(b) for b in args.batches.split(",")], args.repeats, args.json)
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
