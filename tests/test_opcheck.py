"""torch.library.opcheck on every registered operator (schema, fake implementation, autograd
registration, AOT dispatch with dynamic shapes), CPU: the references, and the Triton operators
under the interpreter (registered there as custom ops whose fake skips the launches). Odd
shapes, an image with no segments, fp32 and bf16 inputs; pixel embeddings shared by the layers
[B,C,h,w] and per layer [L,B,C,h,w] (EoMT)."""
import pytest
import torch

import fastmaskformer.kernels.mask_loss  # noqa: F401  registers the Triton operators
import fastmaskformer.kernels.matching_cost  # noqa: F401
import fastmaskformer.kernels.point_loss  # noqa: F401
import fastmaskformer.kernels.point_matching_cost  # noqa: F401
from fastmaskformer.ops.mask_loss import assignment_from_indices  # registers the references
from fastmaskformer.ops.matching_cost import downsample_segment_ids  # noqa: F401

OPS = torch.ops.fastmaskformer


def _problem(dtype, segments=(3, 0), queries=5, channels=8, low=(7, 9), size=(26, 35), layers=2, seed=0,
             per_layer=False):
    """mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] (or [L,B,C,h,w] per_layer), seg_maps, labels,
    segment counts and an assignment [L,B,M]."""
    g = torch.Generator().manual_seed(seed)
    batch = len(segments)
    mask_embed = torch.randn(layers, batch, queries, channels, generator=g).to(dtype)
    pixel_embed = torch.randn(*((layers,) if per_layer else ()), batch, channels, *low, generator=g).to(dtype)
    m = max(segments)
    seg_maps = torch.full((batch, *size), -1, dtype=torch.int32)
    labels = torch.zeros(batch, m, dtype=torch.int64)
    for b, count in enumerate(segments):
        if count:
            seg_maps[b, : size[0] - 3] = torch.randint(-1, count, (size[0] - 3, size[1]), generator=g, dtype=torch.int32)
            labels[b, :count] = torch.randint(0, 4, (count,), generator=g)
    pairs = []
    for _ in range(layers):
        pairs.append([(torch.randperm(queries, generator=g)[:count], torch.arange(count)) for count in segments])
    assignment = assignment_from_indices(pairs, list(segments))
    return mask_embed, pixel_embed, seg_maps, labels, torch.tensor(segments, dtype=torch.int64), assignment


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["mask_loss_reference", "mask_loss_forward"])
def test_opcheck_mask_loss(op, dtype, per_layer):
    mask_embed, pixel_embed, seg_maps, _, _, assignment = _problem(dtype, per_layer=per_layer)
    mask_embed.requires_grad_()
    pixel_embed.requires_grad_()
    args = (mask_embed, pixel_embed, assignment, seg_maps, torch.tensor(3.0))
    if op == "mask_loss_forward":
        args = args + ("ieee",)
    torch.library.opcheck(getattr(OPS, op), args)


@pytest.mark.parametrize("per_layer", [False, True])
def test_opcheck_mask_loss_backward(per_layer):
    mask_embed, pixel_embed, seg_maps, _, _, assignment = _problem(torch.float32, per_layer=per_layer)
    focal, dice, low, stats = OPS.mask_loss_forward(mask_embed, pixel_embed, assignment, seg_maps,
                                                    torch.tensor(3.0), "ieee")
    torch.library.opcheck(OPS.mask_loss_backward, (torch.ones(2), torch.ones(2), mask_embed, pixel_embed, assignment,
                                                   seg_maps, torch.tensor(3.0), low, stats, "ieee"))


