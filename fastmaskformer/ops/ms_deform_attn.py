"""Multi-scale deformable attention (Deformable DETR; the pixel decoder of Mask2Former), issue 18.

For every query q, head h, level l and point p, the value map of level l (head h) is sampled
bilinearly at the normalised location ``(x, y)`` and the samples are summed with the attention
weights::

    out[b, q, h*D:(h+1)*D] = sum_{l,p} a[b,q,h,l,p] * bilinear(value_l[b, :, :, h, :], loc[b,q,h,l,p])

The sampling is ``F.grid_sample(..., mode="bilinear", padding_mode="zeros",
align_corners=False)`` at ``grid = 2 * loc - 1``: the pixel coordinate is
``x_pix = x * w_l - 0.5`` (pixel centres at half-integers of the normalised grid), the four
neighbours ``floor(x_pix) + {0, 1}`` are weighted by the distances, and a neighbour outside the
map contributes zero. These are exactly the semantics of the official pure-PyTorch
``ms_deform_attn_core_pytorch`` (and of the official CUDA extension ``MultiScaleDeformableAttention``,
which this op replaces).

``impl="triton"`` runs the fused kernels of ``kernels/ms_deform_attn.py`` (registered as the
operators ``fastmaskformer::ms_deform_attn_forward`` / ``_backward``); ``impl="torch"`` the
reference below, registered as ``fastmaskformer::ms_deform_attn_reference`` (opaque to
``torch.compile``, differentiable: its backward is the vjp of the plain function, recomputed;
on real tensors it evaluates the definition through the official ``grid_sample`` formulation,
which the tests hold equal to ``ms_deform_attn_plain``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import load_kernel, resolve_impl

OP = "ms_deform_attn"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- reference
def level_start_index(spatial_shapes: Tensor) -> Tensor:
    """Offsets of the levels in the flattened value: int64 ``[L]``, ``[0, h0*w0, ...]``."""
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cumsum(sizes, 0) - sizes


def ms_deform_attn_plain(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                         attention_weights: Tensor) -> Tensor:
    """The definition as plain tensor code (no host reads of ``spatial_shapes``, so it also
    traces with fake tensors). value [B,S,H,D], spatial_shapes int64 [L,2] (h, w),
    sampling_locations [B,Lq,H,L,P,2] (x, y in [0,1]), attention_weights [B,Lq,H,L,P]
    -> [B,Lq,H*D] in value's dtype. Computes in float32 (float64 if any input is float64)."""
    b, s, nh, d = value.shape
    _, lq, _, nl, npt, _ = sampling_locations.shape
    ctype = torch.float64 if torch.float64 in (value.dtype, sampling_locations.dtype,
                                               attention_weights.dtype) else torch.float32
    v = value.to(ctype).permute(0, 2, 1, 3)  # (b, h, s, d)
    loc = sampling_locations.to(ctype).permute(0, 2, 1, 3, 4, 5)  # (b, h, lq, l, p, 2)
    attn = attention_weights.to(ctype).permute(0, 2, 1, 3, 4)  # (b, h, lq, l, p)
    shapes = spatial_shapes.to(torch.int64)
    hl = shapes[:, 0].view(nl, 1)  # (l, 1): broadcasts against (..., l, p)
    wl = shapes[:, 1].view(nl, 1)
    start = level_start_index(shapes).view(nl, 1)
    # Pixel coordinates: grid_sample's unnormalisation with align_corners=False.
    x = loc[..., 0] * wl.to(ctype) - 0.5
    y = loc[..., 1] * hl.to(ctype) - 0.5
    x0f, y0f = torch.floor(x), torch.floor(y)
    fx, fy = x - x0f, y - y0f
    x0, y0 = x0f.to(torch.int64), y0f.to(torch.int64)
    out = torch.zeros(b, nh, lq, d, dtype=ctype, device=value.device)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl)  # zero padding
            row = torch.where(inside, start + yi.clamp(min=0) * wl + xi.clamp(min=0), 0)
            weight = torch.where(inside, wy * wx * attn, 0)
            gathered = torch.gather(v, 2, row.reshape(b, nh, -1, 1).expand(-1, -1, -1, d))
            gathered = gathered.view(b, nh, lq, nl * npt, d)
            out = out + (weight.reshape(b, nh, lq, nl * npt, 1) * gathered).sum(3)
    return out.permute(0, 2, 1, 3).reshape(b, lq, nh * d).to(value.dtype)


