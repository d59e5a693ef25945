"""Fused matching-cost kernel (kernels/matching_cost.py) vs the plain-PyTorch reference.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: fp32 rtol 1e-4, atol 1e-5 (costs are O(10): w_focal = 20); bf16 inputs are upcast
exactly, so the same tolerance holds; tf32 (GPU only) rtol 1e-2, atol 5e-2.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmaskformer import Target, ops
from fastmaskformer.losses.matcher import HungarianMatcher

RTOL, ATOL = 1e-4, 1e-5


def random_target(num_segments: int, size: tuple[int, int], num_classes: int, ignore_all: bool = False,
                  generator=None) -> Target:
    labels = torch.randint(0, num_classes, (num_segments,), generator=generator)
    if num_segments == 0 or ignore_all:
        seg = torch.full(size, -1, dtype=torch.int32)
    else:
        # Blocky segments (like real masks) plus scattered ignore pixels.
        coarse = torch.randint(-1, num_segments, (max(1, size[0] // 3), max(1, size[1] // 3)), generator=generator)
        seg = coarse.repeat_interleave(3, 0).repeat_interleave(3, 1)
        seg = torch.nn.functional.pad(seg, (0, max(0, size[1] - seg.shape[1]), 0, max(0, size[0] - seg.shape[0])),
                                      value=-1)[: size[0], : size[1]]
        noise = torch.rand(size, generator=generator) < 0.1
        seg = torch.where(noise, torch.randint(-1, num_segments, size, generator=generator), seg)
    return Target(labels, seg)


def make_problem(batch, layers, queries, channels, classes, low, input_size, segments, map_sizes=None,
                 ignore_all=(), noncontiguous=False, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1234)
    map_sizes = map_sizes or [input_size] * batch
    targets = [random_target(m, s, classes, b in ignore_all, g).to(device)
               for b, (m, s) in enumerate(zip(segments, map_sizes))]
    class_logits = torch.randn(layers, batch, queries, classes + 1, generator=g).to(device)
    if noncontiguous:
        # Class logits and mask embed transposed views; pixel embed sliced from a wider
        # channels-last buffer.
        class_logits = class_logits.transpose(-1, -2).contiguous().transpose(-1, -2)
        mask_embed = torch.randn(layers, batch, channels, queries, generator=g).to(device, dtype).transpose(-1, -2)
        wide = torch.randn(batch, low[0], low[1] + 3, 2 * channels, generator=g).to(device, dtype)
        pixel_embed = wide[..., 1: low[1] + 1, ::2].permute(0, 3, 1, 2)
        assert not mask_embed.is_contiguous() and not pixel_embed.is_contiguous()
    else:
        mask_embed = torch.randn(layers, batch, queries, channels, generator=g).to(device, dtype)
        pixel_embed = torch.randn(batch, channels, *low, generator=g).to(device, dtype)
    return class_logits, mask_embed, pixel_embed, targets


def both(class_logits, mask_embed, pixel_embed, targets, input_size, weights=(1.0, 20.0, 1.0)):
    ref, sizes_ref = ops.matching_cost_padded(class_logits, mask_embed, pixel_embed, targets, weights, input_size,
                                              impl="torch")
    out, sizes = ops.matching_cost_padded(class_logits, mask_embed, pixel_embed, targets, weights, input_size,
                                          impl="triton")
    assert torch.equal(sizes, sizes_ref)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    return out, ref


CASES = {
    # name: (B, L, Q, C, K, (h, w), (H, W), M per image, extra kwargs)
    "odd_sizes_noninteger_scale": (2, 2, 7, 24, 9, (17, 19), (61, 70), [3, 5], {}),
    "m0_image_and_small_maps": (3, 1, 5, 16, 4, (9, 13), (36, 52), [4, 0, 2],
                                {"map_sizes": [(30, 41), (36, 52), (20, 52)]}),
    "q1": (2, 3, 1, 8, 3, (8, 8), (32, 32), [2, 1], {}),
    "many_segments": (1, 1, 6, 16, 80, (20, 23), (80, 92), [70], {}),
    "all_ignore_map": (2, 1, 5, 8, 5, (10, 10), (40, 40), [3, 2], {"ignore_all": (0,)}),
    "noncontiguous": (2, 2, 9, 16, 6, (11, 14), (44, 56), [4, 3], {"noncontiguous": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matching_cost_matches_reference(case):
    batch, layers, queries, channels, classes, low, size, segments, extra = CASES[case]
    problem = make_problem(batch, layers, queries, channels, classes, low, size, segments, **extra)
    out, ref = both(*problem, input_size=size)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("low,size,map_sizes", [
    ((17, 19), (61, 70), [(61, 70), (40, 13)]),
    ((32, 32), (128, 128), [(128, 128), (100, 128)]),
    ((20, 9), (13, 9), [(13, 9), (5, 2)]),
])
def test_downsample_segment_ids_equals_reference(low, size, map_sizes):
    from fastmaskformer.kernels.matching_cost import downsample_segment_ids
    from fastmaskformer.ops.matching_cost import downsample_segment_maps

    g = torch.Generator().manual_seed(0)
    targets = [random_target(4, s, 3, generator=g) for s in map_sizes]
    ours = downsample_segment_ids(targets, size, low)
    assert ours.dtype == torch.int32
    assert torch.equal(ours.long(), downsample_segment_maps(targets, size, low))


def test_matching_cost_weights_and_bf16():
    # bf16 inputs: the kernel multiplies the bf16 values exactly (upcast under the interpreter),
    # like the reference's .float(); other cost weights exercise the weight plumbing.
    class_logits, *rest = make_problem(2, 1, 6, 16, 5, (12, 10), (48, 40), [3, 4], dtype=torch.bfloat16)
    out, ref = both(class_logits.bfloat16(), *rest, input_size=(48, 40), weights=(2.0, 5.0, 3.0))
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_matching_cost_no_segments_anywhere():
    problem = make_problem(2, 2, 4, 8, 3, (6, 6), (24, 24), [0, 0])
    out, ref = both(*problem, input_size=(24, 24))
    assert out.shape == (4, 4, 0)


def test_matching_cost_rejects_unknown_precision():
    from fastmaskformer.kernels import matching_cost as kernel

    cl, me, pe, targets = make_problem(1, 1, 2, 8, 3, (4, 4), (16, 16), [1])
    with pytest.raises(ValueError, match="input_precision"):
        kernel.matching_cost(cl[0], me[0], pe, targets, (1.0, 20.0, 1.0), (16, 16), input_precision="fp8")


def test_matcher_indices_identical():
    """Same assignments from HungarianMatcher with the torch and the triton cost."""
    for seed in range(3):
        torch.manual_seed(seed)
        cl, me, pe, targets = make_problem(3, 2, 12, 16, 7, (13, 11), (52, 44), [5, 0, 12])
        cl = cl + torch.randn_like(cl) * seed
        ref = HungarianMatcher(impl="torch")(cl, me, pe, targets)
        out = HungarianMatcher(impl="triton")(cl, me, pe, targets)
        for layer_ref, layer_out in zip(ref, out):
            for (qr, sr), (qo, so) in zip(layer_ref, layer_out):
                assert torch.equal(qr, qo) and torch.equal(sr, so)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cl, me, pe, targets = make_problem(1, 1, 2, 8, 3, (4, 4), (16, 16), [1])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.matching_cost_padded(cl, me, pe, targets, impl="triton")


# ------------------------------------------------------- ahead-of-time compile for sm_90
# The interpreter does not exercise Triton's compiler. Compiling every autotune config for an
# H100 (sm_90) through ptxas needs no GPU, so CI catches kernels that would not build there.
_AOT_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = json.loads(sys.argv[1])
module = importlib.import_module(spec["module"])
for item in spec["kernels"]:
    autotuned = getattr(module, item["kernel"])
    for variant in item["variants"]:
        for config in autotuned.configs:
            constexprs = dict(variant["constexprs"], **config.kwargs)
            signature = {name: "constexpr" if name in constexprs else
                         variant["pointers"].get(name, "fp32" if name in variant["floats"] else "i32")
                         for name in autotuned.fn.arg_names}
            triton.compile(ASTSource(autotuned.fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": config.num_warps, "num_stages": config.num_stages})
print("compiled")
"""


