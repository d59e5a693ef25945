"""The fused point-sampled mask loss (kernels/point_loss.py, Triton interpreter on CPU) against the
plain-PyTorch reference ``point_mask_loss_reference`` on the same points: values, gradients of
mask_embed and pixel_embed, the importance selection, determinism and bad input (the operators' opcheck: tests/test_opcheck.py).

Tolerances: fp32 ("ieee") values rtol 1e-5 / atol 1e-6, gradients rtol 1e-4 / atol 1e-6 (the
same fp32 formulas summed in another order); "tf32" rtol / atol 1e-2 (on CPU the products stay
fp32: the option only changes the CUDA bmms); bf16 inputs: values as fp32 (both upcast the same
bf16 numbers), gradients after the cast back to bf16 rtol 2e-2.
"""
import pytest
import torch

from fastmaskformer.ops.point_loss import importance_points, point_mask_loss, point_mask_loss_reference


def make_problem(seed=0, layers=3, batch=2, queries=7, channels=8, low=(9, 11), size=(37, 45), segments=4,
                 candidates=0, extra=40, dtype=torch.float32):
    """Random embeddings, blocky segment maps with -1 regions, an assignment with unmatched slots,
    and points including the borders and outside the image (zero padding)."""
    g = torch.Generator().manual_seed(seed)
    mask_embed = torch.randn(layers, batch, queries, channels, generator=g).to(dtype)
    pixel_embed = torch.randn(batch, channels, *low, generator=g).to(dtype)
    coarse = torch.randint(-1, segments, (batch, size[0] // 3 + 1, size[1] // 3 + 1), generator=g, dtype=torch.int32)
    seg_maps = coarse.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, : size[0], : size[1]].contiguous()
    assignment = torch.full((layers, batch, segments), -1, dtype=torch.int64)
    for layer in range(layers):
        for b in range(batch):
            count = (layer + b) % (segments + 1)  # 0..segments matched, different per (layer, image)
            slots = torch.randperm(segments, generator=g)[:count]
            assignment[layer, b, slots] = torch.randperm(queries, generator=g)[:count]
    shape = (layers, batch, segments)
    cand = torch.rand(*shape, candidates, 2, generator=g) * 1.1 - 0.05
    pts = torch.rand(*shape, extra, 2, generator=g) * 1.1 - 0.05  # some outside [0, 1]
    border = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [0.5, 0.0], [-0.2, 0.5], [1.3, 1.3]])
    pts[..., : border.shape[0], :] = border[: pts.shape[-2]]
    return mask_embed, pixel_embed, assignment, seg_maps, torch.tensor(3.5), cand, pts


def losses_and_grads(impl, mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra, num_uncertain,
                     precision=None):
    mask_embed = mask_embed.detach().clone().requires_grad_()
    pixel_embed = pixel_embed.detach().clone().requires_grad_()
    if impl == "reference":
        bce, dice = point_mask_loss_reference(mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra,
                                              num_uncertain)
    else:
        bce, dice = point_mask_loss(mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra,
                                    num_uncertain, precision, impl=impl)
    weights = torch.arange(1, bce.shape[0] + 1, dtype=torch.float32)  # distinct per-layer cotangents
    ((bce * weights).sum() + (dice * weights.flip(0)).sum() * 2).backward()
    return bce.detach(), dice.detach(), mask_embed.grad, pixel_embed.grad


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fused_equals_reference_at_explicit_points(precision):
    """num_uncertain = 0: the loss is taken at exactly the given points, in both paths."""
    problem = make_problem(seed=1)
    ref = losses_and_grads("reference", *problem, 0)
    out = losses_and_grads("triton", *problem, 0, precision=precision)
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "ieee" else dict(rtol=1e-2, atol=1e-2)
    grad_tol = dict(rtol=1e-4, atol=1e-6) if precision == "ieee" else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[0], ref[0], **tol)
    torch.testing.assert_close(out[1], ref[1], **tol)
    torch.testing.assert_close(out[2], ref[2], **grad_tol)
    torch.testing.assert_close(out[3], ref[3], **grad_tol)
    assert out[2].abs().sum() > 0 and out[3].abs().sum() > 0


