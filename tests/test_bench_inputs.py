"""The benchmarks' generated inputs exercise what they claim to: panoptic inputs must yield real
segments, or the benchmark's fused-vs-eager check compares empty maps."""
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_panoptic_inference import (  # noqa: E402
    THRESHOLDS,
    check_agreement,
    panoptic_inputs,
    row_chunk_assign,
    with_assign,
)

from fastmaskformer import ops  # noqa: E402


@pytest.mark.parametrize("classes, size", [(19, (128, 128)), (150, (128, 171)), (847, (100, 90))])
def test_panoptic_inputs_give_segments(classes, size):
    """Every image has segments, things and stuff, at most one per region (the duplicate
    queries fail the overlap test), and the row-chunk stand-in agrees with eager."""
    height, width = size
    h, w = -(-height // 32) * 8, -(-width // 32) * 8
    batch, queries = 2, 100
    cl, me, pe = panoptic_inputs(batch, queries, classes, 256, h, w, "cpu")
    things = set(range(classes // 2))
    args = (cl, me, pe, [size] * batch, [size] * batch)
    eager = ops.panoptic_inference(*args, thing_classes=things, impl="torch", **THRESHOLDS)
    kept = (cl.softmax(-1).max(-1).values > THRESHOLDS["object_mask_threshold"]).sum(1)
    assert kept.tolist() == [queries // 2] * batch
    for ids, segments in eager:
        assert 15 <= len(segments) <= 45  # 45 regions: nine in ten of the 50 kept queries
        assert any(s["isthing"] for s in segments) and not all(s["isthing"] for s in segments)
        assert set(ids.unique().tolist()) - {0} == {s["id"] for s in segments}
    check_agreement("row-chunk", with_assign(row_chunk_assign)(*args, things), eager)


def test_panoptic_inputs_are_seeded():
    first = panoptic_inputs(1, 10, 5, 16, 8, 8, "cpu", seed=3)
    again = panoptic_inputs(1, 10, 5, 16, 8, 8, "cpu", seed=3)
    other = panoptic_inputs(1, 10, 5, 16, 8, 8, "cpu", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[2], other[2])


def test_check_agreement_rejects_different_maps():
    ids = torch.zeros(100, 100, dtype=torch.int32)
    segments = [{"id": 1, "category_id": 0, "isthing": True, "score": 0.9}]
    flipped = ids.clone()
    flipped[:2] = 1
    with pytest.raises(SystemExit, match="id map differs"):
        check_agreement("x", [(flipped, segments)], [(ids, segments)])
    with pytest.raises(SystemExit, match="segments_info differs"):
        check_agreement("x", [(ids, [])], [(ids, segments)])


def test_official_deformable_attention_provider_plumbing():
    """bench_ms_deform_attn's official-cuda provider hands the official extension its arguments
    (level start indices from the shapes, im2col_step) and returns its gradients in the right
    slots: checked with a stand-in extension module that computes with our reference."""
    import types

    from bench_ms_deform_attn import OFFICIAL_IM2COL_STEP, official_extension_op
    from deform_inputs import make_inputs

    calls = []

    def forward(value, shapes, starts, loc, weights, step):
        calls.append((starts.tolist(), step))
        return ops.ms_deform_attn(value, shapes, loc, weights, impl="torch")

    def backward(value, shapes, starts, loc, weights, grad, step):
        with torch.enable_grad():  # autograd runs backward without it
            leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]
            out = ops.ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], impl="torch")
            return list(torch.autograd.grad(out, leaves, grad))

    official = official_extension_op(types.SimpleNamespace(ms_deform_attn_forward=forward,
                                                           ms_deform_attn_backward=backward))
    value, shapes, ss, loc, weights = make_inputs(1, 128, "cpu")
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    out = official(leaves[0], ss, leaves[1], leaves[2])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want_out = ops.ms_deform_attn(leaves[0], ss, leaves[1], leaves[2], impl="torch")
    want = torch.autograd.grad(want_out, leaves, grad)
    assert calls == [([0, 16, 80], OFFICIAL_IM2COL_STEP)]  # levels 4x4, 8x8, 16x16
    torch.testing.assert_close(out, want_out)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
