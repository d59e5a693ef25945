"""Multi-scale deformable attention (issue 18): eager vs compile vs fused, forward and forward +
backward, time and peak memory.

    # GPU (not yet run on a GPU): Mask2Former pixel-decoder sizes, 512x512 and 1024x1024 inputs
    python benchmarks/bench_ms_deform_attn.py --device cuda [--quick]
    # CPU (small sizes; the fused provider is then our plain-torch reference, labelled as such)
    python benchmarks/bench_ms_deform_attn.py --device cpu

One deformable-attention call of the Mask2Former pixel decoder: B=16 and 2 (one GPU of the
official batch), levels at strides 32, 16, 8 of the input (512x512 -> 16x16, 32x32, 64x64:
S = Lq = 5376; 1024x1024 -> S = Lq = 21504),
H=8 heads, D=32, L=3 levels, P=4 points; locations are the reference points (pixel centres)
plus offsets of a few pixels, attention weights a softmax over L*P, as in the encoder.
Providers, side by side in one process on the same inputs:
- ``eager``: the official ``ms_deform_attn_core_pytorch`` formulation (one ``grid_sample`` per
  level, stack, weighted sum: ``ops.ms_deform_attn.ms_deform_attn_grid_sample``);
- ``compile``: ``torch.compile`` of it;
- ``fused``: ``ops.ms_deform_attn(impl="triton")`` (CUDA; fp32 and bf16 values with fp32
  locations, as under autocast; deterministic 32-bit fixed-point backward). On a CPU,
  ``reference`` (``impl="torch"``) stands in.
- ``fused-float-atomics``: ``deterministic=False``, the value gradient summed by float32 atomics
  as the official extension does: the price of the deterministic default.
- ``fused-per-tap``: ``fused`` with the backward autotuned over its per-tap scatter configs only
  (``MERGE=False``: one atomic per tap element, no merging of a query block's repeated rows):
  what the merged scatter saves.
- ``official-cuda``: the official ``MultiScaleDeformableAttention`` CUDA extension itself (fp32
  configs only: it has no 16-bit kernels and the official pixel decoder runs it in fp32), with
  the official code's ``im2col_step`` of 128; when it can be imported, from ``--official-ext DIR``
  (or ``$FASTMASKFORMER_OFFICIAL_MSDA``)
  (the folder holding the compiled module: build it from a Mask2Former checkout with
  ``FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build`` in
  ``mask2former/modeling/pixel_decoder/ops``; a CUDA toolkit and no GPU suffice) or installed.
Phases ``fwd`` (no grad) and ``fwd+bwd`` (gradients of value, locations and weights). Reported:
median ms (``triton.testing.do_bench`` on CUDA; CPU: round-robin perf_counter), peak memory above
the inputs (CUDA), speed-up and memory ratio vs eager, the error vs eager, and the roofline
prediction (``benchmarks/roofline.py``, H100/H200/A100) beside the measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

import torch

from bench_matching_cost import time_providers
from common import device_facts, report, result_path
from deform_inputs import HEAD_DIM, HEADS, make_inputs
from fastmaskformer import ops
from fastmaskformer.ops.ms_deform_attn import ms_deform_attn_grid_sample

PHASES = ("fwd", "fwd+bwd")
COLUMNS = ["provider", "phase", "batch", "size", "dtype", "median_ms", "speedup_vs_eager", "peak_mem_mib",
           "mem_ratio_vs_eager", "rel_err_vs_eager", "predicted_ms", "predicted_speedup"]


OFFICIAL_IM2COL_STEP = 128  # MSDeformAttn.im2col_step in the official Mask2Former code
OFFICIAL_EXT_ENV = "FASTMASKFORMER_OFFICIAL_MSDA"


def official_extension_op(msda):
    """fn(value, spatial_shapes, loc, weights) -> [B,Lq,H*D] through the official extension module
    ``msda`` (its ``ms_deform_attn_forward`` / ``_backward``, level start indices from the shapes),
    differentiable in value, locations and weights."""
    class OfficialCudaOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, spatial_shapes, loc, weights):
            starts = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
            ctx.save_for_backward(value, spatial_shapes, starts, loc, weights)
            return msda.ms_deform_attn_forward(value, spatial_shapes, starts, loc, weights, OFFICIAL_IM2COL_STEP)

        @staticmethod
        def backward(ctx, grad):
            value, spatial_shapes, starts, loc, weights = ctx.saved_tensors
            grad_value, grad_loc, grad_weights = msda.ms_deform_attn_backward(
                value, spatial_shapes, starts, loc, weights, grad.contiguous(), OFFICIAL_IM2COL_STEP)
            return grad_value, None, grad_loc, grad_weights

    return OfficialCudaOp.apply


def official_extension(folder=None):
    """The official ``MultiScaleDeformableAttention`` module (from ``folder`` first), or None."""
    if folder is not None:
        sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("MultiScaleDeformableAttention")
    except ImportError:
        return None


def provider_context(name: str):
    """What a provider's calls (forward and backward) run under."""
    if name == "fused-per-tap":
        from fastmaskformer.kernels.ms_deform_attn import restrict_backward_configs

        return restrict_backward_configs(MERGE=False)
    return contextlib.nullcontext()


