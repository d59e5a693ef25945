"""Fused panoptic assignment (kernels/panoptic.py) vs the plain-PyTorch reference.

Compared through the public op: ``ops.panoptic_inference(impl="triton")`` must give the same id
maps and segments_info as ``impl="torch"``, on inputs built so that every rule of the official
general inference fires (object_mask_threshold, overlap filter, stuff merge, void pixels).
"""
import pytest
import torch

from fastmaskformer import ops
from fastmaskformer.kernels.panoptic import panoptic_assign
from fastmaskformer.ops.inference import assemble_panoptic, panoptic_assign_reference

NUM_CLASSES = 20
THING_CLASSES = set(range(10))
# Per query: (class, confidence logit) on top of N(0, 0.5^2) logits. None = no object. With the
# 0.8 threshold, logits 12 and 7 are kept (probability > 0.95), logit 1 is filtered (~0.1).
# Stuff classes 10 and 11 repeat (merge).
QUERIES = ([(c, 12.0) for c in (0, 1, 2, 3, 4, 5, 10, 10, 11, 11, 10, 6)]
           + [(3, 7.0), (7, 12.0)] + [(c, 1.0) for c in (8, 9, 12)] + [(None, 12.0)] * 3)
# Query 12 copies query 3's mask with a lower score: it wins no pixel and is dropped.
DUPLICATE_OF = {12: 3}
# Query 13 is a weaker mask over blocks 0 and 1 (see panoptic_inputs): it wins only along their
# border, a small part of its confident area, and fails the overlap test with a non-zero area.
PARTIAL = 13


