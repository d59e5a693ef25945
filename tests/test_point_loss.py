"""Mask2Former's point-sampled matching cost and loss against an independent statement of the
official formulas (facebookresearch/Mask2Former ``matcher.py`` / ``criterion.py`` and
detectron2's ``point_sample`` / ``get_uncertain_point_coords_with_randomness``), on the same
explicit points: values, gradients and the end-to-end criterion."""
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from fastmaskformer.losses import PointSampledCriterion
from fastmaskformer.ops.matching_cost import pack_targets
from fastmaskformer.ops.point_loss import (
    importance_points,
    point_mask_loss,
    point_matching_cost,
    sample_logits,
    sample_segment_targets,
)
from fastmaskformer.target import Target


# ---------------------------------------------------------------- the official formulas, restated
def point_sample(x, coords):
    """detectron2 point_sample: x [N, C, H, W], coords [N, P, 2] in [0, 1] -> [N, C, P]."""
    return F.grid_sample(x, 2.0 * coords[:, :, None, :] - 1.0, align_corners=False).squeeze(3)


def official_uncertain_points(logits, candidates, extra, num_uncertain):
    """logits [N, 1, h, w]; the draws get_uncertain_point_coords_with_randomness would make."""
    n, s = candidates.shape[:2]
    unc = -point_sample(logits, candidates).abs()  # [N, 1, S]
    idx = torch.topk(unc[:, 0, :], k=num_uncertain, dim=1)[1]
    idx = idx + s * torch.arange(n)[:, None]
    chosen = candidates.reshape(-1, 2)[idx.reshape(-1), :].reshape(n, num_uncertain, 2)
    return torch.cat([chosen, extra], 1)