def providers(device, msda=None) -> dict:
    """name -> fn(value, shapes list, shapes tensor, loc, weights) -> [B,Lq,H*D] (run under
    ``provider_context(name)``); ``msda``: the official extension module (its provider runs on
    CUDA, fp32 configs)."""
    def eager(v, shapes, _ss, loc, w):
        return ms_deform_attn_grid_sample(v, shapes, loc.to(v.dtype), w.to(v.dtype))

    out = {"eager": eager, "compile": torch.compile(eager)}
    if torch.device(device).type == "cuda":
        out["fused"] = lambda v, _shapes, ss, loc, w: ops.ms_deform_attn(v, ss, loc, w, impl="triton")
        out["fused-float-atomics"] = lambda v, _shapes, ss, loc, w: ops.ms_deform_attn(v, ss, loc, w, impl="triton",
                                                                                      deterministic=False)
        out["fused-per-tap"] = out["fused"]  # under provider_context: the per-tap backward configs
        if msda is not None:
            official = official_extension_op(msda)
            out["official-cuda"] = lambda v, _shapes, ss, loc, w: official(v, ss, loc, w)
    else:
        out["reference (CPU stand-in for fused)"] = lambda v, _shapes, ss, loc, w: ops.ms_deform_attn(
            v, ss, loc, w, impl="torch")
    return out


def phase_run(phase: str, name: str, fn, inputs, grad):
    value, shapes, ss, loc, weights = inputs
    leaves = [value, loc, weights]

    def forward():
        with torch.no_grad(), provider_context(name):
            fn(*inputs)

    def both():
        for t in leaves:
            t.grad = None
        with provider_context(name):
            fn(*inputs).backward(grad)

    return {"fwd": forward, "fwd+bwd": both}[phase]


def errors_vs_eager(funcs: dict, inputs, grad) -> dict:
    """{name: max over (out, 3 grads) of max|x - eager| / max|eager|}."""
    value, _, _, loc, weights = inputs
    results = {}
    for name, fn in funcs.items():
        with provider_context(name):
            out = fn(*inputs)
            grads = torch.autograd.grad(out, (value, loc, weights), grad)
        results[name] = [out.detach().float()] + [g.float() for g in grads]
    eager = results["eager"]
    return {name: max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, eager))
            for name, got in results.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="B=16 512x512 only (fp32 and bf16)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--official-ext", default=os.environ.get(OFFICIAL_EXT_ENV), metavar="DIR",
                   help="folder with the official compiled MultiScaleDeformableAttention module (official-cuda; "
                        f"default ${OFFICIAL_EXT_ENV}, which run_all.py's runs inherit)")
    p.add_argument("--json", default=None,
                   help="output JSON (default benchmarks/results/<device>-ms-deform-attn-<date>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        configs = [(16, 512, torch.float32), (16, 512, torch.bfloat16)] if args.quick else [
            (batch, size, dtype) for batch in (16, 2) for size in (512, 1024)
            for dtype in (torch.float32, torch.bfloat16)]
    else:
        torch.set_num_threads(args.threads)
        configs = [(1, 256, torch.float32)]
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from roofline import predicted

    name = device_facts(device).get("name", str(device))
    msda = official_extension(args.official_ext)
    if cuda and msda is None:
        print("official-cuda: MultiScaleDeformableAttention not importable (--official-ext DIR): row skipped")
    all_funcs = providers(device, msda)
    rows = []
    for batch, size, dtype in configs:
        funcs = {k: f for k, f in all_funcs.items() if k != "official-cuda" or dtype == torch.float32}
        inputs = make_inputs(batch, size, device, dtype)  # fp32 locations and weights
        for t in (inputs[0], inputs[3], inputs[4]):
            t.requires_grad_()
        grad = torch.randn(batch, inputs[0].shape[1], HEADS * HEAD_DIM, device=device, dtype=dtype)
        agreement = errors_vs_eager(funcs, inputs, grad)
        for phase in PHASES:
            timings = {}
            for provider in funcs:  # one at a time: only its graph alive
                timings.update(time_providers({provider: phase_run(phase, provider, funcs[provider], inputs, grad)},
                                                   device))
            base = timings["eager"]
            for provider, t in timings.items():
                row = {"provider": provider, "phase": phase, "batch": batch, "size": size, "dtype": str(dtype)[6:],
                       "rel_err_vs_eager": agreement[provider], **t,
                       "speedup_vs_eager": base["median_ms"] / t["median_ms"]}
                if "peak_mem_mib" in t and base.get("peak_mem_mib"):
                    row["mem_ratio_vs_eager"] = t["peak_mem_mib"] / base["peak_mem_mib"]
                variant = {"fused": "deterministic", "fused-float-atomics": "float-atomics",
                           "fused-per-tap": "deterministic-per-tap", "official-cuda": "deterministic"}.get(provider)
                pred = predicted("ms_deform_attn", name, batch=batch, size=size, phase=phase, dtype=str(dtype)[6:],
                                 variant=variant) if variant and (phase == "fwd+bwd" or variant == "deterministic") \
                    else None
                if pred and provider == "official-cuda":  # the official op's modelled time
                    row["predicted_ms"] = pred.get("official_cuda_ms")
                elif pred:
                    row["predicted_ms"], row["predicted_speedup"] = pred["fused_ms"], pred["speedup"]
                rows.append(row)
                print(row, flush=True)
    report(args.json or result_path("ms-deform-attn", device), rows, device, COLUMNS,
           {"command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