def panoptic_inputs(batch, channels, h, w):
    """class_logits [B,Q,K+1], mask_embed [B,Q,C], pixel_embed [B,C,h,w] following QUERIES.

    The low-res grid is cut into 12 blocks; channel r of pixel_embed is +1 on block r and -1
    elsewhere, and kept query q (q < 12) points at block q, so its mask is a coherent region
    (random masks would fail the overlap test almost always). Channel 12 is a constant 1 (a
    bias for the PARTIAL query), channels > 12 add noise.
    """
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = (ys * 3 // h) * 4 + xs * 4 // w  # [h, w] in [0, 12)
    pixel_embed = torch.randn(batch, channels, h, w)
    pixel_embed[:, :12] = (block[None] == torch.arange(12)[:, None, None]).float() * 2 - 1
    pixel_embed[:, 12] = 1.0
    mask_embed = torch.randn(batch, len(QUERIES), channels) * 0.1
    mask_embed[:, :12, :12] += torch.eye(12) * 4
    mask_embed[:, PARTIAL] = 0.0
    mask_embed[:, PARTIAL, [0, 1, 12]] = 1.0  # logit 1 on blocks 0 and 1, -1 elsewhere
    class_logits = torch.randn(batch, len(QUERIES), NUM_CLASSES + 1) * 0.5
    for q, (c, conf) in enumerate(QUERIES):
        class_logits[:, q, NUM_CLASSES if c is None else c] += conf
    for dup, orig in DUPLICATE_OF.items():
        mask_embed[:, dup] = mask_embed[:, orig]
    return class_logits, mask_embed, pixel_embed


def test_assign_matches_reference_exactly():
    scores = torch.rand(37)
    mask_embed, pixel_embed = torch.randn(37, 16), torch.randn(16, 9, 11)
    # The last two: an unpadded model input (35 x 43 for a 9 x 11 embedding: size_divisibility 0).
    for image_size, output_size, input_size in [((33, 41), (50, 61), None), ((36, 44), (20, 17), None),
                                                ((30, 30), (30, 30), None), ((35, 43), (35, 43), (35, 43)),
                                                ((30, 40), (45, 31), (35, 43))]:
        got = panoptic_assign(scores, mask_embed, pixel_embed, image_size, output_size, input_size)
        ref = panoptic_assign_reference(scores, mask_embed, pixel_embed, image_size, output_size, input_size)
        for a, b in zip(got, ref):
            assert a.dtype == torch.int64 and torch.equal(a, b)


def test_assign_more_queries_than_a_chunk():
    scores = torch.rand(300)
    mask_embed, pixel_embed = torch.randn(300, 8), torch.randn(8, 5, 6)
    got = panoptic_assign(scores, mask_embed, pixel_embed, (19, 23), (25, 21))
    ref = panoptic_assign_reference(scores, mask_embed, pixel_embed, (19, 23), (25, 21))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_panoptic_inference_matches_reference():
    class_logits, mask_embed, pixel_embed = panoptic_inputs(3, 16, 9, 11)
    # Image 2 keeps nothing: every query is pushed to "no object".
    class_logits[2, :, NUM_CLASSES] += 100.0
    image_sizes = [(33, 41), (36, 44), (30, 37)]
    output_sizes = [(50, 61), (21, 17), (30, 37)]
    kwargs = dict(object_mask_threshold=0.8, overlap_threshold=0.8, thing_classes=THING_CLASSES)
    got = ops.panoptic_inference(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes,
                                 impl="triton", **kwargs)
    ref = ops.panoptic_inference(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes,
                                 impl="torch", **kwargs)
    for (ids, info), (ref_ids, ref_info) in zip(got, ref):
        assert ids.dtype == torch.int32 and ids.shape == ref_ids.shape
        assert torch.equal(ids, ref_ids)
        assert info == ref_info
    assert ref[2][1] == [] and not ref[2][0].any()

    # The case exercises every rule: some queries filtered by the class threshold (low confidence
    # and no-object), some by the overlap test (the duplicate at least), stuff merges, void.
    scores, labels = class_logits[0].softmax(-1).max(-1)
    keep = (labels != NUM_CLASSES) & (scores > 0.8)
    assert 0 < int(keep.sum()) < class_logits.shape[1] - 5
    _, assigned, full = panoptic_assign_reference(scores[keep], mask_embed[0][keep], pixel_embed[0],
                                                  image_sizes[0], output_sizes[0])
    lut, info = assemble_panoptic(labels[keep].tolist(), scores[keep].tolist(), assigned.tolist(),
                                  full.tolist(), 0.8, THING_CLASSES)
    assert int(keep.sum()) == 14 and lut[12] == 0 and assigned[12] == 0  # the duplicate never wins
    assert lut[PARTIAL] == 0 and 0 < assigned[PARTIAL] < 0.8 * full[PARTIAL]
    stuff = [seg for seg, c in zip(lut, labels[keep].tolist()) if c >= 10 and seg > 0]
    assert len(stuff) > len(set(stuff)), "expected at least one stuff merge"
    assert any(seg["isthing"] for seg in info) and any(not seg["isthing"] for seg in info)


@pytest.mark.gpu
def test_panoptic_gpu_cityscapes_size():
    torch.manual_seed(0)
    class_logits, mask_embed, pixel_embed = (t.cuda() for t in panoptic_inputs(2, 256, 256, 512))
    sizes = [(1024, 2048), (1000, 2011)]
    kwargs = dict(object_mask_threshold=0.8, overlap_threshold=0.8, thing_classes=THING_CLASSES)
    got = ops.panoptic_inference(class_logits, mask_embed, pixel_embed, sizes, sizes, impl="triton", **kwargs)
    ref = ops.panoptic_inference(class_logits, mask_embed, pixel_embed, sizes, sizes, impl="torch", **kwargs)
    for (ids, info), (ref_ids, ref_info) in zip(got, ref):
        # fp32 rounding (GPU exp, summation order) may flip a pixel whose two best products tie
        # within ~1e-6; the segments must be the same and the maps agree almost everywhere.
        assert (ids == ref_ids).float().mean().item() > 0.9999
        assert [(s["id"], s["category_id"]) for s in info] == [(s["id"], s["category_id"]) for s in ref_info]
