"""Focal + dice mask loss of all 6 decoder layers, forward / backward / both (DESIGN 3, 7):
eager vs compile vs fused.

    # GPU (H100), the full sweep (sized for one 10-minute call; not yet run on a GPU; --quick: 2 configs):
    python benchmarks/bench_mask_loss.py --device cuda --json benchmarks/results/h100-mask-loss-DATE.json
    # CPU, small sizes (the fused provider is then a chunked-torch stand-in, see below):
    python benchmarks/bench_mask_loss.py --device cpu --json benchmarks/results/cpu-mask-loss-DATE.json

The measured function is ``sum over 6 layers of 20 focal + dice`` of one batch's matched pairs
(``mask_embed [6,B,Q,C]`` and ``pixel_embed [B,C,h,w]`` require grad). Providers, side by side
in one process on the same inputs (``rel_err_vs_eager``: max abs difference of loss and gradients over eager's max):
- ``eager``: ``ops.mask_loss(impl="torch")`` per layer, the official computation (matched
  logits upsampled to ``[M, H, W]``, focal/dice intermediates at full resolution).
- ``compile``: ``torch.compile`` of that reference function.
- ``fused``: on CUDA the Triton kernels (``impl="triton"``). On a CPU the interpreter is no
  performance path, so ``fused`` is ``chunked-torch``: low-res logits by matmul, then full-res
  row chunks upsampled with separable interpolation matrices, focal/dice partial sums per chunk
  under ``torch.utils.checkpoint`` (recomputed in backward) - a stand-in, labelled as such.
Phases: ``fwd`` (no grad), ``bwd`` (``backward(retain_graph=True)`` of a prepared graph) and
``fwd+bwd``. Sizes: Q=100, C=256, 6 layers, 512x512 GT (h = w = 128), B in {2, 16}, M/img in
{8, 16, 32} on a GPU (``--quick``: M=16); on a CPU B=2, 128x128 GT, Q=20, M=8. K does not enter
the mask loss. Reported: median ms (``triton.testing.do_bench`` on CUDA; on CPU the median of
perf_counter over round-robin rounds after warm-up), peak memory above the inputs (CUDA
``max_memory_allocated`` delta; not measured on CPU) and % of the measured roofline for
fwd+bwd: max(bytes / copy bandwidth, matmul FLOPs / fp32 matmul rate) over the time, with bytes
= the GT maps read twice and X, grad X written/read once per layer - a lower bound that ignores
the per-pixel transcendental work.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F
from torch._functorch import config as functorch_config
from torch.utils.checkpoint import checkpoint

from bench_matching_cost import random_targets, time_providers
from common import measure_roofline, report, result_path
from fastmaskformer import ops
from fastmaskformer.ops.mask_loss import mask_loss_reference
from fastmaskformer.ops.matching_cost import FOCAL_ALPHA
from fastmaskformer.target import pad_segment_maps

LAYERS = 6
PHASES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = ["provider", "phase", "batch", "M", "median_ms", "speedup_vs_eager", "peak_mem_mib", "roofline_pct",
           "rel_err_vs_eager"]


def interpolation_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out, in] bilinear (align_corners=False) weights, taken from F.interpolate itself."""
    eye = torch.eye(in_size)[:, None, :, None]  # in_size one-hot "images" of size [in, 1]
    return F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T


def _chunk_sums(rows_y, low, ax, seg_rows, seg_ids):
    """Partial sums over a chunk of full-res rows: [M, 4] = focal, s, t, s t."""
    x = torch.einsum("Yy,myx,Xx->mYX", rows_y, low, ax)  # [M, rows, W]
    t = (seg_rows == seg_ids[:, None, None]).float()
    s = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = s * t + (1 - s) * (1 - t)
    focal = (FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)) * ce * (1 - p_t) ** 2
    return torch.stack([focal.sum((1, 2)), s.sum((1, 2)), t.sum((1, 2)), (s * t).sum((1, 2))], 1)


def chunked_torch(mask_embed, pixel_embed, indices, targets, num_masks, input_size, rows_per_chunk=32):
    """CPU stand-in for the fused kernels: full-res temporaries O(M x rows_per_chunk x W)."""
    H, W = input_size
    _, channels, h, w = pixel_embed.shape
    seg = pad_segment_maps(targets, input_size)
    lows, segs, ids = [], [], []
    for b, (qi, si) in enumerate(indices):
        lows.append(mask_embed[b, qi].float() @ pixel_embed[b].float().reshape(channels, h * w))
        segs.append(seg[b].expand(qi.numel(), H, W))
        ids.append(si)
    low = torch.cat(lows).view(-1, h, w)
    seg_all, seg_ids = torch.cat(segs), torch.cat(ids).to(torch.int32)
    ay, ax = interpolation_matrix(H, h), interpolation_matrix(W, w)
    sums = sum(checkpoint(_chunk_sums, ay[y0:y0 + rows_per_chunk], low, ax, seg_all[:, y0:y0 + rows_per_chunk],
                          seg_ids, use_reentrant=False) for y0 in range(0, H, rows_per_chunk))
    focal = (sums[:, 0] / (H * W)).sum() / num_masks
    dice = (1 - (2 * sums[:, 3] + 1) / (sums[:, 1] + sums[:, 2] + 1)).sum() / num_masks
    return focal, dice