def _point_draws(assignment, candidates=12, extra=5, seed=1):
    """Uniform candidates [L,B,M,S,2] and extra points [L,B,M,R,2], some outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(assignment.shape)
    return (torch.rand(*shape, candidates, 2, generator=g) * 1.1 - 0.05,
            torch.rand(*shape, extra, 2, generator=g) * 1.1 - 0.05)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_point_loss(dtype, per_layer):
    mask_embed, pixel_embed, seg_maps, _, _, assignment = _problem(dtype, low=(5, 7), size=(18, 27),
                                                                   per_layer=per_layer)
    mask_embed.requires_grad_()
    pixel_embed.requires_grad_()
    candidates, extra = _point_draws(assignment)
    torch.library.opcheck(OPS.point_loss_forward, (mask_embed, pixel_embed, assignment, seg_maps, torch.tensor(3.0),
                                                   candidates, extra, 6, "ieee"))


@pytest.mark.parametrize("per_layer", [False, True])
def test_opcheck_point_loss_backward(per_layer):
    mask_embed, pixel_embed, seg_maps, _, _, assignment = _problem(torch.float32, low=(5, 7), size=(18, 27),
                                                                   per_layer=per_layer)
    candidates, extra = _point_draws(assignment)
    _, _, low, points, stats = OPS.point_loss_forward(mask_embed, pixel_embed, assignment, seg_maps, torch.tensor(3.0),
                                                      candidates, extra, 6, "ieee")
    torch.library.opcheck(OPS.point_loss_backward, (torch.ones(2), torch.ones(2), mask_embed, pixel_embed, assignment,
                                                    seg_maps, torch.tensor(3.0), low, points, stats, "ieee"))


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["matching_cost_reference", "matching_cost"])
def test_opcheck_matching_cost(op, dtype, per_layer):
    mask_embed, pixel_embed, seg_maps, labels, counts, _ = _problem(dtype, per_layer=per_layer)
    layers, batch, queries, _ = mask_embed.shape
    class_logits = torch.randn(layers * batch, queries, 5).to(dtype)
    seg_small = downsample_segment_ids(seg_maps, pixel_embed.shape[-2:])
    args = (class_logits, mask_embed.flatten(0, 1), pixel_embed, seg_small, labels, counts, [1.0, 20.0, 1.0])
    if op == "matching_cost":
        args = args + ("ieee", layers)
    torch.library.opcheck(getattr(OPS, op), args)


@pytest.mark.parametrize("per_layer", [False, True])
def test_opcheck_point_matching_sums(per_layer):
    mask_embed, pixel_embed, _, _, _, _ = _problem(torch.float32, low=(5, 7), per_layer=per_layer)
    g = torch.Generator().manual_seed(2)
    coords = torch.rand(*mask_embed.shape[:2], 40, 2, generator=g) * 1.1 - 0.05
    targets = torch.rand(*mask_embed.shape[:2], 3, 40, generator=g)
    torch.library.opcheck(OPS.point_matching_sums, (mask_embed, pixel_embed, coords, targets, "ieee"))


def test_opcheck_linear_sum_assignment():
    costs = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(OPS.linear_sum_assignment, (costs, torch.tensor([3, 0, 2, 3]), False, 2))


@pytest.mark.parametrize("layers", [(), (3,), (3, 3)])  # one prediction; 3 with shared / own features
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["resampled_masks_reference", "resampled_masks"])
@pytest.mark.parametrize("sizes,sigmoid", [(((7, 9), (7, 9), (7, 9)), False), (((25, 30), (19, 41), (28, 36)), True)])
def test_opcheck_resampled_masks(op, dtype, sizes, sigmoid, layers):
    import fastmaskformer.kernels.mask_probs  # noqa: F401

    g = torch.Generator().manual_seed(0)
    mask_embed = torch.randn(*layers[:1], 2, 5, 8, generator=g).to(dtype).requires_grad_()
    pixel_embed = torch.randn(*layers[1:], 2, 8, 7, 9, generator=g).to(dtype).requires_grad_()
    image, output, input_size = (list(s) for s in sizes)
    torch.library.opcheck(getattr(OPS, op), (mask_embed, pixel_embed, image, output, input_size, sigmoid, dtype))


@pytest.mark.parametrize("op", ["panoptic_assign_reference", "panoptic_assign"])
def test_opcheck_panoptic_assign(op):
    import fastmaskformer.kernels.panoptic  # noqa: F401

    g = torch.Generator().manual_seed(0)
    args = (torch.rand(4, generator=g), torch.randn(4, 8, generator=g), torch.randn(8, 7, 9, generator=g),
            [25, 30], [19, 41], [28, 36])
    torch.library.opcheck(getattr(OPS, op), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_semantic_inference(dtype):
    import fastmaskformer.kernels.semantic  # noqa: F401

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 5, 4, generator=g).to(dtype), torch.randn(2, 5, 8, generator=g).to(dtype),
            torch.randn(2, 8, 7, 9, generator=g).to(dtype), [25, 30, 28, 36], [19, 41, 28, 36], [28, 36])
    for return_score in (False, True):
        torch.library.opcheck(OPS.semantic_inference, args + (return_score, "ieee"))


@pytest.mark.parametrize("op", ["semantic_inference_tta_reference", "semantic_inference_tta"])
def test_opcheck_semantic_inference_tta(op):
    import fastmaskformer.kernels.semantic  # noqa: F401

    g = torch.Generator().manual_seed(0)
    views = [(torch.randn(5, 4, generator=g), torch.randn(5, 8, generator=g), torch.randn(8, *low, generator=g))
             for low in ((7, 9), (9, 11))]
    args = tuple(list(t) for t in zip(*views)) + ([25, 30, 33, 41], [28, 36, 36, 44], [False, True], [19, 23])
    if op == "semantic_inference_tta":
        args = args + ("ieee",)
    torch.library.opcheck(getattr(OPS, op), args)


def test_opcheck_semantic_inference_reference():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, 7, 9, generator=g),
            [25, 30, 28, 36], [19, 41, 28, 36], [28, 36])
    for return_score in (False, True):
        torch.library.opcheck(OPS.semantic_inference_reference, args + (return_score,))
