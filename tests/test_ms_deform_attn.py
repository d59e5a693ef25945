"""ms_deform_attn (issue 18): the reference and the Triton kernels (CPU interpreter) against a
direct float64 ``F.grid_sample`` computation (the official ``ms_deform_attn_core_pytorch``
formulation), forward and the three gradients; gradcheck; determinism; operator registration;
argument errors."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastmaskformer.kernels.ms_deform_attn import BACKWARD_CONFIG, _run_sums, _runs, _sort_unique
from fastmaskformer.ops import ms_deform_attn
from fastmaskformer.ops.ms_deform_attn import ms_deform_attn_plain

# Odd level sizes, a 1x1 level, a 1-row level.
SHAPES = [(5, 7), (3, 2), (1, 1), (1, 4)]
# every GPU config of the backward kernel, without its launch options
BACKWARD_GPU_CONFIGS = [{k: v for k, v in c.items() if k != "num_warps"} for c in BACKWARD_CONFIG["gpu"]]
INTERPRETER_CONFIG = BACKWARD_CONFIG["interpreter"]


def grid_sample_reference(value, spatial_shapes, loc, attn):
    """ms_deform_attn_core_pytorch's formulation: one grid_sample per level (float64 here)."""
    b, _, nh, d = value.shape
    _, lq, _, nl, npt, _ = loc.shape
    shapes = [tuple(s) for s in spatial_shapes.tolist()]
    levels = value.split([h * w for h, w in shapes], dim=1)
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(b * nh, d, h, w)
        grid = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)  # (b*h, lq, p, 2)
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attn.transpose(1, 2).reshape(b * nh, 1, lq, nl * npt)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # (b*h, d, lq)
    return out.view(b, nh * d, lq).transpose(1, 2)


def make_inputs(b=2, lq=11, nh=2, d=32, npt=3, shapes=SHAPES, dtype=torch.float32, loc_dtype=None, seed=0,
                borders=True):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    s = sum(h * w for h, w in shapes)
    nl = len(shapes)
    value = torch.randn(b, s, nh, d, generator=g)
    loc = torch.rand(b, lq, nh, nl, npt, 2, generator=g) * 1.6 - 0.3  # some outside the map
    if borders:  # points exactly on the borders, at the corners, and far outside (one per query)
        special = [(0.0, 0.0), (1.0, 1.0), (0.0, 0.5), (1.0, 0.3), (0.4, 0.0), (0.6, 1.0), (-3.0, 0.5), (0.5, 7.0)]
        for i, xy in enumerate(special[:lq]):
            loc[:, i, :, :, 0] = torch.tensor(xy)
    attn = torch.rand(b, lq, nh, nl, npt, generator=g)
    attn = attn / attn.sum(dim=(3, 4), keepdim=True)
    return value.to(dtype), spatial_shapes, loc.to(loc_dtype or dtype), attn.to(loc_dtype or dtype)


def run(impl, value, shapes, loc, attn, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], impl=impl)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return (out,) + grads


def fp64_truth(value, shapes, loc, attn, grad):
    leaves = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    out = grid_sample_reference(leaves[0], shapes, leaves[1], leaves[2])
    return (out,) + torch.autograd.grad(out, leaves, grad.double())


def assert_close_all(got, want, atol, rtol, names=("out", "grad_value", "grad_loc", "grad_attn")):
    for name, x, y in zip(names, got, want):
        torch.testing.assert_close(x.double(), y.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("d,nh,npt,shapes", [(32, 2, 3, SHAPES), (64, 1, 4, SHAPES[:3]), (24, 3, 1, [(4, 4)])])
def test_fp32_matches_fp64_grid_sample(impl, d, nh, npt, shapes):
    value, ss, loc, attn = make_inputs(nh=nh, d=d, npt=npt, shapes=shapes)
    grad = torch.randn(value.shape[0], loc.shape[1], nh * d)
    got = run(impl, value, ss, loc, attn, grad)
    # The location gradient is scaled by the level size; fp32 vs fp64 coordinates.
    assert_close_all(got, fp64_truth(value, ss, loc, attn, grad), atol=2e-5, rtol=1e-4)


def test_triton_equals_reference_fp32():
    value, ss, loc, attn = make_inputs(seed=3)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    assert_close_all(run("triton", value, ss, loc, attn, grad), run("torch", value, ss, loc, attn, grad),
                     atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,loc_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32)])