def per_layer(loss_fn):
    """A one-layer loss(mask_embed [B,Q,C], ...) applied layer by layer -> (focal [L], dice [L])."""
    def run(mask_embed, pixel_embed, matching, targets, num_masks, size):
        losses = [loss_fn(mask_embed[layer], pixel_embed, indices, targets, num_masks, size)
                  for layer, indices in enumerate(matching)]
        return tuple(torch.stack(t) for t in zip(*losses))
    return run


def providers(device) -> dict:
    """name -> loss_fn(mask_embed [L,B,Q,C], pixel_embed, matching, targets, num_masks, size)
    -> (focal [L], dice [L])."""
    out = {
        "eager": per_layer(lambda *a: ops.mask_loss(*a, impl="torch")),
        "compile": per_layer(torch.compile(mask_loss_reference)),
    }
    if torch.device(device).type == "cuda":
        # All layers in one call (one bmm, one launch of each kernel).
        out["fused"] = lambda *a: ops.mask_loss(*a, impl="triton")
        out["fused-tf32"] = lambda *a: ops.mask_loss(*a, precision="tf32", impl="triton")
    else:
        out["chunked-torch (CPU stand-in for fused)"] = per_layer(chunked_torch)
    return out


def total_loss(loss_fn, mask_embed, pixel_embed, matching, targets, num_masks, size):
    """sum over layers of 20 focal + dice; mask_embed [L,B,Q,C]."""
    focal, dice = loss_fn(mask_embed, pixel_embed, matching, targets, num_masks, size)
    return (20 * focal + dice).sum()


def check_against_eager(funcs: dict, inputs) -> dict:
    """{name: max over (loss, grad mask_embed, grad pixel_embed) of max|x - eager| / max|eager|}."""
    mask_embed, pixel_embed = inputs[:2]
    results = {}
    for name, fn in funcs.items():
        mask_embed.grad = pixel_embed.grad = None
        loss = total_loss(fn, *inputs)
        loss.backward()
        results[name] = (loss.detach(), mask_embed.grad.clone(), pixel_embed.grad.clone())
    mask_embed.grad = pixel_embed.grad = None
    eager = results["eager"]
    return {name: max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, eager))
            for name, got in results.items()}


def phase_run(phase: str, fn, inputs, graph=None):
    """A no-argument callable timing ``phase`` of provider ``fn`` (``graph``: the loss whose
    backward the "bwd" phase replays)."""
    mask_embed, pixel_embed = inputs[:2]

    def forward():
        with torch.no_grad():
            total_loss(fn, *inputs)

    def backward():
        mask_embed.grad = pixel_embed.grad = None
        graph.backward(retain_graph=True)

    def both():
        mask_embed.grad = pixel_embed.grad = None
        total_loss(fn, *inputs).backward()

    return {"fwd": forward, "bwd": backward, "fwd+bwd": both}[phase]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: stable numbers on a shared machine)")
    p.add_argument("--json", default=None,
                   help="output JSON (default benchmarks/results/<device>-mask-loss-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        batches, segments = ((2, 16), (16,)) if args.quick else ((2, 16), (8, 16, 32))
        queries, channels, size = 100, 256, 512
    else:
        torch.set_num_threads(args.threads)
        batches, segments = (2,), (8,)
        queries, channels, size = 20, 256, 128
    # The "bwd" phase replays one graph's backward (retain_graph=True), which compiled graphs only
    # allow without donated buffers.
    functorch_config.donated_buffer = False
    roof = measure_roofline(device)
    funcs = providers(device)
    rows = []
    for batch, m in itertools.product(batches, segments):
        torch.manual_seed(0)
        h = size // 4
        mask_embed = torch.randn(LAYERS, batch, queries, channels, device=device, requires_grad=True)
        pixel_embed = torch.randn(batch, channels, h, h, device=device, requires_grad=True)
        targets = random_targets(batch, m, 150, size, device)
        matching = [[(torch.randperm(queries)[:m].sort().values, torch.randperm(m)) for _ in range(batch)]
                    for _ in range(LAYERS)]
        inputs = (mask_embed, pixel_embed, matching, targets, float(batch * m), (size, size))
        total_masks = LAYERS * batch * m
        bytes_moved = LAYERS * (2 * batch * size * size * 4 + 4 * total_masks * h * h * 4)
        flops = LAYERS * 3 * 2 * total_masks * channels * h * h
        floor_s = max(bytes_moved / (roof["copy_gbps"] * 1e9), flops / (roof["matmul_fp32_tflops"] * 1e12))
        agreement = check_against_eager(funcs, inputs)
        for phase in PHASES:
            # CUDA times one provider at a time (only its graph alive: eager's takes tens of GB);
            # the CPU round-robins all providers (see time_providers).
            for group in ([[name] for name in funcs] if cuda else [list(funcs)]):
                graphs = {name: total_loss(funcs[name], *inputs) for name in group} if phase == "bwd" else {}
                timings = time_providers({name: phase_run(phase, funcs[name], inputs, graphs.get(name))
                                          for name in group}, device)
                graphs.clear()
                for name in group:
                    row = {"provider": name, "phase": phase, "batch": batch, "M": m, "Q": queries, "C": channels,
                           "GT": size, "layers": LAYERS, "rel_err_vs_eager": agreement[name], **timings[name]}
                    rows.append(row)
            for row in rows[-len(funcs):]:
                row["speedup_vs_eager"] = rows[-len(funcs)]["median_ms"] / row["median_ms"]
                if phase == "fwd+bwd":
                    row["roofline_pct"] = 100 * floor_s / (row["median_ms"] * 1e-3)
                print(row, flush=True)
    report(args.json or result_path("mask-loss", device), rows, device, COLUMNS,
           {"roofline": roof, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