def ms_deform_attn_grid_sample(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                               attention_weights: Tensor, sum_per_level: bool = False) -> Tensor:
    """The official formulation (``ms_deform_attn_core_pytorch``): one ``F.grid_sample`` per level
    on ``[B*H, D, h, w]`` maps, then the weighted sum over the stacked ``[B*H, D, Lq, L*P]``
    samples. ``shapes``: the levels' (h, w) as Python ints. The benchmarks' eager baseline.

    ``sum_per_level``: the weighted sum taken level by level (``sum_l (samples_l * a_l).sum(-1)``):
    no stack copy and temporaries a third of the size (on the Mask2Former R50 shape at 256 px the
    stacked one is 33 MB, past glibc's 32 MB mmap threshold, so every step page-faulted it in
    anew, forward and backward). The same samples summed in another order (float32 round-off);
    the CPU eager path of the reference."""
    import torch.nn.functional as F

    b, _, nh, d = value.shape
    _, lq, _, nl, npt, _ = sampling_locations.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    weights = attention_weights.transpose(1, 2).reshape(b * nh, 1, lq, nl, npt)
    samples, out = [], None
    for lvl, (h, w) in enumerate(shapes):
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(b * nh, d, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (b*h, lq, p, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if sum_per_level:
            part = (sampled * weights[..., lvl, :]).sum(-1)  # (b*h, d, lq)
            out = part if out is None else out + part
        else:
            samples.append(sampled)
    if not sum_per_level:
        out = (torch.stack(samples, dim=-2).flatten(-2) * weights.flatten(-2)).sum(-1)  # (b*h, d, lq)
    return out.view(b, nh * d, lq).transpose(1, 2).contiguous()


def _reference_eager(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                     attention_weights: Tensor) -> Tensor:
    """The operator's real-tensor body: the official ``grid_sample`` formulation, summed per
    level (:func:`ms_deform_attn_grid_sample` with ``sum_per_level``; native kernels; about 4x
    faster than :func:`ms_deform_attn_plain` on the CPU in a Mask2Former step), in the compute
    dtype of ``ms_deform_attn_plain`` (float32, float64 if any input is), cast back to value's.
    Traced (fake ``spatial_shapes``, e.g. the backward under AOT autograd): the plain code."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(spatial_shapes):
        return ms_deform_attn_plain(value, spatial_shapes, sampling_locations, attention_weights)
    ctype = torch.float64 if torch.float64 in (value.dtype, sampling_locations.dtype,
                                               attention_weights.dtype) else torch.float32
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    out = ms_deform_attn_grid_sample(value.to(ctype), shapes, sampling_locations.to(ctype),
                                     attention_weights.to(ctype), sum_per_level=True)
    return out.to(value.dtype)


@torch.library.custom_op("fastmaskformer::ms_deform_attn_reference", mutates_args=())
def _reference_op(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    return _reference_eager(value, spatial_shapes, sampling_locations, attention_weights)


@_reference_op.register_fake
def _(value, spatial_shapes, sampling_locations, attention_weights):
    b, _, nh, d = value.shape
    return value.new_empty(b, sampling_locations.shape[1], nh * d)


def _reference_setup(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)


def _reference_backward(ctx, grad):
    value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda v, loc, a: _reference_eager(v, spatial_shapes, loc, a),
                            value, sampling_locations, attention_weights)
    grad_value, grad_loc, grad_attn = vjp(grad)
    return grad_value, None, grad_loc, grad_attn


_reference_op.register_autograd(_reference_backward, setup_context=_reference_setup)


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """The reference as the operator ``fastmaskformer::ms_deform_attn_reference``."""
    return torch.ops.fastmaskformer.ms_deform_attn_reference(value, spatial_shapes, sampling_locations,
                                                             attention_weights)


# ---------------------------------------------------------------------------- public op
def _check(value, spatial_shapes, sampling_locations, attention_weights) -> None:
    for name, t, dim in (("value", value, 4), ("sampling_locations", sampling_locations, 6),
                         ("attention_weights", attention_weights, 5)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{OP}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if not isinstance(spatial_shapes, Tensor):
        raise TypeError(f"{OP}: spatial_shapes must be a torch.Tensor, got {type(spatial_shapes).__name__}")
    if spatial_shapes.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{OP}: spatial_shapes must be int64 (h, w) per level, got {spatial_shapes.dtype}")
    b, s, nh, d = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(f"{OP}: spatial_shapes must be [L,2] with L >= 1, got shape {tuple(spatial_shapes.shape)}")
    nl = spatial_shapes.shape[0]
    lb, lq, lh, ll, npt, two = sampling_locations.shape
    if (lb, lh, ll, two) != (b, nh, nl, 2):
        raise ValueError(f"{OP}: sampling_locations must be [B={b},Lq,H={nh},L={nl},P,2], "
                         f"got shape {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != (b, lq, nh, nl, npt):
        raise ValueError(f"{OP}: attention_weights must be [B,Lq,H,L,P] = {(b, lq, nh, nl, npt)}, "
                         f"got shape {tuple(attention_weights.shape)}")
    devices = {t.device for t in (value, sampling_locations, attention_weights)}
    if len(devices) > 1:
        raise ValueError(f"{OP}: value, sampling_locations and attention_weights on different devices {devices}")
    if not torch.compiler.is_compiling():  # a host read of spatial_shapes: skipped under tracing
        shapes = spatial_shapes.detach().cpu()
        if bool((shapes < 1).any()):
            raise ValueError(f"{OP}: spatial_shapes must be positive, got {shapes.tolist()}")
        total = int((shapes[:, 0] * shapes[:, 1]).sum())
        if total != s:
            raise ValueError(f"{OP}: value has S={s} rows but spatial_shapes {shapes.tolist()} "
                             f"sum to {total} (S must be sum of h*w)")


def _eager(*tensors: Tensor) -> bool:
    """Real tensors outside torch.compile / torch.export (no fake or meta tensors)."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return not any(t.device.type == "meta" or is_fake(t) for t in tensors)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor, impl: str = "auto", deterministic: bool = True) -> Tensor:
    """Multi-scale deformable attention -> ``[B, Lq, H*D]`` in value's dtype.

    value: [B, S, H, D], the levels flattened row-major one after the other
    (``S = sum_l h_l * w_l``). spatial_shapes: int64 [L, 2], ``(h_l, w_l)`` per level.
    sampling_locations: [B, Lq, H, L, P, 2], normalised ``(x, y)`` (0 and 1 are the map's outer
    edges; outside the map samples zeros). attention_weights: [B, Lq, H, L, P].

    Any floating dtypes (they may differ: autocast gives bf16 values with fp32 locations);
    accumulation is in float32 (float64 for float64 inputs, torch path only). Differentiable in
    value, sampling_locations and attention_weights. The Triton backward is deterministic
    (bit-identical across runs: 32-bit fixed-point integer atomics; see
    ``kernels/ms_deform_attn.py``); ``deterministic=False`` sums the value gradient with float32
    atomics instead, as the official extension does (Triton path only; the reference ignores it).
    ``impl="auto"``: Triton on CUDA tensors (float64 goes to the reference), else the reference.
    """
    _check(value, spatial_shapes, sampling_locations, attention_weights)
    tensors = (value, sampling_locations, attention_weights)
    shapes = spatial_shapes.to(device=value.device, dtype=torch.int64)
    if impl == "auto" and any(t.dtype == torch.float64 for t in tensors):
        impl = "torch"
    if resolve_impl(impl, *tensors, op=OP) == "triton":
        bad = [t.dtype for t in tensors if t.dtype not in TRITON_DTYPES]
        if bad:
            raise TypeError(f"{OP}: impl='triton' takes float32, float16 or bfloat16, got {bad[0]}; "
                            "use impl='torch' for float64")
        if torch.compiler.is_compiling():  # dynamo traces an import statement, not importlib
            from fastmaskformer.kernels import ms_deform_attn as kernel
        else:
            kernel = load_kernel("ms_deform_attn", OP)
        return kernel.ms_deform_attn(value.contiguous(), shapes.contiguous(), sampling_locations.contiguous(),
                                     attention_weights.contiguous(), bool(deterministic))
    if _eager(value, shapes, sampling_locations, attention_weights):
        # Eager: autograd through the native grid_sample formulation itself, which keeps its
        # samples for the backward instead of recomputing the forward inside the operator's vjp
        # (a Mask2Former CPU step ran the 6 encoder layers' forward twice). The same values.
        return _reference_eager(value, shapes, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)


class MSDeformAttnFunction:
    """Drop-in for the official extension's autograd Function (``ops/functions/ms_deform_attn_func.py``
    of Deformable DETR / Mask2Former): ``MSDeformAttnFunction.apply(value, value_spatial_shapes,
    value_level_start_index, sampling_locations, attention_weights, im2col_step)``. The level
    starts are derived from the shapes and there is no im2col step, so both are ignored."""

    @staticmethod
    def apply(value: Tensor, value_spatial_shapes: Tensor, value_level_start_index: Tensor | None,
              sampling_locations: Tensor, attention_weights: Tensor, im2col_step: int = 64) -> Tensor:
        return ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights)
