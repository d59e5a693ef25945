"""Segments with no pixels (issue 12, item 2): the official panoptic mappers keep every
non-crowd segment, with an empty mask when a crop removed it. Targets keep them; the matching
cost, the mask loss (reference and fused kernel, under the Triton interpreter on CPU) and the
criterion accept them, and they count in num_masks."""
import types

import pytest
import torch
import torch.nn.functional as F

import fastmaskformer as fmf
from fastmaskformer import ops
from fastmaskformer.losses import HungarianMatcher, SetCriterion
from fastmaskformer.ops.matching_cost import FOCAL_ALPHA


def problem(seed=0, B=2, Q=5, K=4, C=6, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    outputs = types.SimpleNamespace(class_logits=torch.randn(2, B, Q, K + 1, generator=g),
                                    mask_embed=torch.randn(2, B, Q, C, generator=g),
                                    pixel_embed=torch.randn(B, C, h, w, generator=g))
    seg = torch.full((4 * h, 4 * w), -1, dtype=torch.int32)
    seg[:, : 2 * w] = 0
    seg[:, 2 * w:] = 2
    # segment 1 (class 3) has no pixels: a crop removed it
    targets = [fmf.Target(torch.tensor([1, 3, 0]), seg),
               fmf.Target(torch.tensor([2]), torch.zeros(4 * h - 3, 4 * w - 1, dtype=torch.int32))]
    return outputs, targets


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_matching_cost_of_an_empty_segment(impl):
    # the fused cost may use tf32 products (it only feeds the assignment): its looser tolerance
    tol = dict(rtol=1e-4, atol=1e-5) if impl == "torch" else dict(rtol=1e-2, atol=2e-2)
    out, targets = problem()
    costs = ops.matching_cost(out.class_logits[-1], out.mask_embed[-1], out.pixel_embed, targets, impl=impl)
    # by hand for the empty target t = 0: focal = mean(a_neg s^2 BCE(x, 0)), dice = 1 - 1/(sum s + 1)
    x = torch.einsum("qc,chw->qhw", out.mask_embed[-1, 0], out.pixel_embed[0]).flatten(1)
    s = x.sigmoid()
    focal = ((1 - FOCAL_ALPHA) * s**2 * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")).mean(1)
    dice = 1 - 1 / (s.sum(1) + 1)
    prob = out.class_logits[-1, 0].softmax(-1)[:, 3]
    torch.testing.assert_close(costs[0][:, 1], -prob + 20 * focal + dice, **tol)
    ref = ops.matching_cost(out.class_logits[-1], out.mask_embed[-1], out.pixel_embed, targets, impl="torch")
    for a, b in zip(costs, ref):
        torch.testing.assert_close(a, b, **tol)


def test_mask_loss_of_an_empty_segment_fused_equals_reference():
    out, targets = problem(seed=1)
    indices = [(torch.tensor([0, 2, 4]), torch.tensor([1, 2, 0])), (torch.tensor([3]), torch.tensor([0]))]
    results = []
    for impl in ("torch", "triton"):
        mask_embed = out.mask_embed[-1].clone().requires_grad_()
        pixel_embed = out.pixel_embed.clone().requires_grad_()
        focal, dice = ops.mask_loss(mask_embed, pixel_embed, indices, targets, 4.0, impl=impl)
        (20 * focal + dice).backward()
        results.append((focal.detach(), dice.detach(), mask_embed.grad, pixel_embed.grad))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_criterion_matches_and_counts_empty_segments(impl):
    out, targets = problem(seed=2)
    criterion = SetCriterion(4, HungarianMatcher(impl=impl), impl=impl)
    losses = criterion(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    matching = criterion.matcher(out.class_logits, out.mask_embed, out.pixel_embed, targets)
    for layer in matching:  # every segment, the empty one included, gets a query
        assert sorted(layer[0][1].tolist()) == [0, 1, 2] and layer[1][1].tolist() == [0]
    # num_masks = 4 (the empty segment counts): the final-layer terms equal the op's with 4.0
    qi, si = zip(*matching[-1])
    focal, dice = ops.mask_loss(out.mask_embed[-1], out.pixel_embed, list(zip(qi, si)), targets, 4.0, impl="torch")
    torch.testing.assert_close(losses["loss_mask"], focal, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["loss_dice"], dice, rtol=1e-4, atol=1e-6)
    # the query matched to the empty segment has class target 3, not "no object"
    q_empty = int(qi[0][si[0] == 1])
    classes = criterion.target_classes(matching, targets, 5, torch.device("cpu"))
    assert int(classes[-1, 0, q_empty]) == 3