def test_fused_importance_sampling_selects_the_reference_points():
    """Candidates + top-k: the kernel's uncertainty picks the same points (top-k order, then extra)
    and the losses and gradients agree."""
    from fastmaskformer.kernels.point_loss import point_loss_forward  # noqa: F401  (registers the operator)

    problem = make_problem(seed=2, layers=2, candidates=60, extra=8)
    mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra = problem
    _, _, _, points, _ = torch.ops.fastmaskformer.point_loss_forward(mask_embed, pixel_embed, assignment, seg_maps,
                                                                     num_masks, cand, extra, 20, "ieee")
    assert points.shape == (2, 2, 4, 28, 2)
    for layer in range(2):
        for b in range(2):
            for j in range(4):
                q = int(assignment[layer, b, j])
                if q < 0:
                    continue
                maps = torch.einsum("c,chw->hw", mask_embed[layer, b, q], pixel_embed[b])[None, None]
                ref = importance_points(maps, cand[layer, b, j][None, None], extra[layer, b, j][None, None], 20)
                torch.testing.assert_close(points[layer, b, j], ref[0, 0], rtol=0, atol=0)
    ref = losses_and_grads("reference", *problem, 20)
    out = losses_and_grads("triton", *problem, 20)
    for o, r in zip(out[:2], ref[:2]):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    for o, r in zip(out[2:], ref[2:]):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)


def test_fused_bf16_inputs_compute_in_fp32():
    problem = make_problem(seed=3, layers=2, dtype=torch.bfloat16)
    ref = losses_and_grads("reference", *problem, 0)
    out = losses_and_grads("triton", *problem, 0)
    assert out[2].dtype == torch.bfloat16 and out[3].dtype == torch.bfloat16
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2].float(), ref[2].float(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(out[3].float(), ref[3].float(), rtol=2e-2, atol=1e-4)


def test_fused_points_split_over_programs_and_no_segment():
    """Many SMs, few masks: one mask's points are shared by several programs (partial sums added
    by torch, gradients by the fixed-point atomics). M = 0: zero losses and gradients."""
    from fastmaskformer.kernels.common import assume_multiprocessors

    problem = make_problem(seed=4, layers=1, batch=1, segments=2, extra=4200, low=(5, 7), size=(19, 27))
    ref = losses_and_grads("reference", *problem, 0)
    with assume_multiprocessors(64):
        out = losses_and_grads("triton", *problem, 0)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-6)
    mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra = make_problem(seed=5, layers=2)
    empty = (assignment[..., :0], cand[:, :, :0], extra[:, :, :0])
    bce, dice, grad_embed, grad_pixel = losses_and_grads("triton", mask_embed, pixel_embed, empty[0], seg_maps,
                                                         num_masks, empty[1], empty[2], 0)
    assert bce.shape == (2,) and not bce.any() and not dice.any()
    assert not grad_embed.any() and not grad_pixel.any()


