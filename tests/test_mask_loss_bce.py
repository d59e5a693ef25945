"""The BCE variant of the fused full-resolution mask loss (Mask2Former's ``mask_sampling: full``):
the reference against an independent statement (upsample, sigmoid BCE + dice), the Triton
kernels (one constexpr switch in the focal kernels) against the reference, forward and
gradients, under the interpreter on CPU; opcheck of both operators with ``loss="bce"``."""
import pytest
import torch
import torch.nn.functional as F

from fastmaskformer import ops
from fastmaskformer.ops.mask_loss import assignment_from_indices
from fastmaskformer.target import pad_segment_maps

from test_kernel_mask_loss import CASES, random_indices
from test_kernel_matching_cost import make_problem

OPS = torch.ops.fastmaskformer


def problem(case):
    batch, queries, channels, low, size, segments, extra = CASES[case]
    _, mask_embed, pixel_embed, targets = make_problem(batch, 1, queries, channels, 5, low, size, segments, **extra)
    indices = random_indices(segments, queries, torch.Generator().manual_seed(7))
    assignment = assignment_from_indices([indices], list(segments))
    return mask_embed[:1], pixel_embed, assignment, pad_segment_maps(targets, size), max(sum(segments), 1)


def run(impl, mask_embed, pixel_embed, assignment, seg_maps, num_masks):
    mask_embed = mask_embed.detach().requires_grad_()
    pixel_embed = pixel_embed.detach().requires_grad_()
    bce, dice = ops.mask_loss_assigned(mask_embed, pixel_embed, assignment, seg_maps, num_masks, impl=impl,
                                       loss="bce")
    (5 * bce + 5 * dice).sum().backward()
    return bce.detach(), dice.detach(), mask_embed.grad, pixel_embed.grad


def test_reference_is_full_resolution_bce_and_dice():
    mask_embed, pixel_embed, assignment, seg_maps, num_masks = problem("odd_sizes_noninteger_scale")
    bce, dice = ops.mask_loss_assigned(mask_embed, pixel_embed, assignment, seg_maps, num_masks, impl="torch",
                                       loss="bce")
    total_bce = total_dice = 0.0
    for b in range(assignment.shape[1]):
        for j in range(assignment.shape[2]):
            q = int(assignment[0, b, j])
            if q < 0:
                continue
            logits = torch.einsum("c,chw->hw", mask_embed[0, b, q], pixel_embed[b])
            x = F.interpolate(logits[None, None], size=seg_maps.shape[-2:], mode="bilinear",
                              align_corners=False).flatten()
            t = (seg_maps[b] == j).float().flatten()
            total_bce += F.binary_cross_entropy_with_logits(x, t)
            s = x.sigmoid()
            total_dice += 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
    torch.testing.assert_close(bce[0], total_bce / num_masks, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dice[0], total_dice / num_masks, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["m0_image_and_small_maps", "factor_2_and_8"])
def test_triton_bce_matches_reference(case):
    args = problem(case)
    ref = run("torch", *args)
    out = run("triton", *args)
    for name, a, b in zip(("bce", "dice", "grad mask_embed", "grad pixel_embed"), out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_focal_and_bce_differ_and_bad_name():
    args = problem("integer_scale_4")
    focal, _ = ops.mask_loss_assigned(*args, impl="torch")
    bce, _ = ops.mask_loss_assigned(*args, impl="torch", loss="bce")
    assert not torch.allclose(focal, bce)
    with pytest.raises(ValueError, match="focal"):
        ops.mask_loss_assigned(*args, impl="torch", loss="l2")


def test_opcheck_bce():
    mask_embed, pixel_embed, assignment, seg_maps, num_masks = problem("integer_scale_4")
    mask_embed.requires_grad_()
    pixel_embed.requires_grad_()
    args = (mask_embed, pixel_embed, assignment, seg_maps, torch.tensor(float(num_masks)))
    torch.library.opcheck(OPS.mask_loss_reference, args + ("bce",))
    torch.library.opcheck(OPS.mask_loss_forward, args + ("ieee", "bce"))
