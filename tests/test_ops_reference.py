"""The plain-PyTorch reference ops against independent formulations (the official
mask-tensor way of computing things, hand-computed values)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastmaskformer as fmf
from fastmaskformer import ops


def random_target(h, w, m, seed, ignore_frac=0.1, num_classes=5):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, max(m, 1), (h, w), generator=g, dtype=torch.int32)
    seg[torch.rand(h, w, generator=g) < ignore_frac] = -1
    if m == 0:
        seg.fill_(-1)
    return fmf.Target(torch.randint(0, num_classes, (m,), generator=g), seg)


def official_cost(cls, emb, pix, masks_full):
    """Official matcher math on explicit float masks: nearest-downsample masks, -prob,
    focal and dice with per-(q,m) sums over pixels written out directly."""
    h, w = pix.shape[-2:]
    t = F.interpolate(masks_full[:, None].float(), size=(h, w), mode="nearest")[:, 0].flatten(1)
    x = (emb @ pix.flatten(1)).double()
    t = t.double()
    s = x.sigmoid()
    q, m = x.shape[0], t.shape[0]
    out = torch.zeros(q, m, dtype=torch.float64)
    prob = cls.double().softmax(-1)
    for i in range(q):
        for j in range(m):
            bce_pos = F.softplus(-x[i])
            bce_neg = F.softplus(x[i])
            focal = (0.25 * (1 - s[i]) ** 2 * bce_pos * t[j] + 0.75 * s[i] ** 2 * bce_neg * (1 - t[j])).mean()
            dice = 1 - (2 * (s[i] * t[j]).sum() + 1) / (s[i].sum() + t[j].sum() + 1)
            out[i, j] = 20 * focal + dice
    return out, prob


def test_matching_cost_equals_official_formulation():
    torch.manual_seed(1)
    B, Q, K, C, h, w = 2, 4, 5, 6, 5, 7
    targets = [random_target(18, 26, 3, 0), random_target(20, 28, 2, 1)]
    cls = torch.randn(B, Q, K + 1)
    emb = torch.randn(B, Q, C)
    pix = torch.randn(B, C, h, w)
    costs = ops.matching_cost(cls, emb, pix, targets, impl="torch")
    for b, t in enumerate(targets):
        padded = torch.zeros(t.num_segments, 4 * h, 4 * w, dtype=torch.bool)
        padded[:, : t.image_size[0], : t.image_size[1]] = t.to_masks()
        mask_cost, prob = official_cost(cls[b], emb[b], pix[b], padded)
        expected = mask_cost - prob[:, t.labels]
        assert costs[b].shape == (Q, t.num_segments)
        torch.testing.assert_close(costs[b].double(), expected, rtol=1e-5, atol=1e-5)


def test_matching_cost_layers_are_layer_major_and_empty_images():
    L, B, Q, K, C, h, w = 3, 2, 3, 4, 5, 4, 4
    targets = [random_target(16, 16, 2, 3, num_classes=K), random_target(16, 16, 0, 4, num_classes=K)]
    cls, emb, pix = torch.randn(L, B, Q, K + 1), torch.randn(L, B, Q, C), torch.randn(B, C, h, w)
    costs = ops.matching_cost(cls, emb, pix, targets, impl="torch")
    assert len(costs) == L * B
    for l in range(L):
        single = ops.matching_cost(cls[l], emb[l], pix, targets, impl="torch")
        for b in range(B):
            torch.testing.assert_close(costs[l * B + b], single[b])
    assert costs[1].shape == (Q, 0)


def test_matching_cost_bad_inputs():
    cls, emb, pix = torch.randn(1, 3, 5), torch.randn(1, 3, 4), torch.randn(1, 4, 4, 4)
    bad = fmf.Target(torch.tensor([0, 4]), torch.zeros(16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"label 4 in image 0 is out of range \[0, 4\)"):
        ops.matching_cost(cls, emb, pix, [bad])
    with pytest.raises(ValueError, match="larger than the padded input size"):
        ops.matching_cost(cls, emb, pix, [random_target(17, 16, 1, 0, num_classes=4)])
    with pytest.raises(ValueError, match="channel mismatch"):
        ops.matching_cost(cls, torch.randn(1, 3, 5), pix, [random_target(8, 8, 1, 0, num_classes=4)])
    with pytest.raises(ValueError, match="got 2 targets for a batch of 1"):
        ops.matching_cost(cls, emb, pix, [random_target(8, 8, 1, 0, num_classes=4)] * 2)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.matching_cost(cls, emb, pix, [random_target(8, 8, 1, 0, num_classes=4)], impl="cuda")


def test_mask_loss_hand_computed():
    # mask_embed = 0 -> every logit is 0, s = 1/2: focal per pixel = a_t * ln2 / 4.
    h, w = 3, 4
    seg = -torch.ones(12, 16, dtype=torch.int32)
    seg[:6, :8] = 0  # 48 of 192 pixels
    t = fmf.Target(torch.tensor([2]), seg)
    emb = torch.zeros(1, 2, 3, requires_grad=True)
    pix = torch.randn(1, 3, h, w, requires_grad=True)
    focal, dice = ops.mask_loss(emb, pix, [(torch.tensor([1]), torch.tensor([0]))], [t], num_masks=2.0,
                                impl="torch")
    frac = 48 / 192
    expected_focal = math.log(2) / 4 * (0.25 * frac + 0.75 * (1 - frac)) / 2
    expected_dice = (1 - (2 * 0.5 * 48 + 1) / (0.5 * 192 + 48 + 1)) / 2
    assert focal.item() == pytest.approx(expected_focal, rel=1e-6)
    assert dice.item() == pytest.approx(expected_dice, rel=1e-6)
    (focal + dice).backward()
    assert emb.grad[0, 1].abs().sum() > 0 and emb.grad[0, 0].abs().sum() == 0


def test_mask_loss_equals_official_formulation():
    torch.manual_seed(2)
    B, Q, C, h, w = 2, 5, 6, 5, 6
    targets = [random_target(18, 24, 3, 5), random_target(20, 21, 2, 6)]
    emb = torch.randn(B, Q, C, requires_grad=True)
    pix = torch.randn(B, C, h, w, requires_grad=True)
    indices = [(torch.tensor([4, 0, 2]), torch.tensor([1, 2, 0])), (torch.tensor([3, 1]), torch.tensor([0, 1]))]
    focal, dice = ops.mask_loss(emb, pix, indices, targets, num_masks=5.0, impl="torch")
    # official: upsample all pred masks, gather matched, compare with zero-padded GT masks
    pred = F.interpolate(torch.einsum("bqc,bchw->bqhw", emb, pix), size=(4 * h, 4 * w), mode="bilinear",
                         align_corners=False)
    src = torch.cat([pred[b, qi] for b, (qi, _) in enumerate(indices)]).flatten(1)
    tgt = []
    for b, (_, si) in enumerate(indices):
        m = torch.zeros(targets[b].num_segments, 4 * h, 4 * w)
        m[:, : targets[b].image_size[0], : targets[b].image_size[1]] = targets[b].to_masks().float()
        tgt.append(m[si])
    tgt = torch.cat(tgt).flatten(1)
    prob = src.sigmoid()
    ce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
    p_t = prob * tgt + (1 - prob) * (1 - tgt)
    exp_focal = ((0.25 * tgt + 0.75 * (1 - tgt)) * ce * (1 - p_t) ** 2).mean(1).sum() / 5
    exp_dice = (1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(1) + tgt.sum(1) + 1)).sum() / 5
    torch.testing.assert_close(focal, exp_focal)
    torch.testing.assert_close(dice, exp_dice)
    g1 = torch.autograd.grad(focal + dice, (emb, pix))
    g2 = torch.autograd.grad(exp_focal + exp_dice, (emb, pix))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_mask_loss_no_matches_is_zero_with_grad():
    emb = torch.randn(1, 3, 4, requires_grad=True)
    pix = torch.randn(1, 4, 2, 2, requires_grad=True)
    t = fmf.Target(torch.zeros(0, dtype=torch.int64), -torch.ones(8, 8, dtype=torch.int32))
    focal, dice = ops.mask_loss(emb, pix, [(torch.tensor([], dtype=torch.int64),) * 2], [t], 1.0, impl="torch")
    assert focal.item() == 0 and dice.item() == 0
    (focal + dice).backward()
    assert emb.grad is not None and emb.grad.abs().sum() == 0


def test_mask_loss_bad_indices():
    emb, pix = torch.randn(1, 3, 4), torch.randn(1, 4, 2, 2)
    t = random_target(8, 8, 2, 0)
    with pytest.raises(ValueError, match=r"query index out of range \[0, 3\)"):
        ops.mask_loss(emb, pix, [(torch.tensor([3]), torch.tensor([0]))], [t], 1.0)
    with pytest.raises(ValueError, match=r"segment index out of range \[0, 2\)"):
        ops.mask_loss(emb, pix, [(torch.tensor([0]), torch.tensor([2]))], [t], 1.0)
    with pytest.raises(ValueError, match="num_masks must be positive"):
        ops.mask_loss(emb, pix, [(torch.tensor([0]), torch.tensor([1]))], [t], 0.0)


def test_mask_logits_upsampled():
    emb, pix = torch.randn(2, 3, 4), torch.randn(2, 4, 5, 6)
    low = ops.mask_logits(emb, pix, impl="torch")
    torch.testing.assert_close(low, torch.einsum("bqc,bchw->bqhw", emb, pix))
    up = ops.mask_logits(emb, pix, out_size=(20, 24), impl="torch")
    torch.testing.assert_close(up, F.interpolate(low, size=(20, 24), mode="bilinear", align_corners=False))


def test_triton_impl_without_interpreter_or_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.mask_logits(torch.randn(1, 2, 3), torch.randn(1, 3, 2, 2), impl="triton")