def test_half_inputs_fp32_accumulation(dtype, loc_dtype):
    """16-bit inputs (also mixed, as under autocast): the kernel upcasts and accumulates in fp32,
    so it matches the fp32 computation on the same (rounded) inputs up to the output rounding."""
    value, ss, loc, attn = make_inputs(dtype=dtype, loc_dtype=loc_dtype, seed=1)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3]).to(dtype)
    got = run("triton", value, ss, loc, attn, grad)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == loc_dtype
    want = fp64_truth(value, ss, loc, attn, grad)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for name, x, y in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, want):
        scale = y.abs().amax().item()
        err = (x.double() - y).abs().amax().item()
        assert err <= tol * scale, f"{name}: max error {err} vs scale {scale}"
    ref = run("torch", value, ss, loc, attn, grad)
    assert ref[0].dtype == dtype


def test_gradcheck_fp64_torch_path():
    value, ss, loc, attn = make_inputs(b=1, lq=4, nh=2, d=3, npt=2, shapes=[(3, 2), (1, 1), (2, 3)],
                                       dtype=torch.float64, borders=False)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, lo, a: ms_deform_attn(v, ss, lo, a, impl="torch"), inputs)


def test_triton_backward_bit_identical_across_runs():
    # Many queries sampling the same few value rows: many contributions per value row; signed
    # attention weights (the fixed-point bound uses their magnitudes).
    value, ss, loc, attn = make_inputs(lq=40, shapes=[(2, 3), (1, 1)], seed=5)
    attn = attn * torch.randn(attn.shape, generator=torch.Generator().manual_seed(1)) * 3
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    first = run("triton", value, ss, loc, attn, grad)
    second = run("triton", value, ss, loc, attn, grad)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_fixed_point_value_gradient_precision():
    """The fixed-point value gradient is an exact sum of fp32 contributions: with gradients of
    very different magnitudes per head it still matches fp64 to fp32 precision."""
    value, ss, loc, attn = make_inputs(lq=30, nh=2, shapes=[(3, 3), (1, 1)], seed=7)
    grad = torch.randn(value.shape[0], loc.shape[1], 2, value.shape[3])
    grad[:, :, 1] *= 1e-4  # second head's gradients 10^4 times smaller
    grad = grad.flatten(2)
    got = run("triton", value, ss, loc, attn, grad)[1]
    want = fp64_truth(value, ss, loc, attn, grad)[1]
    for h in range(2):
        torch.testing.assert_close(got[:, :, h].double(), want[:, :, h], atol=1e-6 * want[:, :, h].abs().max(),
                                   rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf, nan
def test_nonfinite_grad_gives_nan_value_gradient():
    """A non-finite grad_out makes the value gradient of its (image, head) NaN, the others exact."""
    value, ss, loc, attn = make_inputs(lq=5, shapes=[(2, 2)])
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    grad[0, 0, 0] = float("inf")  # image 0, head 0
    got = run("triton", value, ss, loc, attn, grad)[1]
    assert torch.isnan(got[0, :, 0]).all()
    clean = grad.clone()
    clean[0, :, :value.shape[3]] = 0
    want = run("triton", value, ss, loc, attn, clean)[1]
    assert torch.equal(got[1], want[1]) and torch.equal(got[0, :, 1:], want[0, :, 1:])


def test_plain_reference_matches_grid_sample_definition():
    value, ss, loc, attn = make_inputs(dtype=torch.float64)
    torch.testing.assert_close(ms_deform_attn_plain(value, ss, loc, attn),
                               grid_sample_reference(value, ss, loc, attn), atol=1e-12, rtol=1e-12)


def test_auto_on_cpu_is_reference():
    value, ss, loc, attn = make_inputs(lq=3, shapes=[(2, 2)])
    torch.testing.assert_close(ms_deform_attn(value, ss, loc, attn),
                               ms_deform_attn(value, ss, loc, attn, impl="torch"), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_reference_op(dtype):
    value, ss, loc, attn = make_inputs(b=1, lq=3, nh=2, d=4, npt=2, shapes=[(2, 3), (1, 1)], borders=False,
                                       dtype=dtype)
    args = (value.requires_grad_(), ss, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(torch.ops.fastmaskformer.ms_deform_attn_reference.default, args)


@pytest.mark.parametrize("dtype,loc_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_opcheck_triton_ops(dtype, loc_dtype):
    from fastmaskformer.kernels import ms_deform_attn as kernel

    value, ss, loc, attn = make_inputs(b=1, lq=3, nh=2, d=8, npt=2, shapes=[(2, 3), (1, 1)], borders=False,
                                       dtype=dtype, loc_dtype=loc_dtype)
    args = (value.requires_grad_(), ss, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(torch.ops.fastmaskformer.ms_deform_attn_forward.default, args)
    grad = torch.randn(1, 3, 16, dtype=dtype)
    torch.library.opcheck(torch.ops.fastmaskformer.ms_deform_attn_backward.default,
                          (grad, value.detach(), ss, loc.detach(), attn.detach()))
    assert kernel.ms_deform_attn_forward is not None


def _bad(**over):
    value, ss, loc, attn = make_inputs(b=1, lq=2, nh=2, d=4, npt=2, shapes=[(2, 3), (1, 1)], borders=False)
    kwargs = dict(value=value, spatial_shapes=ss, sampling_locations=loc, attention_weights=attn)
    kwargs.update(over)
    return kwargs


@pytest.mark.parametrize("over,exc,words", [
    (dict(value=torch.zeros(1, 7, 2)), ValueError, "value must be 4-D"),
    (dict(value=torch.zeros(1, 8, 2, 4)), ValueError, "S=8"),
    (dict(value=torch.zeros(1, 7, 2, 4, dtype=torch.int32)), TypeError, "value must be float"),
    (dict(spatial_shapes=torch.tensor([[2.0, 3.0], [1.0, 1.0]])), TypeError, "spatial_shapes must be int64"),
    (dict(spatial_shapes=torch.tensor([[2, 3, 1]])), ValueError, "spatial_shapes must be [L,2]"),
    (dict(spatial_shapes=torch.tensor([[7, 1], [0, 5]])), ValueError, "positive"),
    (dict(sampling_locations=torch.zeros(1, 2, 2, 3, 2, 2)), ValueError, "sampling_locations must be [B=1,Lq,H=2,L=2"),
    (dict(sampling_locations=torch.zeros(1, 2, 2, 2, 2)), ValueError, "sampling_locations must be 6-D"),
    (dict(attention_weights=torch.zeros(1, 2, 2, 2, 3)), ValueError, "attention_weights must be [B,Lq,H,L,P]"),
    (dict(attention_weights=[1.0]), TypeError, "attention_weights must be a torch.Tensor"),
])
def test_bad_arguments(over, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[")):
        ms_deform_attn(**_bad(**over))


def test_triton_rejects_float64_and_bad_impl():
    with pytest.raises(TypeError, match="impl='torch' for float64"):
        ms_deform_attn(**{k: (v.double() if v.is_floating_point() else v) for k, v in _bad().items()}, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        ms_deform_attn(**_bad(), impl="cuda")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_torch_compile_fullgraph(impl):
    """The registered operators trace without graph breaks (aot_eager: no inductor compile)."""
    value, ss, loc, attn = make_inputs(b=1, lq=3, nh=2, d=8, npt=2, shapes=[(2, 3), (1, 1)], borders=False)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]

    def f(v, lo, a):
        return ms_deform_attn(v, ss, lo, a, impl=impl).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(f(*leaves), leaves)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_official_function_drop_in():
    from fastmaskformer.ops import MSDeformAttnFunction
    from fastmaskformer.ops.ms_deform_attn import level_start_index

    value, ss, loc, attn = make_inputs(lq=4, shapes=[(3, 2), (1, 1)])
    torch.testing.assert_close(MSDeformAttnFunction.apply(value, ss, level_start_index(ss), loc, attn, 64),
                               ms_deform_attn(value, ss, loc, attn), atol=0, rtol=0)


def test_fixed_point_worst_case_all_samples_on_one_row():
    """Every sample lands with weight 1 on the single pixel of a 1x1 level and every gradient is
    the largest: the value gradient's sum reaches the bound the fixed-point scale is built from."""
    b, lq, nh, d, npt = 1, 64, 2, 8, 4
    ss = torch.tensor([[1, 1]])
    value = torch.randn(b, 1, nh, d)
    loc = torch.full((b, lq, nh, 1, npt, 2), 0.5)  # the pixel centre: one tap, weight 1
    attn = torch.full((b, lq, nh, 1, npt), 1.0 / npt)
    grad = torch.full((b, lq, nh * d), -3.0e5)
    got = run("triton", value, ss, loc, attn, grad)[1]
    want = fp64_truth(value, ss, loc, attn, grad)[1]
    torch.testing.assert_close(got.double(), want, atol=0, rtol=1e-6)
    assert torch.isfinite(got).all()


def test_float_atomic_backward_agrees():
    """deterministic=False (float32 atomics, the official scheme) computes the same gradients."""
    value, ss, loc, attn = make_inputs(lq=6, shapes=[(3, 2), (1, 1)])
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    want = run("triton", value, ss, loc, attn, grad)
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], ss, leaves[1], leaves[2], impl="triton", deterministic=False)
    got = (out,) + torch.autograd.grad(out, leaves, grad)
    assert_close_all(got, want, atol=1e-5, rtol=1e-5)


def test_fixed_point_bound_covers_every_row():
    """The 32-bit scale of (image, level, head) comes from the level's largest 2x2 box sum of the
    per-row mass times max|grad_out|: that bound covers the true sum of |contributions| of every
    value-gradient element of the level (so no partial sum can overflow)."""
    from fastmaskformer.kernels import ms_deform_attn as kernel

    value, ss, loc, attn = make_inputs(b=1, lq=40, nh=2, shapes=[(6, 6), (1, 1)], seed=2, borders=False)
    attn = attn * torch.randn(attn.shape, generator=torch.Generator().manual_seed(3))  # signed weights
    grad = torch.randn(1, 40, value.shape[2] * value.shape[3])
    g_max, a_sum, box_max = kernel.value_gradient_bounds(grad, value, ss, loc, attn)
    assert box_max.shape == (1, 2, 2) and box_max.dtype == torch.int32
    torch.testing.assert_close(g_max, grad.view(1, 40, 2, -1).abs().amax(dim=(1, 3)))
    _, exponent = torch.frexp(a_sum.double() * (1 + 2.0 ** -20))
    mass_scale = torch.ldexp(torch.ones(()), kernel.MASS_BITS.value - exponent)  # the kernels' rule
    bound = box_max.double() / mass_scale[:, None, :].double() * g_max[:, None, :].double()
    # True per-row sum of |a * w_tap| * max|g|: the fp64 value gradient for |a| and |grad| = max|g|.
    ones = torch.ones(1, 40, 2, value.shape[3]) * g_max[:, None, :, None]
    true = fp64_truth(value, ss, loc, attn.abs(), ones.flatten(2))[1].abs().amax(-1)  # (b, s, h)
    for lvl, rows in ((0, slice(0, 36)), (1, slice(36, 37))):
        worst = true[0, rows].amax(0)  # (h,)
        assert (bound[0, lvl] >= worst).all(), (lvl, bound, worst)


def test_fixed_point_box_sum_reaches_its_bound():
    """Four samples whose top-left taps are the four pixels around pixel (1, 1) of a 3x3 level all
    put (almost) their whole weight on (1, 1): its sum is 4x the largest per-row mass, so only the
    2x2 box sum bounds it; the scale must not overflow there."""
    frac = 1.0 - 2.0 ** -12
    pix = torch.tensor([(frac, frac), (1.0, frac), (frac, 1.0), (1.0, 1.0)])  # (x_pix, y_pix)
    loc = ((pix + 0.5) / 3).view(1, 4, 1, 1, 1, 2)  # top-left taps (0,0), (1,0), (0,1), (1,1)
    attn = torch.ones(1, 4, 1, 1, 1)
    value, ss = torch.randn(1, 9, 1, 4), torch.tensor([[3, 3]])
    grad = torch.full((1, 4, 4), 7.0)
    got = run("triton", value, ss, loc, attn, grad)[1]
    torch.testing.assert_close(got.double(), fp64_truth(value, ss, loc, attn, grad)[1], atol=1e-5, rtol=1e-6)


def test_value_gradient_independent_of_summation_order():
    """What makes the GPU backward deterministic: the fixed-point value gradient does not depend
    on the order the contributions arrive in. Permuting the queries reorders every value row's
    sum (the interpreter runs the atomics in query order; the merged scatter sorts the taps by
    (row, tap), which the permutation changes too); the result stays bit-identical, merged or not."""
    from fastmaskformer.kernels import ms_deform_attn as kernel

    value, ss, loc, attn = make_inputs(lq=48, shapes=[(2, 3), (1, 1)], seed=11, borders=False)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    perm = torch.randperm(loc.shape[1], generator=torch.Generator().manual_seed(0))
    permuted = (grad[:, perm].contiguous(), value, ss, loc[:, perm].contiguous(), attn[:, perm].contiguous())
    per_tap = dict(INTERPRETER_CONFIG, MERGE=False)
    for config in (None, per_tap):
        first = kernel._launch_backward(grad, value, ss, loc, attn, True, config=config)
        second = kernel._launch_backward(*permuted, True, config=config)
        assert torch.equal(first[0], second[0])
        assert torch.equal(first[1][:, perm], second[1]) and torch.equal(first[2][:, perm], second[2])
    # The float-atomic variant (the official extension's scheme) sums in arrival order: it differs.
    floats = [kernel._launch_backward(*args, False, config=per_tap)[0]
              for args in ((grad, value, ss, loc, attn), permuted)]
    assert not torch.equal(floats[0], floats[1])


@pytest.mark.parametrize("config", BACKWARD_GPU_CONFIGS,
                         ids=lambda c: f"TILE{c['TILE']}-QBLOCKS{c['QBLOCKS']}-MERGE{int(c['MERGE'])}-D{c.get('MERGE_D', '')}")
def test_every_backward_config_gives_the_same_gradients(config):
    """Each GPU config of the backward (query blocks per program, QBLOCKS) run through the
    interpreter: bit-identical to the default launch, with a query count that gives every config
    several programs per head and leaves the last one's blocks partly and wholly empty."""
    from fastmaskformer.kernels import ms_deform_attn as kernel

    value, ss, loc, attn = make_inputs(b=1, lq=77, nh=1, shapes=[(5, 4), (2, 3), (1, 1)], seed=13)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    for deterministic in (True, False):
        want = kernel._launch_backward(grad, value, ss, loc, attn, deterministic)
        got = kernel._launch_backward(grad, value, ss, loc, attn, deterministic, config=config)
        for name, x, y in zip(("grad_value", "grad_loc", "grad_attn"), got, want):
            if deterministic or name != "grad_value":
                assert torch.equal(x, y), (name, deterministic)
            else:  # float atomics: another arrival order
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_grid_sample_formulation_summed_per_level_equals_stacked():
    """The CPU eager path sums the weighted samples level by level; the benchmarks' baseline (the
    official formulation) stacks them first: the same values up to float32 round-off."""
    from fastmaskformer.ops.ms_deform_attn import ms_deform_attn_grid_sample

    value, ss, loc, attn = make_inputs(lq=9, nh=3, npt=2, seed=4)
    shapes = [tuple(s) for s in ss.tolist()]
    stacked = ms_deform_attn_grid_sample(value, shapes, loc, attn)
    per_level = ms_deform_attn_grid_sample(value, shapes, loc, attn, sum_per_level=True)
    torch.testing.assert_close(per_level, stacked, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_level.double(), grid_sample_reference(value.double(), ss, loc.double(),
                                                                        attn.double()), atol=1e-6, rtol=1e-5)


def test_merged_scatter_with_int64_sort_keys():
    """The merged scatter's int64 keys (large maps, where row * taps overflows int32) give the
    same gradients as the int32 keys."""
    from fastmaskformer.kernels import ms_deform_attn as kernel

    value, ss, loc, attn = make_inputs(b=1, lq=20, nh=2, shapes=[(4, 3), (1, 2)], seed=5)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    want = kernel._launch_backward(grad, value, ss, loc, attn, True)
    got = kernel._launch_backward(grad, value, ss, loc, attn, True, wide_keys=True)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@triton.jit
def _sort_and_runs_harness(keys_ptr, sorted_ptr, rows_ptr, c_ptr, total_ptr, last_ptr, T: tl.constexpr,
                                 D: tl.constexpr):
    t = tl.arange(0, T)
    tl.store(sorted_ptr + t, _sort_unique(tl.load(keys_ptr + t), T))
    tile = t[:, None] * D + tl.arange(0, D)[None, :]
    first, last = _runs(tl.load(rows_ptr + t), T)
    total = _run_sums(tl.load(c_ptr + tile), first, T, D)
    tl.store(total_ptr + tile, total.to(total_ptr.dtype.element_ty))
    tl.store(last_ptr + t, last.to(tl.int32))


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_sort_and_run_sums(n):
    """The merged scatter's pieces on their own: ``_sort_unique`` sorts distinct keys; ``_runs``
    marks the last position of each run of equal rows and ``_run_sums`` gives it the run's sum
    (int32, also where the prefix sums wrap around, and float)."""
    g = torch.Generator().manual_seed(n)
    keys = torch.randperm(10 * n, generator=g)[:n].to(torch.int32)
    rows = torch.randint(0, max(1, n // 3), (n,), generator=g).sort().values.to(torch.int32)
    for c in (torch.randint(-2 ** 30, 2 ** 30, (n, 4), generator=g, dtype=torch.int32),
              torch.randn(n, 4, generator=g)):
        out_sorted, total, last = torch.empty_like(keys), torch.empty_like(c), torch.empty(n, dtype=torch.int32)
        _sort_and_runs_harness[(1,)](keys, out_sorted, rows, c, total, last, T=n, D=4)
        assert torch.equal(out_sorted, keys.sort().values)
        ends = torch.ones(n, dtype=torch.bool)
        ends[:-1] = rows[1:] != rows[:-1]
        assert torch.equal(last.bool(), ends)
        for r in rows.unique():
            run = rows == r
            want = c[run].long().sum(0) if c.dtype == torch.int32 else c[run].double().sum(0)
            end = run.nonzero().max()
            if c.dtype == torch.int32:  # the run's sum modulo 2^32, as int32 atomics add it
                want = ((want + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)
                assert torch.equal(total[end], want)
            else:
                torch.testing.assert_close(total[end].double(), want, atol=1e-6, rtol=1e-6)


def test_restrict_backward_configs_and_restore():
    """``restrict_backward_configs`` (the benchmark's per-tap provider) lets the autotuner choose only
    among matching configs, with its own choice cache, and restores both afterwards."""
    from fastmaskformer.kernels import ms_deform_attn as kernel

    tuner = kernel._ms_deform_attn_bwd_kernel
    configs, cache = tuner.configs, tuner.cache
    value, ss, loc, attn = make_inputs(b=1, lq=9, nh=1, shapes=[(3, 2)], seed=4)
    grad = torch.randn(1, 9, value.shape[3])
    want = kernel.ms_deform_attn_backward(grad, value, ss, loc, attn)
    with kernel.restrict_backward_configs(MERGE=True):
        assert tuner.configs and all(c.kwargs["MERGE"] for c in tuner.configs) and tuner.cache is not cache
        got = kernel.ms_deform_attn_backward(grad, value, ss, loc, attn)
    assert tuner.configs is configs and tuner.cache is cache
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    with pytest.raises(ValueError, match="no backward config"), kernel.restrict_backward_configs(MERGE="both"):
        pass


@pytest.mark.gpu
def test_gpu_every_backward_config_bit_identical_at_pixel_decoder_size():
    """On a GPU, at one pixel-decoder call's size (B=2, 16x16 + 32x32 + 64x64 levels, Lq = S,
    H=8, D=32, P=4): every backward config (per-tap and merged, real contended atomics) gives
    bit-identical fixed-point gradients, run after run, close to the float64 formulation."""
    from fastmaskformer.kernels import ms_deform_attn as kernel

    shapes = [(16, 16), (32, 32), (64, 64)]
    value, ss, loc, attn = (t.cuda() for t in make_inputs(b=2, lq=16 * 16 + 32 * 32 + 64 * 64, nh=8, d=32, npt=4,
                                                          shapes=shapes, seed=21, borders=False))
    grad = torch.randn(value.shape[0], loc.shape[1], 8 * 32, device="cuda")
    want = kernel._launch_backward(grad, value, ss, loc, attn, True)
    truth = fp64_truth(value, ss, loc, attn, grad)[1:]
    for name, x, y in zip(("grad_value", "grad_loc", "grad_attn"), want, truth):
        torch.testing.assert_close(x.double(), y, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for config in BACKWARD_CONFIG["gpu"]:
        for _ in range(2):
            got = kernel._launch_backward(grad, value, ss, loc, attn, True, config=config)
            assert all(torch.equal(x, y) for x, y in zip(got, want)), config
