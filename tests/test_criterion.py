import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastmaskformer as fmf
from fastmaskformer import ops
from fastmaskformer.losses import FixedMatcher, HungarianMatcher, SetCriterion, build_criterion


def lazy_outputs(L, B, Q, K, C, h, w, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return SimpleNamespace(class_logits=make(L, B, Q, K + 1), mask_embed=make(L, B, Q, C), pixel_embed=make(B, C, h, w))


def semantic_target(h, w, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    label_map = torch.randint(0, num_classes, (h // 4, w // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    return fmf.Target.from_semantic(label_map, ignore_label=255)


def brute_force(cost: np.ndarray) -> float:
    q, m = cost.shape
    return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(q), m))


@pytest.mark.parametrize("solver", ["scipy", "batched"])
def test_matcher_is_optimal_by_brute_force(solver):
    out = lazy_outputs(2, 3, 5, 4, 6, 4, 4, seed=3)
    targets = [semantic_target(16, 16, 4, s) for s in range(3)]
    matching = HungarianMatcher(solver=solver)(out.class_logits, out.mask_embed, out.pixel_embed, targets)
    costs = ops.matching_cost(out.class_logits, out.mask_embed, out.pixel_embed, targets, impl="torch")
    assert len(matching) == 2 and all(len(layer) == 3 for layer in matching)
    for l, layer in enumerate(matching):
        for b, (qi, si) in enumerate(layer):
            cost = costs[l * 3 + b].double().numpy()
            m = targets[b].num_segments
            assert len(qi) == m and sorted(si.tolist()) == list(range(m))
            assert len(set(qi.tolist())) == m and qi.tolist() == sorted(qi.tolist())
            assert cost[qi, si].sum() == pytest.approx(brute_force(cost), rel=1e-9, abs=1e-9)


def test_batched_and_scipy_loop_agree():
    out = lazy_outputs(3, 4, 8, 6, 5, 5, 6, seed=4)
    targets = [semantic_target(20, 24, 6, 10 + s) for s in range(4)]
    a = HungarianMatcher(solver="batched")(out.class_logits, out.mask_embed, out.pixel_embed, targets)
    b = HungarianMatcher(solver="scipy")(out.class_logits, out.mask_embed, out.pixel_embed, targets)
    for la, lb in zip(a, b):
        for (qa, sa), (qb, sb) in zip(la, lb):
            assert torch.equal(qa, qb) and torch.equal(sa, sb)


def test_matcher_nan_cost_names_layer_and_image():
    out = lazy_outputs(2, 2, 3, 3, 4, 2, 2)
    out.mask_embed[1, 1, 0, 0] = float("nan")
    targets = [semantic_target(8, 8, 3, 0), semantic_target(8, 8, 3, 1)]
    with pytest.raises(ValueError, match="layer 1, image 1 has NaN"):
        HungarianMatcher()(out.class_logits, out.mask_embed, out.pixel_embed, targets)


def test_fixed_matcher():
    seg = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    t = fmf.Target(torch.tensor([5, 2, 7]), seg)
    (qi, si), = FixedMatcher()(torch.zeros(1, 8, 9), None, None, [t])[0]
    assert qi.tolist() == [2, 5, 7] and si.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="one segment per class"):
        FixedMatcher()(torch.zeros(1, 8, 9), None, None, [fmf.Target(torch.tensor([1, 1]), seg.clamp(max=1))])


def test_criterion_keys_weights_and_total():
    out = lazy_outputs(3, 2, 6, 4, 5, 4, 4, requires_grad=True)
    targets = [semantic_target(16, 16, 4, 0), semantic_target(12, 16, 4, 1)]
    crit = SetCriterion(4)
    losses = crit(out, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    weights = crit.weight_dict(3)
    assert weights["loss_mask_1"] == 20.0 and weights["loss_dice"] == 1.0
    total = crit.total(losses)
    assert total.item() == pytest.approx(sum(losses[k].item() * weights[k] for k in losses), rel=1e-6)
    total.backward()
    for t in (out.class_logits, out.mask_embed, out.pixel_embed):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    no_aux = SetCriterion(4, deep_supervision=False)(out, targets)
    assert set(no_aux) == {"loss_ce", "loss_mask", "loss_dice"}
    torch.testing.assert_close(no_aux["loss_ce"], losses["loss_ce"])


def test_class_loss_with_no_segments_is_plain_no_object_ce():
    out = lazy_outputs(1, 2, 4, 3, 5, 2, 2)
    empty = fmf.Target(torch.zeros(0, dtype=torch.int64), -torch.ones(8, 8, dtype=torch.int32))
    losses = SetCriterion(3)(out, [empty, empty])
    # every query's target is "no object"; all weights are 0.1, so the weighted mean is the mean
    expected = -out.class_logits[0].log_softmax(-1)[..., 3].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0


def test_class_loss_hand_computed_weighting():
    # one image, 2 queries, query 0 matched to class 1; query 1 -> no object (weight 0.1)
    out = SimpleNamespace(class_logits=torch.zeros(1, 1, 2, 3), mask_embed=torch.zeros(1, 1, 2, 1),
                          pixel_embed=torch.zeros(1, 1, 2, 2))
    t = fmf.Target(torch.tensor([1]), torch.zeros(8, 8, dtype=torch.int32))
    losses = SetCriterion(2, deep_supervision=False)(out, [t])
    # uniform logits: CE = ln 3 for both, weighted mean = ln 3
    assert losses["loss_ce"].item() == pytest.approx(math.log(3), rel=1e-6)


def expected_layer_losses(out, layer, targets, num_classes):
    """One decoder layer's loss terms computed independently of the criterion: the matcher run
    on this layer alone, cross-entropy with the no-object weight 0.1 and focal / dice written
    out from their formulas (DESIGN 3). Returns (matching, losses)."""
    logits, embed, pixels = out.class_logits[layer], out.mask_embed[layer], out.pixel_embed
    (indices,) = HungarianMatcher(solver="scipy")(logits[None], embed[None], pixels, targets)
    batch, queries, _ = logits.shape
    classes = torch.full((batch, queries), num_classes)
    for b, (qi, si) in enumerate(indices):
        classes[b, qi] = targets[b].labels[si]
    weight = torch.where(classes == num_classes, 0.1, 1.0)
    nll = -logits.log_softmax(-1).gather(-1, classes[..., None])[..., 0]
    ce = (weight * nll).sum() / weight.sum()

    size = (4 * pixels.shape[-2], 4 * pixels.shape[-1])  # the padded input size
    num_masks = max(sum(t.num_segments for t in targets), 1)
    focal = dice = 0.0
    for b, (qi, si) in enumerate(indices):
        seg = torch.full(size, -1, dtype=torch.int32)
        h, w = targets[b].segment_map.shape
        seg[:h, :w] = targets[b].segment_map
        for q, m in zip(qi.tolist(), si.tolist()):
            small = torch.einsum("c,chw->hw", embed[b, q], pixels[b])
            x = F.interpolate(small[None, None], size=size, mode="bilinear", align_corners=False).flatten()
            t = (seg == m).flatten().float()
            s = x.sigmoid()
            bce = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
            p_t = t * s + (1 - t) * (1 - s)
            alpha_t = 0.25 * t + 0.75 * (1 - t)
            focal = focal + (alpha_t * (1 - p_t) ** 2 * bce).mean()
            dice = dice + 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
    return indices, {"loss_ce": ce, "loss_mask": focal / num_masks, "loss_dice": dice / num_masks}


def test_every_layer_loss_uses_its_own_matching():
    num_layers, k = 3, 4
    out = lazy_outputs(num_layers, 2, 6, k, 5, 5, 6, seed=7)
    targets = [semantic_target(20, 24, k, 3), semantic_target(16, 20, k, 4)]  # the second is padded
    losses = SetCriterion(k)(out, targets)
    final, _ = expected_layer_losses(out, num_layers - 1, targets, k)
    for layer in range(num_layers):
        indices, expected = expected_layer_losses(out, layer, targets, k)
        if layer < num_layers - 1:  # the test can only tell matchings apart where they differ
            assert any(not torch.equal(a[0], f[0]) or not torch.equal(a[1], f[1]) for a, f in zip(indices, final))
        suffix = "" if layer == num_layers - 1 else f"_{layer}"
        for name, value in expected.items():
            assert losses[name + suffix].item() == pytest.approx(value.item(), rel=1e-5), name + suffix


def test_no_object_queries_weigh_a_tenth_in_the_class_loss():
    # 1 image, 2 queries, one segment of class 0; equal (zero) masks, so query 0, the likelier
    # class 0, is matched and query 1 gets the no-object target (class 2)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = SimpleNamespace(class_logits=logits[None, None], mask_embed=torch.zeros(1, 1, 2, 1),
                          pixel_embed=torch.zeros(1, 1, 2, 2))
    target = fmf.Target(torch.tensor([0]), torch.zeros(8, 8, dtype=torch.int32))
    matched = -math.log(math.exp(2) / (math.exp(2) + 2))
    no_object = -math.log(math.e / (math.e + 2))
    cfg = fmf.get_config("ade20k-150-r50")
    cfg.model.num_classes = 2
    for criterion in (SetCriterion(2), build_criterion(cfg)):
        loss = criterion(out, [target])["loss_ce"].item()
        assert loss == pytest.approx((matched + 0.1 * no_object) / 1.1, rel=1e-6)
    loss = SetCriterion(2, no_object_weight=1.0)(out, [target])["loss_ce"].item()
    assert loss == pytest.approx((matched + no_object) / 2, rel=1e-6)


def test_criterion_rejects_labels_out_of_range():
    out = lazy_outputs(1, 2, 3, 4, 5, 2, 2)
    bad = fmf.Target(torch.tensor([0, 9]), torch.tensor([[0, 1]] * 8, dtype=torch.int32).repeat(1, 4))
    good = semantic_target(8, 8, 4, 0)
    with pytest.raises(ValueError, match=r"label 9 in image 1 is out of range \[0, 4\)"):
        SetCriterion(4)(out, [good, bad])


def test_build_criterion_from_preset():
    cfg = fmf.get_config("ade20k-150-r50")
    crit = build_criterion(cfg)
    assert crit.num_classes == 150 and crit.empty_weight[-1].item() == pytest.approx(0.1)
    assert crit.matcher.weights == (1.0, 20.0, 1.0)
    cfg.loss.matching = "fixed"
    assert isinstance(build_criterion(cfg).matcher, FixedMatcher)