def test_fused_backward_is_deterministic():
    """Fixed-point integer atomics: two backward runs give bit-identical gradients (many points
    on a small map, so taps collide)."""
    problem = make_problem(seed=6, layers=2, low=(4, 5), size=(16, 20), extra=300)
    first = losses_and_grads("triton", *problem, 0)
    second = losses_and_grads("triton", *problem, 0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bad_input_is_rejected():
    mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra = make_problem(seed=8, layers=2,
                                                                                        candidates=10, extra=3)
    args = [mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra, 4]

    def call(**changes):
        a = list(args)
        names = ["mask_embed", "pixel_embed", "assignment", "seg_maps", "num_masks", "cand", "extra", "num_uncertain"]
        for k, v in changes.items():
            a[names.index(k)] = v
        return point_mask_loss(*a, impl="triton")

    bad = assignment.clone()
    bad[0, 0, 0] = 7  # Q = 7
    with pytest.raises(ValueError, match="assignment values"):
        call(assignment=bad)
    bad[0, 0, 0] = -2
    with pytest.raises(ValueError, match="assignment values"):
        call(assignment=bad)
    with pytest.raises(ValueError, match="int64"):
        call(assignment=assignment.float())
    with pytest.raises(ValueError, match=r"assignment must be int64 \[L,B,M\]"):
        call(assignment=assignment[:1])
    with pytest.raises(ValueError, match="channel mismatch"):
        call(pixel_embed=pixel_embed[:, :4])
    with pytest.raises(ValueError, match="seg_maps"):
        call(seg_maps=seg_maps[:1])
    with pytest.raises(ValueError, match="candidates"):
        call(cand=cand[:, :, :2])
    with pytest.raises(ValueError, match="extra"):
        call(extra=extra[..., :1])
    with pytest.raises(ValueError, match="num_uncertain"):
        call(num_uncertain=11)
    with pytest.raises(TypeError, match="floating"):
        call(mask_embed=mask_embed.long())
    with pytest.raises(ValueError, match="precision"):
        point_mask_loss(*args, precision="bf16", impl="triton")


def test_criterion_triton_equals_torch_with_the_same_points():
    """PointSampledCriterion impl="triton" (fused point loss) vs impl="torch" on the same draws and
    the same matching: every loss and every gradient."""
    from fastmaskformer.losses import PointMatcher, PointSampledCriterion
    from fastmaskformer.target import Target

    g = torch.Generator().manual_seed(9)
    layers, batch, q, k, c, h, w = 3, 2, 7, 5, 8, 9, 11
    leaves = [torch.randn(layers, batch, q, k + 1, generator=g), torch.randn(layers, batch, q, c, generator=g),
              torch.randn(batch, c, h, w, generator=g)]
    targets = []
    for i in range(batch):
        seg = torch.randint(0, 3 + i, (9, 11), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
        seg[:3, :5] = 255
        targets.append(Target.from_semantic(seg, ignore_label=255))

    class Out:
        def __init__(self, c, e, p):
            self.class_logits, self.mask_embed, self.pixel_embed = c, e, p

    results = {}
    pts = None
    for impl in ("torch", "triton"):
        xs = [x.clone().requires_grad_() for x in leaves]
        crit = PointSampledCriterion(k, PointMatcher(2.0, 5.0, 5.0, impl="torch"), num_points=40, impl=impl)
        if pts is None:
            pts = crit.draw_points(layers, batch, max(t.num_segments for t in targets), "cpu")
        losses = crit(Out(*xs), targets, (36, 44), points=pts)
        crit.total(losses).backward()
        results[impl] = losses, [x.grad for x in xs]
    (ref, ref_grads), (out, out_grads) = results["torch"], results["triton"]
    assert set(ref) == set(out)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(out_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_shared_point_targets_equal_per_segment_sampling():
    """The fused matching cost's targets: taps once per shared point, the same values as
    sample_segment_targets with the points repeated for every segment."""
    from fastmaskformer.ops.point_loss import sample_segment_targets, sample_shared_point_targets

    g = torch.Generator().manual_seed(10)
    seg = torch.randint(-1, 5, (2, 17, 23), generator=g, dtype=torch.int32)
    coords = torch.rand(3, 2, 50, 2, generator=g) * 1.2 - 0.1
    ours = sample_shared_point_targets(seg, 5, coords)
    segments = torch.arange(5)[None].expand(2, 5)
    for layer in range(3):
        ref = sample_segment_targets(seg, segments, coords[layer][:, None].expand(2, 5, 50, 2))
        assert torch.equal(ours[layer], ref)


def test_fused_loss_traces_as_one_graph():
    """The public op on the fused path has no graph break: torch.compile sees the operators."""
    import torch._dynamo

    from fastmaskformer.ops._dispatch import load_kernel

    load_kernel("point_loss", "test")  # outside compiled code, as the criterion's preload does
    problem = make_problem(seed=11, layers=2, candidates=20, extra=6)

    def loss(*args):
        bce, dice = point_mask_loss(*args, 8, impl="triton")
        return bce.sum() + dice.sum()

    explained = torch._dynamo.explain(loss)(*problem)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


# ---------------------------------------------------------------------------------- GPU only
@pytest.fixture
def fp32_matmul():
    """The reference's matmuls must be true fp32 for an rtol-1e-4 comparison."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _to(problem, device):
    return tuple(t.to(device) for t in problem)


@pytest.mark.gpu
def test_fused_gpu_official_size_and_determinism(fp32_matmul):
    """Mask2Former per GPU: 10 predictions, B=2, Q=100, C=256, 128x128 -> 512x512, M=32, 12544
    points at explicit positions (fp32: rtol 1e-4), then 3 x 12544 candidates (the selection may
    differ from the per-layer reference only at exact uncertainty ties); the real atomics
    (contended) still give bit-identical gradients run to run."""
    problem = _to(make_problem(seed=12, layers=10, queries=100, channels=256, low=(128, 128), size=(512, 512),
                               segments=32, extra=12544), "cuda")
    ref = losses_and_grads("reference", *problem, 0)
    out = losses_and_grads("triton", *problem, 0)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    again = losses_and_grads("triton", *problem, 0)
    for a, b in zip(out, again):
        assert torch.equal(a, b)
    problem = _to(make_problem(seed=13, layers=10, queries=100, channels=256, low=(128, 128), size=(512, 512),
                               segments=32, candidates=3 * 12544, extra=12544 - 9408), "cuda")
    ref = losses_and_grads("reference", *problem, 9408)
    out = losses_and_grads("triton", *problem, 9408)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    fast = losses_and_grads("triton", *problem, 9408, precision="tf32")
    for a, b in zip(fast[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
