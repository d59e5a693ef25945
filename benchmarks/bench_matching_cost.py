"""Pairwise matching cost of all images x all decoder layers (DESIGN 3, 7): eager vs compile vs fused.

    # GPU (H100), the full sweep (sized for one 10-minute call; not yet run on a GPU; --quick: 2 configs):
    python benchmarks/bench_matching_cost.py --device cuda --json benchmarks/results/h100-matching-cost-DATE.json
    # CPU, small sizes (the fused provider is then a chunked-torch stand-in, see below):
    python benchmarks/bench_matching_cost.py --device cpu --json benchmarks/results/cpu-matching-cost-DATE.json

Providers, side by side in one process on the same inputs (each output is checked against the
eager one: ``max_abs_err_vs_eager``; costs are O(10)):
- ``eager``: ``ops.matching_cost_padded(impl="torch")``, the official per-problem loop (one
  ``[Q, hw]`` logit matrix, its focal/dice intermediates and a ``[M, hw]`` one-hot per problem).
- ``compile``: the same loop with its per-problem body (logits + cost) ``torch.compile``-d.
- ``fused``: on CUDA the Triton kernel (``impl="triton"``) with its default tf32 products, and
  ``fused-tf32x3`` / ``fused-ieee`` (exact fp32 products on the CUDA cores). On a CPU the interpreter is no performance path, so ``fused`` is
  ``chunked-torch``: the same flash-style algorithm written with batched torch ops over pixel
  chunks (all problems at once, ``[N, Q, chunk]`` temporaries) - a stand-in, labelled as such.

Sizes: Q=100, C=256, 6 layers, 512x512 GT (h = w = 128), B in {2, 16}, M/img in {8, 16, 32},
K in {150, 847} on a GPU (``--quick``: B in {2, 16}, M=16, K=150); on a CPU B=2, 128x128 GT,
Q=20, M=8, K=150. Reported: median ms (``triton.testing.do_bench`` on CUDA; on CPU the median of
perf_counter over round-robin rounds after warm-up, see ``time_providers``), peak temporary
memory (CUDA ``max_memory_allocated`` delta; not measured on CPU), and % of the measured fp32
matmul roofline: the op is compute-bound, its FLOPs are ``2 N Q C hw`` (logits) + ``4 N Q hw M``
(the two one-hot products).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common import measure, measure_roofline, report, result_path
from fastmaskformer import Target, ops
from fastmaskformer.ops.matching_cost import FOCAL_ALPHA, _pair_cost, downsample_segment_maps

LAYERS = 6
COLUMNS = ["provider", "batch", "M", "K", "median_ms", "speedup_vs_eager", "peak_mem_mib", "roofline_pct",
           "max_abs_err_vs_eager"]


def random_targets(batch: int, segments: int, classes: int, size: int, device) -> list[Target]:
    """Blocky segment maps (16x16-pixel cells) with ~10% ignore cells; every segment present."""
    targets = []
    for _ in range(batch):
        cells = torch.randint(0, segments, (size // 16, size // 16))
        cells.view(-1)[:segments] = torch.arange(segments)
        cells[torch.rand(cells.shape) < 0.1] = -1
        seg = cells.repeat_interleave(16, 0).repeat_interleave(16, 1)
        targets.append(Target(torch.randint(0, classes, (segments,)), seg).to(device))
    return targets


def time_providers(runs: dict, device, rounds: int = 9, warmup: int = 2) -> dict:
    """{name: fn} -> {name: {median_ms, p20_ms, p80_ms[, peak_mem_mib]}}.

    CUDA: ``triton.testing.do_bench`` per provider, then one call for the peak memory above what
    was allocated before it. CPU: after ``warmup`` calls each, ``rounds`` round-robin rounds
    time every provider once per round, so that load from other processes on a shared machine
    hits all providers alike; median / p20 / p80 over the rounds.
    """
    if torch.device(device).type == "cuda":
        import triton

        out = {}
        for name, fn in runs.items():
            median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            peak = measure(fn, device, warmup=1, repeats=1)["peak_mem_mib"]
            out[name] = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_mib": peak}
        return out
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    def quantile(xs, q):
        return sorted(xs)[round(q * (len(xs) - 1))]

    return {name: {"median_ms": statistics.median(t), "p20_ms": quantile(t, 0.2), "p80_ms": quantile(t, 0.8),
                   "rounds": rounds} for name, t in samples.items()}


def _problem_cost(class_logits, embed, pixel, onehot, labels, weights):
    """One problem of the reference loop: [Q,K+1], [Q,C], [C,h,w], [M,hw], [M] -> [Q,M]."""
    logits = embed.float() @ pixel.float().flatten(1)
    return _pair_cost(class_logits, logits, onehot, labels, weights)


def compiled_reference(weights):
    """The reference loop with its per-problem body compiled (dynamic M: one compilation)."""
    body = torch.compile(_problem_cost, dynamic=True)

    @torch.no_grad()
    def run(class_logits, mask_embed, pixel_embed, targets, input_size):
        batch, _, h, w = pixel_embed.shape
        seg_small = downsample_segment_maps(targets, input_size, (h, w)).flatten(1)
        m_max = max(t.num_segments for t in targets)
        out = torch.zeros(*class_logits.shape[:2], m_max, device=class_logits.device)
        for n in range(class_logits.shape[0]):
            t = targets[n % batch]
            ids = torch.arange(t.num_segments, device=seg_small.device)
            onehot = (seg_small[n % batch][None] == ids[:, None]).float()
            out[n, :, : t.num_segments] = body(class_logits[n], mask_embed[n], pixel_embed[n % batch], onehot,
                                               t.labels, weights)
        return out

    return run


@torch.no_grad()
def chunked_torch(class_logits, mask_embed, pixel_embed, targets, input_size, weights, chunk=1024):
    """CPU stand-in for the fused kernel: all problems at once, pixels in chunks, using
    sum(f+ t + f- (1-t)) = sum((f+ - f-) t) + sum(f-). Temporaries O(N Q chunk)."""
    w_class, w_focal, w_dice = weights
    n_problems = class_logits.shape[0]
    batch, channels, h, w = pixel_embed.shape
    image = torch.arange(n_problems) % batch
    m_max = max(t.num_segments for t in targets)
    seg = downsample_segment_maps(targets, input_size, (h, w)).flatten(1)  # [B, hw]
    onehot_all = F.one_hot((seg + 1).clamp_min(0), m_max + 1)[..., 1:].float()  # [B, hw, M]; -1 -> none
    pixel = pixel_embed.float().flatten(2)  # [B, C, hw]
    embed = mask_embed.float()
    acc_ft = acc_st = 0
    row_fneg = row_s = 0
    for p0 in range(0, h * w, chunk):
        x = torch.bmm(embed, pixel[image, :, p0:p0 + chunk])  # [N, Q, chunk]
        s = x.sigmoid()
        f_pos = FOCAL_ALPHA * (1 - s) ** 2 * F.softplus(-x)
        f_neg = (1 - FOCAL_ALPHA) * s**2 * F.softplus(x)
        onehot = onehot_all[image, p0:p0 + chunk]  # [N, chunk, M]
        acc_ft = acc_ft + torch.bmm(f_pos - f_neg, onehot)
        acc_st = acc_st + torch.bmm(s, onehot)
        row_fneg = row_fneg + f_neg.sum(-1, keepdim=True)
        row_s = row_s + s.sum(-1, keepdim=True)
    count = onehot_all.sum(1)[image][:, None, :]  # [N, 1, M]
    labels = torch.zeros(batch, m_max, dtype=torch.int64)
    for b, t in enumerate(targets):
        labels[b, : t.num_segments] = t.labels.cpu()
    prob = class_logits.float().softmax(-1).gather(2, labels[image][:, None, :].expand(-1, class_logits.shape[1], -1))
    focal = (acc_ft + row_fneg) / (h * w)
    dice = 1 - (2 * acc_st + 1) / (row_s + count + 1)
    cost = -w_class * prob + w_focal * focal + w_dice * dice
    valid = torch.arange(m_max)[None, :] < torch.tensor([t.num_segments for t in targets])[image][:, None]
    return cost * valid[:, None, :]


def providers(device, weights) -> dict:
    """name -> fn(class_logits [L,B,Q,K+1], mask_embed [L,B,Q,C], pixel_embed, targets, size) -> [L*B,Q,M]."""
    compiled = compiled_reference(weights)
    out = {
        "eager": lambda cl, me, pe, tg, size: ops.matching_cost_padded(cl, me, pe, tg, weights, size,
                                                                        impl="torch")[0],
        "compile": lambda cl, me, pe, tg, size: compiled(cl.flatten(0, 1), me.flatten(0, 1), pe, tg, size),
    }
    if torch.device(device).type == "cuda":
        from fastmaskformer.kernels import matching_cost as kernel

        for precision in ("tf32", "tf32x3", "ieee"):
            name = "fused" if precision == kernel.DEFAULT_PRECISION else f"fused-{precision}"
            out[name] = lambda cl, me, pe, tg, size, precision=precision: kernel.matching_cost(
                cl.flatten(0, 1), me.flatten(0, 1), pe, tg, weights, size, precision, cl.shape[0])
    else:
        out["chunked-torch (CPU stand-in for fused)"] = (
            lambda cl, me, pe, tg, size: chunked_torch(cl.flatten(0, 1), me.flatten(0, 1), pe, tg, size, weights))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: stable numbers on a shared machine)")
    p.add_argument("--json", default=None,
                   help="output JSON (default benchmarks/results/<device>-matching-cost-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # eager/compile in true fp32, as the official release
        batches, segments, classes = ((2, 16), (16,), (150,)) if args.quick else ((2, 16), (8, 16, 32), (150, 847))
        queries, channels, size = 100, 256, 512
    else:
        torch.set_num_threads(args.threads)
        batches, segments, classes = (2,), (8,), (150,)
        queries, channels, size = 20, 256, 128
    weights = (1.0, 20.0, 1.0)
    roof = measure_roofline(device)
    rate = roof["matmul_fp32_tflops"] * 1e12
    funcs = providers(device, weights)
    rows = []
    for batch, m, k in itertools.product(batches, segments, classes):
        torch.manual_seed(0)
        h = size // 4
        class_logits = torch.randn(LAYERS, batch, queries, k + 1, device=device)
        mask_embed = torch.randn(LAYERS, batch, queries, channels, device=device)
        pixel_embed = torch.randn(batch, channels, h, h, device=device)
        targets = random_targets(batch, m, k, size, device)
        inputs = (class_logits, mask_embed, pixel_embed, targets, (size, size))
        flops = 2 * LAYERS * batch * queries * h * h * (channels + 2 * m)
        outputs = {name: fn(*inputs) for name, fn in funcs.items()}
        timings = time_providers({name: (lambda fn=fn: fn(*inputs)) for name, fn in funcs.items()}, device)
        for name, out in outputs.items():
            row = {"provider": name, "batch": batch, "M": m, "K": k, "Q": queries, "C": channels, "GT": size,
                   "layers": LAYERS, "max_abs_err_vs_eager": float((out - outputs["eager"]).abs().max()),
                   **timings[name]}
            row["speedup_vs_eager"] = timings["eager"]["median_ms"] / row["median_ms"]
            row["roofline_pct"] = 100 * flops / rate / (row["median_ms"] * 1e-3)
            rows.append(row)
            print(row, flush=True)
        del outputs
    report(args.json or result_path("matching-cost", device), rows, device, COLUMNS,
           {"roofline": roof, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
