"""Fused matching-cost kernel (kernels/matching_cost.py) vs the plain-PyTorch reference.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1;
the kernel models the tf32 roundings there). Tolerances: "ieee" and "tf32x3" rtol 1e-4, atol 1e-5
(costs are O(10): w_focal = 20); bf16 inputs are multiplied exactly, so the same tolerance
holds; "tf32" (the default: the cost only feeds an argmin) rtol 1e-2, atol 2e-2, and the
assignment it gives costs (under the exact fp32 cost) at most 1e-2 per match more than the
exact optimum.
"""
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fastmaskformer import Target, ops
from fastmaskformer.kernels.common import assume_multiprocessors
from fastmaskformer.losses.matcher import HungarianMatcher

RTOL, ATOL = 1e-4, 1e-5
TF32_RTOL, TF32_ATOL = 1e-2, 2e-2


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


def both(class_logits, mask_embed, pixel_embed, targets, input_size, weights=(1.0, 20.0, 1.0), precision="ieee"):
    ref, sizes_ref = ops.matching_cost_padded(class_logits, mask_embed, pixel_embed, targets, weights, input_size,
                                              impl="torch")
    out, sizes = ops.matching_cost_padded(class_logits, mask_embed, pixel_embed, targets, weights, input_size,
                                          precision=precision, impl="triton")
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


def assignment_regret(costs, ref, sizes):
    """Per problem: exact (ref) cost of the assignment solved on ``costs`` minus the exact optimum,
    per match."""
    regrets = []
    for n, m in enumerate(sizes.tolist()):
        if m == 0:
            continue
        exact = ref[n, :, :m].numpy()
        rows, cols = linear_sum_assignment(costs[n, :, :m].numpy())
        best_rows, best_cols = linear_sum_assignment(exact)
        regrets.append((exact[rows, cols].sum() - exact[best_rows, best_cols].sum()) / m)
    return max(regrets)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_matching_cost_precision_modes(precision):
    problem = make_problem(2, 3, 20, 32, 9, (16, 20), (64, 80), [6, 11])
    out, ref = both(*problem, input_size=(64, 80), precision=precision)
    if precision == "tf32":
        torch.testing.assert_close(out, ref, rtol=TF32_RTOL, atol=TF32_ATOL)
        assert not torch.allclose(out, ref, rtol=RTOL, atol=ATOL)  # tf32 is really modelled
    else:
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    sizes = torch.tensor([6, 11] * 3)
    assert assignment_regret(out, ref, sizes) <= 1e-2


def test_matching_cost_default_precision_is_tf32():
    problem = make_problem(1, 2, 8, 16, 5, (8, 8), (32, 32), [4])
    default, _ = ops.matching_cost_padded(*problem, impl="triton")
    tf32, _ = ops.matching_cost_padded(*problem, precision="tf32", impl="triton")
    assert torch.equal(default, tf32)


def test_matching_cost_pixel_split_matches_reference():
    # Few problems on a GPU with many SMs: the pixels are split across programs and the finish
    # kernel adds the partial sums.
    from fastmaskformer.kernels.matching_cost import pixel_splits

    problem = make_problem(2, 2, 9, 16, 6, (64, 70), (256, 280), [5, 3])
    with assume_multiprocessors(16):
        assert pixel_splits("cpu", 4, 64 * 70) == 2
        out, ref = both(*problem, input_size=(256, 280))
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("low,size,map_sizes", [
    ((17, 19), (61, 70), [(61, 70), (40, 13)]),
    ((32, 32), (128, 128), [(128, 128), (100, 128)]),
    ((20, 9), (13, 9), [(13, 9), (5, 2)]),
])
def test_downsample_segment_ids_equals_reference(low, size, map_sizes):
    from fastmaskformer.ops.matching_cost import downsample_segment_ids, downsample_segment_maps
    from fastmaskformer.target import pad_segment_maps

    g = torch.Generator().manual_seed(0)
    targets = [random_target(4, s, 3, generator=g) for s in map_sizes]
    ours = downsample_segment_ids(pad_segment_maps(targets, size), low)
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
    cl, me, pe, targets = make_problem(1, 1, 2, 8, 3, (4, 4), (16, 16), [1])
    with pytest.raises(ValueError, match="precision must be one of"):
        ops.matching_cost_padded(cl, me, pe, targets, precision="fp8", impl="triton")


def test_matcher_indices_identical():
    """Same assignments from HungarianMatcher with the torch and the triton cost."""
    for seed in range(3):
        torch.manual_seed(seed)
        cl, me, pe, targets = make_problem(3, 2, 12, 16, 7, (13, 11), (52, 44), [5, 0, 12])
        cl = cl + torch.randn_like(cl) * seed
        ref = HungarianMatcher(impl="torch")(cl, me, pe, targets)
        out = HungarianMatcher(impl="triton", precision="ieee")(cl, me, pe, targets)
        for layer_ref, layer_out in zip(ref, out):
            for (qr, sr), (qo, so) in zip(layer_ref, layer_out):
                assert torch.equal(qr, qo) and torch.equal(sr, so)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cl, me, pe, targets = make_problem(1, 1, 2, 8, 3, (4, 4), (16, 16), [1])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.matching_cost_padded(cl, me, pe, targets, impl="triton")


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("classes,segments", [(150, [8, 32]), (847, [16, 70])])
def test_matching_cost_gpu_full_size(classes, segments):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true fp32 too
    try:
        problem = make_problem(2, 6, 100, 256, classes, (128, 128), (512, 512), segments, device="cuda")
        out, ref = both(*problem, input_size=(512, 512), precision="ieee")
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
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_matching_cost_gpu_fast_precisions(precision):
    cl, me, pe, targets = make_problem(2, 6, 100, 256, 150, (128, 128), (512, 512), [10, 20], device="cuda")
    ref, sizes = ops.matching_cost_padded(cl, me, pe, targets, impl="torch")
    out, _ = ops.matching_cost_padded(cl, me, pe, targets, precision=precision, impl="triton")
    tol = dict(rtol=TF32_RTOL, atol=TF32_ATOL) if precision == "tf32" else dict(rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    assert assignment_regret(out.cpu(), ref.cpu(), sizes) <= 1e-2
