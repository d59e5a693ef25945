"""Fused focal + dice mask loss (kernels/mask_loss.py) vs the plain-PyTorch reference: forward
and gradients of mask_embed and pixel_embed, and a whole SetCriterion step.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: fp32 rtol 1e-4 with atol 1e-6 (losses are O(1), gradients O(1e-3..1)); bf16 inputs
are upcast exactly before the matmul, so the same tolerance holds.
"""
import types

import pytest
import torch

from fastmaskformer import ops
from fastmaskformer.losses.criterion import SetCriterion
from fastmaskformer.losses.matcher import HungarianMatcher

from test_kernel_matching_cost import make_problem

RTOL, ATOL = 1e-4, 1e-6


def random_indices(segments, queries, generator):
    """A random one-to-one matching per image: (query_idx ascending, seg_idx permuted)."""
    out = []
    for m in segments:
        k = min(m, queries)
        qi = torch.randperm(queries, generator=generator)[:k].sort().values
        si = torch.randperm(m, generator=generator)[:k]
        out.append((qi, si))
    return out


def run(impl, mask_embed, pixel_embed, indices, targets, num_masks, input_size):
    """(focal, dice, grad mask_embed, grad pixel_embed) of 20 focal + 1.5 dice."""
    mask_embed = mask_embed.detach().requires_grad_()
    pixel_embed = pixel_embed.detach().requires_grad_()
    focal, dice = ops.mask_loss(mask_embed, pixel_embed, indices, targets, num_masks, input_size, impl=impl)
    (20 * focal + 1.5 * dice).backward()
    return focal.detach(), dice.detach(), mask_embed.grad, pixel_embed.grad