def official_pair_cost(out_logits_maps, prob, tgt_ids, tgt_masks, coords, w=(2.0, 5.0, 5.0)):
    """One image: out maps [Q, h, w], prob [Q, K+1], tgt_masks float [M, H, W], coords [1, P, 2]."""
    cost_class = -prob[:, tgt_ids]
    t = point_sample(tgt_masks[:, None], coords.repeat(tgt_masks.shape[0], 1, 1))[:, 0]
    o = point_sample(out_logits_maps[:, None], coords.repeat(out_logits_maps.shape[0], 1, 1))[:, 0]
    p = o.shape[1]
    pos = F.binary_cross_entropy_with_logits(o, torch.ones_like(o), reduction="none")
    neg = F.binary_cross_entropy_with_logits(o, torch.zeros_like(o), reduction="none")
    cost_mask = (pos @ t.T + neg @ (1 - t).T) / p
    s = o.sigmoid()
    cost_dice = 1 - (2 * s @ t.T + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    return w[1] * cost_mask + w[0] * cost_class + w[2] * cost_dice


def official_mask_losses(logit_maps, tgt_masks, candidates, extra, num_uncertain, num_masks):
    """Matched masks in order: logit_maps [N, h, w], tgt_masks [N, H, W] -> (BCE, dice)."""
    with torch.no_grad():
        pts = official_uncertain_points(logit_maps[:, None].detach(), candidates, extra, num_uncertain)
        labels = point_sample(tgt_masks[:, None], pts)[:, 0]
    logits = point_sample(logit_maps[:, None], pts)[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
    s = logits.sigmoid()
    dice = (1 - (2 * (s * labels).sum(-1) + 1) / (s.sum(-1) + labels.sum(-1) + 1)).sum() / num_masks
    return bce, dice


# ---------------------------------------------------------------- fixtures
def make_case(seed=0, b=2, q=7, k=5, c=8, h=9, w=11, H=36, W=44, layers=2):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(layers, b, q, k + 1, generator=g, dtype=torch.float64)
    mask_embed = torch.randn(layers, b, q, c, generator=g, dtype=torch.float64)
    pixel_embed = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    targets = []
    for i in range(b):
        # Blocky segments (so bilinear taps straddle boundaries) and an unlabelled region.
        seg = torch.randint(0, 3 + i, (H // 4, W // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
        seg[:3, :5] = 255
        targets.append(Target.from_semantic(seg, ignore_label=255))
    return class_logits, mask_embed, pixel_embed, targets, (H, W)


def coords_like(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(*shape, 2, generator=g, dtype=torch.float64)
    # A few points exactly on/near the borders (zero padding outside half a pixel).
    pts.view(-1, 2)[:4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.001, 0.999], [0.5, 0.0]], dtype=torch.float64)
    return pts


# ---------------------------------------------------------------- sampling
def test_sample_logits_is_point_sample():
    maps = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    pts = coords_like(2, 3, 50)
    ours = sample_logits(maps, pts)
    ref = torch.stack([point_sample(maps[i][:, None], pts[i])[:, 0] for i in range(2)])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_sample_segment_targets_is_point_sample_of_the_binary_mask():
    seg = torch.randint(-1, 4, (2, 17, 23), dtype=torch.int32)
    segments = torch.tensor([[0, 1, 2], [3, 0, 2]])
    pts = coords_like(2, 3, 64)
    ours = sample_segment_targets(seg, segments, pts.float())
    for i in range(2):
        masks = (seg[i][None] == segments[i][:, None, None]).float()
        ref = point_sample(masks[:, None], pts[i].float())[:, 0]
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-6)


def test_segment_targets_off_the_map_are_zero_padding():
    """Points beyond the map (segment_taps clamps them onto its -1 border) and on its edges: the
    values of grid_sample's zero padding, for the per-segment and the shared-point sampling."""
    from fastmaskformer.ops.point_loss import sample_shared_point_targets

    g = torch.Generator().manual_seed(4)
    seg = torch.randint(-1, 3, (2, 7, 5), generator=g, dtype=torch.int32)
    pts = torch.rand(2, 1, 400, 2, generator=g, dtype=torch.float64) * 1.8 - 0.4
    pts[:, :, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    segments = torch.arange(3)[None].expand(2, 3)
    ours = sample_segment_targets(seg, segments, pts.expand(2, 3, 400, 2))
    shared = sample_shared_point_targets(seg, 3, pts[:, 0][None])[0]
    for i in range(2):
        masks = (seg[i][None] == segments[i][:, None, None]).double()
        ref = point_sample(masks[:, None], pts[i].expand(3, 400, 2))[:, 0]
        torch.testing.assert_close(ours[i].double(), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(shared[i].double(), ref, rtol=0, atol=1e-6)


def test_importance_points_replay_the_official_selection():
    maps = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    cand = coords_like(2, 3, 30)
    extra = coords_like(2, 3, 4, seed=5)
    ours = importance_points(maps, cand, extra, 6)
    for i in range(2):
        ref = official_uncertain_points(maps[i][:, None], cand[i], extra[i], 6)
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=0)


# ---------------------------------------------------------------- matching cost
def test_point_matching_cost_equals_the_official_matcher_cost():
    class_logits, mask_embed, pixel_embed, targets, size = make_case()
    seg_maps, labels, num_segments = pack_targets(targets, size, "cpu")
    coords = coords_like(2, 2, 40)
    ours = point_matching_cost(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords).view(2, 2, 7, -1)
    for layer in range(2):
        for b in range(2):
            m = int(num_segments[b])
            maps = torch.einsum("qc,chw->qhw", mask_embed[layer, b], pixel_embed[b]).float()
            masks = (seg_maps[b][None] == torch.arange(m)[:, None, None]).float()
            ref = official_pair_cost(maps, class_logits[layer, b].float().softmax(-1), targets[b].labels, masks,
                                     coords[layer, b][None].float())
            torch.testing.assert_close(ours[layer, b, :, :m], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loss values and gradients
def test_point_mask_loss_values_and_gradients_equal_the_official_loss():
    class_logits, mask_embed, pixel_embed, targets, size = make_case(seed=3)
    mask_embed, pixel_embed = mask_embed.float().requires_grad_(), pixel_embed.float().requires_grad_()
    seg_maps, labels, num_segments = pack_targets(targets, size, "cpu")
    m = labels.shape[1]
    # A fixed assignment with unmatched slots (-1) and padded slots.
    assignment = torch.full((2, 2, m), -1, dtype=torch.int64)
    assignment[0, 0, : int(num_segments[0])] = torch.tensor([4, 0, 6])[: int(num_segments[0])]
    assignment[0, 1, :2] = torch.tensor([1, 2])
    assignment[1, 0, 1:3] = torch.tensor([3, 5])
    assignment[1, 1, : int(num_segments[1])] = torch.arange(int(num_segments[1]))
    cand = coords_like(2, 2, m, 48).float()
    extra = coords_like(2, 2, m, 4, seed=7).float()
    num_masks = torch.tensor(3.5)
    bce, dice = point_mask_loss(mask_embed, pixel_embed, assignment, seg_maps, num_masks, cand, extra, 12)
    (bce.sum() + 2 * dice.sum()).backward()
    ours_grads = mask_embed.grad.clone(), pixel_embed.grad.clone()
    mask_embed.grad = pixel_embed.grad = None
    total = 0
    for layer in range(2):
        # Official order: image by image, matched pairs sorted by query.
        maps, tgts, cs, es = [], [], [], []
        for b in range(2):
            slots = torch.nonzero(assignment[layer, b] >= 0).flatten()
            slots = slots[assignment[layer, b, slots].argsort()]
            for s in slots:
                qi = assignment[layer, b, s]
                maps.append(torch.einsum("c,chw->hw", mask_embed[layer, b, qi], pixel_embed[b]))
                tgts.append((seg_maps[b] == s).float())
                cs.append(cand[layer, b, s])
                es.append(extra[layer, b, s])
        ref_bce, ref_dice = official_mask_losses(torch.stack(maps), torch.stack(tgts), torch.stack(cs),
                                                 torch.stack(es), 12, 3.5)
        torch.testing.assert_close(bce[layer], ref_bce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dice[layer], ref_dice, rtol=1e-5, atol=1e-6)
        total = total + ref_bce + 2 * ref_dice
    total.backward()
    torch.testing.assert_close(ours_grads[0], mask_embed.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_grads[1], pixel_embed.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- end to end
class Out:
    def __init__(self, c, e, p):
        self.class_logits, self.mask_embed, self.pixel_embed = c, e, p


def official_criterion(out, targets, size, points, num_uncertain, k):
    """The official SetCriterion + HungarianMatcher loop (scipy per image and layer) on the
    given draws (indexed by our padded segment slots)."""
    seg_maps, labels, num_segments = pack_targets(targets, size, "cpu")
    num_masks = max(float(sum(t.num_segments for t in targets)), 1.0)
    empty = torch.ones(k + 1)
    empty[-1] = 0.1
    L = out.class_logits.shape[0]
    losses = {}
    for layer in range(L):
        maps_all = torch.einsum("bqc,bchw->bqhw", out.mask_embed[layer], out.pixel_embed)
        target_classes = torch.full(out.class_logits.shape[1:3], k, dtype=torch.int64)
        maps, tgts, cs, es = [], [], [], []
        for b, t in enumerate(targets):
            m = int(num_segments[b])
            masks = (seg_maps[b][None] == torch.arange(m)[:, None, None]).float()
            with torch.no_grad():
                cost = official_pair_cost(maps_all[b].detach(), out.class_logits[layer, b].detach().softmax(-1),
                                          t.labels, masks, points["match"][layer, b][None])
            rows, cols = linear_sum_assignment(cost.numpy())
            target_classes[b, torch.as_tensor(rows)] = t.labels[torch.as_tensor(cols)]
            for r, col in zip(rows, cols):
                maps.append(maps_all[b, r])
                tgts.append(masks[col])
                cs.append(points["candidates"][layer, b, col])
                es.append(points["extra"][layer, b, col])
        suffix = "" if layer == L - 1 else f"_{layer}"
        losses["loss_ce" + suffix] = F.cross_entropy(out.class_logits[layer].transpose(1, 2), target_classes, empty)
        losses["loss_mask" + suffix], losses["loss_dice" + suffix] = official_mask_losses(
            torch.stack(maps), torch.stack(tgts), torch.stack(cs), torch.stack(es), num_uncertain, num_masks)
    return losses


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_criterion_end_to_end_equals_the_official_loop(impl):
    from fastmaskformer.losses import PointMatcher

    class_logits, mask_embed, pixel_embed, targets, size = make_case(seed=11, layers=3)
    out = Out(*(x.float().requires_grad_() for x in (class_logits, mask_embed, pixel_embed)))
    matcher = PointMatcher(2.0, 5.0, 5.0, impl=impl, precision="ieee")  # triton: the fused matching cost
    crit = PointSampledCriterion(5, matcher, num_points=40, oversample_ratio=3.0, importance_sample_ratio=0.75,
                                 impl=impl)
    pts = crit.draw_points(3, 2, max(t.num_segments for t in targets), "cpu")
    assert pts["match"].shape == (3, 2, 40, 2) and pts["candidates"].shape[-2] == 120
    assert pts["extra"].shape[-2] == 10
    ours = crit(out, targets, size, points=pts)
    crit.total(ours).backward()
    grads = [x.grad.clone() for x in (out.class_logits, out.mask_embed, out.pixel_embed)]
    for x in (out.class_logits, out.mask_embed, out.pixel_embed):
        x.grad = None
    ref = official_criterion(out, targets, size, pts, 30, 5)
    assert set(ours) == set(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    weights = crit.weight_dict(3)
    assert weights["loss_ce"] == 2.0 and weights["loss_mask_0"] == 5.0 and weights["loss_dice_1"] == 5.0
    sum(ref[k] * weights[k] for k in ref).backward()
    for g, x in zip(grads, (out.class_logits, out.mask_embed, out.pixel_embed)):
        torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-6)


def test_forward_draws_equal_draw_points_across_steps():
    """forward's own draws (refilled CPU buffers, ``draw_points(reuse=True)``) are the values of
    fresh ``draw_points`` calls of a twin criterion, step after step, and the reused tensors
    are the same objects (no new ~100 MB tensor per Mask2Former step)."""
    class_logits, mask_embed, pixel_embed, targets, size = make_case(seed=11, layers=3)
    out = Out(class_logits.float(), mask_embed.float(), pixel_embed.float())
    crit = PointSampledCriterion(5, num_points=40, impl="torch", seed=7)
    twin = PointSampledCriterion(5, num_points=40, impl="torch", seed=7)
    m = max(t.num_segments for t in targets)
    seen = []
    for _ in range(3):
        ours = crit(out, targets, size)
        ref = crit.__class__.forward(twin, out, targets, size, points=twin.draw_points(3, 2, m, "cpu"))
        for key in ref:
            assert torch.equal(ours[key], ref[key]), key
        seen.append({k: id(v) for k, v in crit._draw_buffers.items()})
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 3
    a = crit.draw_points(3, 2, m, "cpu")  # a plain call: fresh tensors, the buffers dropped
    assert not crit._draw_buffers and torch.equal(a["match"], twin.draw_points(3, 2, m, "cpu")["match"])


def test_generator_state_is_saved_and_restored():
    crit = PointSampledCriterion(5, num_points=16, seed=3)
    crit.draw_points(2, 1, 2, "cpu")
    state = crit.state_dict()
    a = crit.draw_points(2, 1, 2, "cpu")
    other = PointSampledCriterion(5, num_points=16, seed=99)
    other.load_state_dict(state)
    b = other.draw_points(2, 1, 2, "cpu")
    for key in a:
        assert torch.equal(a[key], b[key])
    fresh = PointSampledCriterion(5, num_points=16, seed=3)
    assert torch.equal(fresh.draw_points(2, 1, 2, "cpu")["match"],
                       PointSampledCriterion(5, num_points=16, seed=3).draw_points(2, 1, 2, "cpu")["match"])


def test_bad_point_settings_are_rejected():
    with pytest.raises(ValueError, match="point sampling"):
        PointSampledCriterion(5, num_points=0)
    with pytest.raises(ValueError, match="point sampling"):
        PointSampledCriterion(5, importance_sample_ratio=1.5)


def test_full_sampling_uses_the_exact_full_resolution_loss():
    """mask_sampling=full: same matching as points, BCE + dice on every pixel."""
    from fastmaskformer.ops import mask_loss_assigned

    class_logits, mask_embed, pixel_embed, targets, size = make_case(seed=5, layers=2)
    out = Out(class_logits.float(), mask_embed.float(), pixel_embed.float())
    points = PointSampledCriterion(5, num_points=40, impl="torch")
    full = PointSampledCriterion(5, num_points=40, impl="torch", mask_sampling="full")
    pts = full.draw_points(2, 2, max(t.num_segments for t in targets), "cpu")
    assert pts["candidates"].shape[-2] == 0 and pts["extra"].shape[-2] == 0
    losses = full(out, targets, size, points=pts)
    args = full.prepare(out, targets, size)
    assignment = full.matcher.assign(*args[:6], pts["match"])
    bce, dice = mask_loss_assigned(out.mask_embed, out.pixel_embed, assignment, args[3], args[6], impl="torch",
                                   loss="bce")
    torch.testing.assert_close(losses["loss_mask"], bce[-1])
    torch.testing.assert_close(losses["loss_dice_0"], dice[0])
    sampled = points(out, targets, size)
    assert set(sampled) == set(losses)
    with pytest.raises(ValueError, match="mask_sampling"):
        PointSampledCriterion(5, mask_sampling="grid")


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fused_point_matching_cost_equals_reference(precision):
    """The Triton kernel (interpreter on CPU) samples the pixel embedding itself."""
    class_logits, mask_embed, pixel_embed, targets, size = make_case(seed=2, q=19, c=24, h=9, w=13)
    class_logits, mask_embed, pixel_embed = class_logits.float(), mask_embed.float(), pixel_embed.float()
    seg_maps, labels, num_segments = pack_targets(targets, size, "cpu")
    coords = coords_like(2, 2, 70).float()
    ref = point_matching_cost(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords, impl="torch")
    out = point_matching_cost(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords, precision=precision,
                              impl="triton")
    tol = 1e-5 if precision == "ieee" else 3e-2
    for n in range(4):
        m = int(num_segments[n % 2])
        torch.testing.assert_close(out[n, :, :m], ref[n, :, :m], rtol=tol, atol=tol)


def test_fused_point_matching_cost_opcheck_and_exactness():
    from fastmaskformer.ops._dispatch import load_kernel

    class_logits, mask_embed, pixel_embed, targets, size = make_case(seed=4, q=5, c=8, h=7, w=6)
    mask_embed, pixel_embed = mask_embed.float(), pixel_embed.float()
    seg_maps, labels, _ = pack_targets(targets, size, "cpu")
    coords = coords_like(2, 2, 33).float()
    segs = torch.arange(labels.shape[1])[None].expand(2, -1)
    tgt = torch.stack([sample_segment_targets(seg_maps, segs, coords[i][:, None].expand(2, segs.shape[1], 33, 2))
                       for i in range(2)])
    load_kernel("point_matching_cost", "test")
    op = torch.ops.fastmaskformer.point_matching_sums
    torch.library.opcheck(op, (mask_embed, pixel_embed, coords, tgt, "ieee"))
    xt, st, sp, ss = op(mask_embed, pixel_embed, coords, tgt, "ieee")
    maps = torch.einsum("lbqc,bchw->lbqhw", mask_embed, pixel_embed).flatten(0, 1)
    x = torch.stack([point_sample(maps[n][:, None], coords.flatten(0, 1)[n][None].expand(5, 33, 2))[:, 0]
                     for n in range(4)])  # (n, q, p)
    torch.testing.assert_close(xt, x @ tgt.flatten(0, 1).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp, F.softplus(x).sum(-1), rtol=1e-5, atol=1e-5)


def test_fused_point_matching_cost_split_over_points():
    """Many SMs and few problems: the points are split over programs; the partial sums add up."""
    from fastmaskformer.kernels.common import assume_multiprocessors

    class_logits, mask_embed, pixel_embed, targets, size = make_case(seed=6, q=7, c=8, h=9, w=11)
    class_logits, mask_embed, pixel_embed = class_logits.float(), mask_embed.float(), pixel_embed.float()
    seg_maps, labels, num_segments = pack_targets(targets, size, "cpu")
    coords = coords_like(2, 2, 200).float()
    ref = point_matching_cost(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords, impl="torch")
    with assume_multiprocessors(64):
        out = point_matching_cost(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords, precision="ieee",
                                  impl="triton")
    for n in range(4):
        m = int(num_segments[n % 2])
        torch.testing.assert_close(out[n, :, :m], ref[n, :, :m], rtol=1e-5, atol=1e-5)
