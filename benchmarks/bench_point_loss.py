"""Mask2Former's point-sampled BCE + dice mask loss, forward + backward of all predictions:
eager vs compile vs fused (DESIGN 7).

    # GPU (not yet run on a GPU): Mask2Former per GPU, 10 predictions, B=2, M=32, 12544 points
    python benchmarks/bench_point_loss.py --device cuda
    # CPU smoke run (small sizes, the fused provider is not measured: the interpreter is no
    # performance path)
    python benchmarks/bench_point_loss.py --device cpu

Providers, side by side in one process on the same inputs and the same draws (each checked
against eager: ``max_abs_err_vs_eager`` over the losses and both gradients):
- ``eager``: ``point_mask_loss(impl="torch")``: per layer the matched queries' ``[B, M, h, w]``
  logit maps, the uncertainty at the 3P candidates, top-k, the logits and targets at the points.
- ``compile``: the same, ``torch.compile``-d (one graph).
- ``fused`` / ``fused-tf32``: ``impl="triton"`` (kernels/point_loss.py), exact fp32 products or
  TF32 tensor cores for its two low-res products.
Reported: median ms, peak temporary memory (CUDA), and the roofline prediction
(``benchmarks/roofline.py``, part ``point_loss``) beside the fused time.
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import compare_to_baseline, measure, report, result_path
from fastmaskformer.ops.point_loss import point_mask_loss

COLUMNS = ["provider", "batch", "M", "points", "median_ms", "speedup_vs_eager", "peak_mem_mib",
           "mem_ratio_vs_eager", "predicted_fused_ms", "max_abs_err_vs_eager"]


def problem(device, layers, batch, segments, points, queries=100, channels=256, low=128):
    """Random embeddings, blocky segment maps at 4x the embedding size, every segment matched."""
    g = torch.Generator().manual_seed(0)
    mask_embed = torch.randn(layers, batch, queries, channels, generator=g)
    pixel_embed = torch.randn(batch, channels, low, low, generator=g) / channels ** 0.5
    cells = torch.randint(-1, segments, (batch, low // 4, low // 4), generator=g, dtype=torch.int32)
    seg_maps = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
    assignment = torch.stack([torch.stack([torch.randperm(queries, generator=g)[:segments] for _ in range(batch)])
                              for _ in range(layers)])
    uncertain = int(0.75 * points)
    candidates = torch.rand(layers, batch, segments, 3 * points, 2, generator=g)
    extra = torch.rand(layers, batch, segments, points - uncertain, 2, generator=g)
    tensors = (mask_embed, pixel_embed, assignment, seg_maps, torch.tensor(float(batch * segments)), candidates,
               extra)
    return tuple(t.to(device) for t in tensors), uncertain


def step_fn(impl, args, uncertain, precision=None, compiled=False):
    mask_embed, pixel_embed = (a.detach().clone().requires_grad_() for a in args[:2])

    def loss():
        bce, dice = point_mask_loss(mask_embed, pixel_embed, *args[2:], uncertain, precision, impl=impl)
        return 5 * bce.sum() + 5 * dice.sum(), bce, dice

    body = torch.compile(loss) if compiled else loss

    def step():
        mask_embed.grad = pixel_embed.grad = None
        total, bce, dice = body()
        total.backward()
        return torch.cat([bce.detach(), dice.detach(), mask_embed.grad.flatten(), pixel_embed.grad.flatten()])
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    layers, batch, segments, points = (10, 2, 32, 12544) if cuda else (2, 1, 4, 256)
    inputs, uncertain = problem(device, layers, batch, segments, points, *(() if cuda else (20, 32, 32)))
    providers = {"eager": step_fn("torch", inputs, uncertain)}
    if not args.no_compile:
        providers["compile"] = step_fn("torch", inputs, uncertain, compiled=True)
    if cuda:
        providers["fused"] = step_fn("triton", inputs, uncertain, "ieee")
        providers["fused-tf32"] = step_fn("triton", inputs, uncertain, "tf32")
    predicted = None
    if cuda:
        from roofline import predicted as roofline_predicted

        predicted = roofline_predicted("point_loss", torch.cuda.get_device_name(device), precision="ieee")
    reference = providers["eager"]()
    rows = []
    for name, fn in providers.items():
        row = {"provider": name, "batch": batch, "M": segments, "points": points, **measure(fn, device)}
        row["max_abs_err_vs_eager"] = float((fn() - reference).abs().max())
        if name.startswith("fused") and predicted:
            row["predicted_fused_ms"] = predicted["fused_ms"]
        rows.append(row)
    for row in rows:
        compare_to_baseline(row, rows, ("batch", "M", "points"))
    report(args.json or result_path("point-loss", device), rows, device, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