def check(mask_embed, pixel_embed, indices, targets, num_masks, input_size, rtol=RTOL, atol=ATOL):
    ref = run("torch", mask_embed, pixel_embed, indices, targets, num_masks, input_size)
    out = run("triton", mask_embed, pixel_embed, indices, targets, num_masks, input_size)
    for name, a, b in zip(("focal", "dice", "grad mask_embed", "grad pixel_embed"), out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return out


CASES = {
    # name: (B, Q, C, (h, w), (H, W), M per image, extra kwargs)
    "odd_sizes_noninteger_scale": (2, 7, 16, (13, 17), (61, 70), [3, 5], {}),
    "integer_scale_4": (2, 6, 8, (16, 12), (64, 48), [4, 2], {}),
    "m0_image_and_small_maps": (3, 5, 8, (9, 13), (36, 52), [4, 0, 2],
                                {"map_sizes": [(30, 41), (36, 52), (20, 52)]}),
    "q1": (2, 1, 8, (8, 9), (30, 35), [2, 1], {}),
    "many_segments": (1, 40, 8, (12, 10), (48, 40), [40], {}),
    "all_ignore_map": (2, 5, 8, (10, 11), (40, 43), [3, 2], {"ignore_all": (0,)}),
    "noncontiguous": (2, 9, 16, (11, 14), (44, 56), [4, 3], {"noncontiguous": True}),
    "downsample_and_scale_1": (2, 4, 8, (20, 9), (13, 9), [2, 3], {}),
    # several low-res tiles and full-res chunks per program (the backward's support ranges)
    "multi_tile_noninteger": (1, 3, 8, (40, 37), (150, 131), [2], {}),
    "multi_tile_mixed_scales": (1, 2, 4, (70, 40), (45, 90), [2], {}),
    # power-of-two factors: the backward's exact cell boundaries (no margin)
    "factor_2_and_8": (1, 3, 8, (20, 9), (40, 72), [3], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mask_loss_matches_reference(case):
    batch, queries, channels, low, size, segments, extra = CASES[case]
    _, mask_embed, pixel_embed, targets = make_problem(batch, 1, queries, channels, 5, low, size, segments, **extra)
    indices = random_indices(segments, queries, torch.Generator().manual_seed(7))
    check(mask_embed[0], pixel_embed, indices, targets, max(sum(segments), 1), size)


def test_mask_loss_bf16_inputs():
    _, mask_embed, pixel_embed, targets = make_problem(2, 1, 6, 16, 5, (12, 10), (40, 37), [3, 4],
                                                       dtype=torch.bfloat16)
    indices = random_indices([3, 4], 6, torch.Generator().manual_seed(3))
    focal, *_ = check(mask_embed[0], pixel_embed, indices, targets, 7.0, (40, 37))
    assert focal.dtype == torch.float32


def run_layers(impl, mask_embed, pixel_embed, indices, targets, num_masks, input_size, weights):
    """Per-layer (focal [L], dice [L]) and the gradients of sum_l w_l (20 focal_l + dice_l)."""
    mask_embed = mask_embed.detach().requires_grad_()
    pixel_embed = pixel_embed.detach().requires_grad_()
    focal, dice = ops.mask_loss(mask_embed, pixel_embed, indices, targets, num_masks, input_size, impl=impl)
    (weights * (20 * focal + dice)).sum().backward()
    return focal.detach(), dice.detach(), mask_embed.grad, pixel_embed.grad


def test_mask_loss_all_layers_in_one_call():
    """[L,B,Q,C] with per-layer matchings (different match counts per layer, an image with none
    in one layer): one fused call equals the reference layer by layer, gradients included."""
    layers, queries = 3, 7
    _, mask_embed, pixel_embed, targets = make_problem(2, layers, queries, 16, 5, (13, 17), (52, 68), [4, 5])
    g = torch.Generator().manual_seed(11)
    indices = [random_indices([4, 5], queries, g), random_indices([2, 0], queries, g), random_indices([4, 3], queries, g)]
    weights = torch.tensor([0.5, 1.0, 2.0])
    ref = run_layers("torch", mask_embed, pixel_embed, indices, targets, 9.0, (52, 68), weights)
    out = run_layers("triton", mask_embed, pixel_embed, indices, targets, 9.0, (52, 68), weights)
    assert out[0].shape == (layers,)
    for name, a, b in zip(("focal", "dice", "grad mask_embed", "grad pixel_embed"), out, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    # layer 1 alone through the single-layer form
    single = run("triton", mask_embed[1], pixel_embed, indices[1], targets, 9.0, (52, 68))
    torch.testing.assert_close(single[0], out[0][1], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="indices for 2 layers"):
        ops.mask_loss(mask_embed, pixel_embed, indices[:2], targets, 9.0, impl="triton")


def test_mask_loss_fast_mode_and_bad_precision():
    _, mask_embed, pixel_embed, targets = make_problem(2, 1, 6, 8, 5, (10, 9), (37, 33), [3, 4])
    indices = random_indices([3, 4], 6, torch.Generator().manual_seed(5))
    exact = ops.mask_loss(mask_embed[0], pixel_embed, indices, targets, 7.0, impl="triton")
    fast = ops.mask_loss(mask_embed[0], pixel_embed, indices, targets, 7.0, precision="tf32", impl="triton")
    for a, b in zip(fast, exact):  # on the CPU the bmm has no tf32: equal; on a GPU ~1e-3 (gpu test)
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="precision must be one of"):
        ops.mask_loss(mask_embed[0], pixel_embed, indices, targets, 7.0, precision="bf16", impl="triton")


def test_mask_loss_no_matches_is_zero_and_connected():
    _, mask_embed, pixel_embed, targets = make_problem(2, 1, 4, 8, 3, (6, 6), (24, 24), [0, 0])
    indices = random_indices([0, 0], 4, torch.Generator().manual_seed(0))
    focal, dice, grad_e, grad_p = check(mask_embed[0], pixel_embed, indices, targets, 1.0, (24, 24))
    assert focal.item() == 0.0 and dice.item() == 0.0
    assert grad_e is not None and not grad_e.any() and grad_p is not None and not grad_p.any()


def test_mask_loss_backward_is_deterministic():
    _, mask_embed, pixel_embed, targets = make_problem(2, 1, 6, 8, 5, (10, 9), (37, 33), [3, 4])
    indices = random_indices([3, 4], 6, torch.Generator().manual_seed(5))
    first = run("triton", mask_embed[0], pixel_embed, indices, targets, 7.0, (37, 33))
    second = run("triton", mask_embed[0], pixel_embed, indices, targets, 7.0, (37, 33))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_mask_loss_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, mask_embed, pixel_embed, targets = make_problem(1, 1, 2, 8, 3, (4, 4), (16, 16), [1])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.mask_loss(mask_embed[0], pixel_embed, [(torch.tensor([0]), torch.tensor([0]))], targets, 1.0,
                      impl="triton")


def test_set_criterion_step_triton_equals_torch():
    """A training step of the criterion (matching + CE + focal + dice, 3 layers, deep
    supervision) on random lazy outputs: same losses and gradients with both impls."""
    layers, batch, queries, channels, classes = 3, 2, 8, 16, 6
    class_logits, mask_embed, pixel_embed, targets = make_problem(batch, layers, queries, channels, classes,
                                                                  (10, 12), (40, 46), [4, 2],
                                                                  map_sizes=[(40, 46), (33, 40)])
    results = {}
    for impl in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (class_logits, mask_embed, pixel_embed)]
        outputs = types.SimpleNamespace(class_logits=leaves[0], mask_embed=leaves[1], pixel_embed=leaves[2])
        criterion = SetCriterion(classes, matcher=HungarianMatcher(impl=impl), impl=impl)
        losses = criterion(outputs, targets, input_size=(40, 46))
        criterion.total(losses).backward()
        results[impl] = (losses, [t.grad for t in leaves])
    ref_losses, ref_grads = results["torch"]
    out_losses, out_grads = results["triton"]
    assert ref_losses.keys() == out_losses.keys() and len(ref_losses) == 3 * layers
    for key in ref_losses:
        torch.testing.assert_close(out_losses[key], ref_losses[key], rtol=RTOL, atol=ATOL, msg=key)
    for name, a, b in zip(("class_logits", "mask_embed", "pixel_embed"), out_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=name)


# ---------------------------------------------------------------------------------- GPU only
@pytest.fixture
def fp32_matmul():
    """The reference's matmul must be true fp32 for an rtol-1e-4 comparison."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [[8, 32], [16, 0]])
def test_mask_loss_gpu_full_size(fp32_matmul, segments):
    _, mask_embed, pixel_embed, targets = make_problem(2, 1, 100, 256, 150, (128, 128), (512, 512), segments,
                                                       device="cuda")
    indices = random_indices(segments, 100, torch.Generator().manual_seed(1))
    check(mask_embed[0], pixel_embed, indices, targets, float(sum(segments)), (512, 512), atol=1e-5)


@pytest.mark.gpu
def test_mask_loss_gpu_six_layers_and_fast_mode(fp32_matmul):
    _, mask_embed, pixel_embed, targets = make_problem(2, 6, 100, 256, 150, (128, 128), (512, 512), [20, 7],
                                                       device="cuda")
    g = torch.Generator().manual_seed(4)
    indices = [random_indices([20, 7], 100, g) for _ in range(6)]
    weights = torch.linspace(0.5, 1.5, 6, device="cuda")
    ref = run_layers("torch", mask_embed, pixel_embed, indices, targets, 27.0, (512, 512), weights)
    out = run_layers("triton", mask_embed, pixel_embed, indices, targets, 27.0, (512, 512), weights)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-5)
    fast = ops.mask_loss(mask_embed, pixel_embed, indices, targets, 27.0, precision="tf32", impl="triton")
    for a, b in zip(fast, ref[:2]):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=1e-4)


@pytest.mark.gpu
def test_mask_loss_gpu_bf16_noncontiguous_odd(fp32_matmul):
    _, mask_embed, pixel_embed, targets = make_problem(2, 1, 100, 256, 150, (67, 93), (270, 370), [12, 5],
                                                       device="cuda", dtype=torch.bfloat16, noncontiguous=True)
    indices = random_indices([12, 5], 100, torch.Generator().manual_seed(2))
    check(mask_embed[0], pixel_embed, indices, targets, 17.0, (270, 370), atol=1e-5)


@pytest.mark.gpu
def test_mask_loss_gpu_no_full_resolution_tensor(fp32_matmul):
    """Peak memory of fwd+bwd, beyond the leaf gradients, stays far below one M x H x W fp32
    tensor (the reference materialises several)."""
    segments = [32, 32]
    _, mask_embed, pixel_embed, targets = make_problem(2, 1, 100, 256, 150, (128, 128), (512, 512), segments,
                                                       device="cuda")
    indices = random_indices(segments, 100, torch.Generator().manual_seed(3))
    mask_embed = mask_embed[0].detach().requires_grad_()
    pixel_embed = pixel_embed.detach().requires_grad_()

    def step():
        mask_embed.grad = pixel_embed.grad = None
        focal, dice = ops.mask_loss(mask_embed, pixel_embed, indices, targets, 64.0, impl="triton")
        (focal + dice).backward()

    step()  # autotuning allocates benchmark buffers: not part of the op's footprint
    mask_embed.grad = pixel_embed.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grads = (mask_embed.numel() + pixel_embed.numel()) * 4
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra < 64 * 512 * 512 * 4 / 4, extra