def aot_compile_sm90(module: str, kernels: list[dict]) -> None:
    """Compile ``kernels`` of ``module`` (each: kernel name, variants of pointer types / float
    args / constexprs) for sm_90 in a subprocess without the interpreter."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"module": module, "kernels": kernels})
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, spec], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_matching_cost_kernel_compiles_for_sm90():
    def variant(dtype, precision):
        pointers = {"logits_ptr": f"*{dtype}", "embed_ptr": f"*{dtype}", "pixel_ptr": f"*{dtype}",
                    "labels_ptr": "*i32", "nseg_ptr": "*i32", "seg_ptr": "*i32", "out_ptr": "*fp32"}
        return {"pointers": pointers, "floats": ["w_class", "w_focal", "w_dice"],
                "constexprs": {"ALPHA": 0.25, "BLOCK_M": 32, "BLOCK_K": 128, "PRECISION": precision,
                               "UPCAST": False}}

    aot_compile_sm90("fastmaskformer.kernels.matching_cost", [{
        "kernel": "_matching_cost_kernel",
        "variants": [variant("fp32", "ieee"), variant("fp32", "tf32"), variant("bf16", "ieee")],
    }])


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("classes,segments", [(150, [8, 32]), (847, [16, 70])])
def test_matching_cost_gpu_full_size(classes, segments):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true fp32 too
    try:
        problem = make_problem(2, 6, 100, 256, classes, (128, 128), (512, 512), segments, device="cuda")
        out, ref = both(*problem, input_size=(512, 512))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=1e-4)


@pytest.mark.gpu
def test_matching_cost_gpu_bf16_and_noncontiguous():
    problem = make_problem(2, 6, 100, 256, 150, (64, 72), (256, 288), [12, 5], device="cuda",
                           dtype=torch.bfloat16, noncontiguous=True)
    out, ref = both(*problem, input_size=(256, 288))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_matching_cost_gpu_tf32():
    from fastmaskformer.kernels import matching_cost as kernel

    cl, me, pe, targets = make_problem(2, 6, 100, 256, 150, (128, 128), (512, 512), [10, 20], device="cuda")
    ref, _ = ops.matching_cost_padded(cl, me, pe, targets, impl="torch")
    out = kernel.matching_cost(cl.flatten(0, 1), me.flatten(0, 1), pe, targets, (1.0, 20.0, 1.0), (512, 512),
                               input_precision="tf32")
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=5e-2)
