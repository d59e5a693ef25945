"""Inference on constructed cases: which query wins where, thresholds, overlap filter, stuff
merge, resampling order."""
import pytest
import torch
import torch.nn.functional as F

from fastmaskformer import ops

BIG = 20.0


def region_embeddings(regions, h, w):
    """pixel_embed [1, R, h, w] with channel r = +BIG inside region r else -BIG; query r's
    mask_embed is the unit vector r, so its mask is ~1 exactly on region r."""
    pix = torch.full((1, len(regions), h, w), -BIG)
    for r, (ys, xs) in enumerate(regions):
        pix[0, r, ys, xs] = BIG
    emb = torch.eye(len(regions))[None]
    return emb, pix


def class_logits_for(classes, num_classes, confidence=BIG):
    """Query q predicts classes[q] (None = no object) with high confidence."""
    logits = torch.zeros(1, len(classes), num_classes + 1)
    for q, c in enumerate(classes):
        logits[0, q, num_classes if c is None else c] = confidence
    return logits


def test_semantic_query_covering_a_region_gets_it():
    h, w = 8, 8
    emb, pix = region_embeddings([(slice(0, 4), slice(None)), (slice(4, 8), slice(None))], h, w)
    cls = class_logits_for([3, 1], num_classes=5)
    (labels,) = ops.semantic_inference(cls, emb, pix, [(32, 32)], impl="torch")
    assert labels.shape == (32, 32) and labels.dtype == torch.int64
    assert labels[:14].eq(3).all() and labels[18:].eq(1).all()


def test_semantic_crop_then_resize_order():
    torch.manual_seed(0)
    cls, emb, pix = torch.randn(1, 4, 7), torch.randn(1, 4, 3), torch.randn(1, 3, 6, 5)
    (labels, score), = ops.semantic_inference(cls, emb, pix, [(21, 17)], [(40, 9)], return_score=True, impl="torch")
    masks = F.interpolate(torch.einsum("qc,chw->qhw", emb[0], pix[0])[None], size=(24, 20), mode="bilinear",
                          align_corners=False)[0].sigmoid()
    scores = torch.einsum("qk,qhw->khw", cls[0].softmax(-1)[:, :-1], masks)[:, :21, :17]
    scores = F.interpolate(scores[None], size=(40, 9), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(score, scores.max(0).values)
    assert torch.equal(labels, scores.argmax(0))


def test_semantic_tta_single_view_and_flip():
    torch.manual_seed(1)
    cls, emb, pix = torch.randn(1, 5, 4), torch.randn(1, 5, 3), torch.randn(1, 3, 4, 6)
    (plain,) = ops.semantic_inference(cls, emb, pix, [(14, 22)], [(30, 40)], impl="torch")
    view = dict(class_logits=cls[0], mask_embed=emb[0], pixel_embed=pix[0], image_size=(14, 22))
    assert torch.equal(ops.semantic_inference_tta([view], (30, 40), impl="torch"), plain)
    # a flipped view of a flipped input agrees with the plain view (padding on the right: use a full-width image)
    full = dict(view, image_size=(14, 24))
    flipped = dict(full, pixel_embed=pix[0].flip(-1), flipped=True)
    a = ops.semantic_inference_tta([full], (30, 40), impl="torch")
    b = ops.semantic_inference_tta([full, flipped], (30, 40), impl="torch")
    assert torch.equal(a, b)


def test_panoptic_thresholds_overlap_and_stuff_merge():
    h, w = 8, 8
    regions = [
        (slice(0, 4), slice(0, 4)),  # q0 thing class 0
        (slice(0, 4), slice(4, 8)),  # q1 thing class 0: a second instance
        (slice(4, 8), slice(0, 4)),  # q2 stuff class 2
        (slice(4, 8), slice(4, 8)),  # q3 stuff class 2: merged with q2
        (slice(0, 8), slice(0, 8)),  # q4 stuff class 3 covering everything, lower score: loses
        (slice(0, 2), slice(0, 2)),  # q5 low confidence: filtered by object_mask_threshold
        (slice(0, 2), slice(0, 2)),  # q6 no object
    ]
    emb, pix = region_embeddings(regions, h, w)
    cls = class_logits_for([0, 0, 2, 2, 3, None, 1], num_classes=4)
    cls[0, 4] = torch.tensor([0.0, 0.0, 0.0, 6.0, 0.0])  # class 3 with p ~ 0.93 < the others' ~1
    cls[0, 5] = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0])  # class 1 with p ~ 0.48 -> filtered
    (id_map, info), = ops.panoptic_inference(cls, emb, pix, [(32, 32)], object_mask_threshold=0.8,
                                             overlap_threshold=0.8, thing_classes=[0, 1], impl="torch")
    assert id_map.dtype == torch.int32 and id_map.shape == (32, 32)
    cats = {s["id"]: (s["category_id"], s["isthing"]) for s in info}
    assert sorted(cats.values()) == [(0, True), (0, True), (2, False)]
    things = [s["id"] for s in info if s["isthing"]]
    assert id_map[2, 2] == things[0] and id_map[2, 30] == things[1]
    stuff = [s["id"] for s in info if not s["isthing"]][0]
    assert id_map[30, 2] == stuff and id_map[30, 30] == stuff  # merged stuff
    assert all(0 < s["score"] <= 1 for s in info)
    # lowering the threshold keeps q5 but it is fully covered by q0 -> dropped by the overlap filter
    (id2, info2), = ops.panoptic_inference(cls, emb, pix, [(32, 32)], object_mask_threshold=0.3,
                                           thing_classes=[0, 1], impl="torch")
    assert torch.equal(id2, id_map) and len(info2) == len(info)


def test_panoptic_nothing_kept_is_all_void():
    emb, pix = region_embeddings([(slice(0, 8), slice(0, 8))], 8, 8)
    (id_map, info), = ops.panoptic_inference(class_logits_for([None], 3), emb, pix, [(30, 31)], [(15, 16)],
                                             impl="torch")
    assert info == [] and id_map.shape == (15, 16) and id_map.eq(0).all()


def test_panoptic_assign_counts():
    emb, pix = region_embeddings([(slice(0, 2), slice(None)), (slice(2, 8), slice(None))], 8, 8)
    ids, assigned, confident = ops.inference.panoptic_assign_reference(torch.tensor([0.9, 0.95]), emb[0], pix[0],
                                                                        (32, 32), (32, 32))
    assert assigned.sum() == 32 * 32 and assigned.tolist() == [int((ids == 0).sum()), int((ids == 1).sum())]
    assert 6 * 32 <= confident[0] <= 10 * 32 and confident[1] >= 22 * 32


def test_instance_inference():
    emb, pix = region_embeddings([(slice(0, 4), slice(None)), (slice(4, 8), slice(None))], 8, 8)
    cls = class_logits_for([2, 0], num_classes=3)
    (res,) = ops.instance_inference(cls, emb, pix, [(32, 32)], topk=2, impl="torch")
    assert res["masks"].shape == (2, 32, 32) and res["masks"].dtype == torch.bool
    assert sorted(res["labels"].tolist()) == [0, 2]
    assert res["scores"].min() > 0.9
    top = res["masks"][res["labels"].tolist().index(2)]
    assert top[:14].all() and not top[18:].any()


def test_inference_bad_sizes():
    cls, emb, pix = torch.randn(1, 2, 3), torch.randn(1, 2, 4), torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="within the model input size"):
        ops.semantic_inference(cls, emb, pix, [(17, 16)])
    with pytest.raises(ValueError, match="need 1 image_sizes"):
        ops.semantic_inference(cls, emb, pix, [(16, 16), (16, 16)])


# ---------------------------------------------------------------------------- tiled semantic (CPU)
TILED_CASES = [
    # Q, C, K, (h, w), input_size, image_size, output_size, tile
    (17, 8, 9, (13, 21), None, (49, 70), (97, 131), 7),  # crop, upsample
    (17, 8, 9, (13, 21), None, (52, 84), (33, 151), 5),  # no crop; rows down, columns up
    (16, 8, 12, (16, 23), (61, 90), (61, 90), (122, 181), 11),  # unpadded input (not 4x the embedding)
    (16, 8, 12, (16, 23), (61, 90), (50, 70), (45, 163), 4),
    (20, 8, 8, (32, 40), None, (100, 150), (100, 150), 13),  # crop only, no resize
    (20, 8, 8, (40, 50), (160, 200), (160, 200), (160, 200), 9),  # no upsample, no crop, no resize
    (20, 8, 40, (20, 30), (80, 120), (77, 111), (300, 211), 64),
]


def _tiled_problem(queries, channels, classes, low, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(queries, classes + 1, generator=g) * 3, torch.randn(queries, channels, generator=g),
            torch.randn(channels, *low, generator=g))


@pytest.mark.parametrize("case", range(len(TILED_CASES)))
def test_semantic_tiled_is_bit_identical_to_the_reference(case):
    from fastmaskformer.ops.inference import _VEC_STEP, _tileable, semantic_labels_tiled, semantic_scores_reference

    if torch.backends.cpu.get_cpu_capability() not in _VEC_STEP:
        pytest.skip(f"tiling not modelled for {torch.backends.cpu.get_cpu_capability()} (untiled reference used)")
    queries, channels, classes, low, input_size, image_size, output_size, tile = TILED_CASES[case]
    args = _tiled_problem(queries, channels, classes, low, case)
    sizes = (input_size or (4 * low[0], 4 * low[1]), low, image_size, output_size)
    assert _tileable(queries, classes, *sizes) is not None  # really tiled here, no fallback
    threads = torch.get_num_threads()
    try:
        for num_threads, t in ((threads, tile), (threads, 3 * tile + 1), (1, tile)):
            torch.set_num_threads(num_threads)  # the sigmoid's scalar tails move with the threads
            ref_score, ref_labels = semantic_scores_reference(*args, image_size, output_size, input_size).max(0)
            score, labels = semantic_labels_tiled(*args, image_size, output_size, input_size, tile=t)
            assert torch.equal(score, ref_score) and torch.equal(labels, ref_labels), (num_threads, t)
    finally:
        torch.set_num_threads(threads)


def test_semantic_inference_torch_is_tiled_and_unchanged(monkeypatch):
    from fastmaskformer.ops import inference

    cl, me, pe = (torch.stack(t) for t in zip(_tiled_problem(20, 8, 30, (24, 32), 1), _tiled_problem(20, 8, 30, (24, 32), 2)))
    sizes, outs = [(90, 120), (96, 101)], [(135, 180), (70, 150)]
    expected = [inference.semantic_scores_reference(cl[b], me[b], pe[b], sizes[b], outs[b]).max(0) for b in range(2)]
    # A budget of ~24 rows of scores: several tiles per image.
    monkeypatch.setattr(inference, "SEMANTIC_TILE_BYTES", 4 * 30 * 180 * 24)
    calls = []
    tiled = inference.semantic_labels_tiled
    monkeypatch.setattr(inference, "semantic_labels_tiled", lambda *a, **k: calls.append(a) or tiled(*a, **k))
    got = ops.semantic_inference(cl, me, pe, sizes, outs, return_score=True, impl="torch")
    assert len(calls) == 2
    assert inference._tileable(20, 30, (96, 128), (24, 32), sizes[0], outs[0]) is not None  # no fallback
    for (labels, score), (ref_score, ref_labels) in zip(got, expected):
        assert torch.equal(labels, ref_labels) and torch.equal(score, ref_score)


def test_semantic_tiled_sigmoid_rounds_each_element_as_the_whole_map_does():
    # ATen's sigmoid rounds the scalar tail of each thread's chunk differently from the
    # vectorised body; a band of the map must reproduce that per element. The map is filled with
    # values whose scalar and vectorised sigmoids differ, so any misrouted element shows.
    from fastmaskformer.ops.inference import _VEC_STEP, _sigmoid_as_in

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _VEC_STEP:
        pytest.skip(f"no vectorised sigmoid model for {capability}")
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(8192, generator=g) * 4
    scalar = torch.cat([v.sigmoid() for v in pool.split(1)])
    differ = pool[scalar != pool.sigmoid()]
    if capability in ("AVX512", "AVX2"):
        assert len(differ) > 0  # Sleef's vector exp vs std::exp
    if len(differ) == 0:  # e.g. DEFAULT: every lane computed the scalar way
        differ = pool
    threads = torch.get_num_threads()
    try:
        for num_threads, shape in ((1, (7, 33, 45)), (2, (7, 83, 131))):  # one chunk / two chunks, with tails
            torch.set_num_threads(num_threads)
            total = shape[0] * shape[1] * shape[2]
            x = differ[torch.randint(0, len(differ), shape, generator=g)]
            ref = x.sigmoid()
            for r0, r1, cols in ((0, shape[1], shape[2]), (shape[1] - 5, shape[1], shape[2] - 3), (3, 17, shape[2])):
                got = _sigmoid_as_in(x[:, r0:r1, :cols], r0, shape, total, _VEC_STEP[capability])
                assert torch.equal(got, ref[:, r0:r1, :cols]), (num_threads, r0, r1, cols)
    finally:
        torch.set_num_threads(threads)


def test_panoptic_assign_reference_cpu_equals_the_dense_definition():
    """The CPU reference's per-query running maximum (``_panoptic_winners_cpu``) gives the ids and
    areas of the dense definition: argmax_k scores_k sigmoid(logits_k) (first index on ties, here
    forced by repeated queries and scores) and the pixels with sigmoid >= 0.5."""
    from fastmaskformer.ops.inference import resized_mask_logits_reference

    g = torch.Generator().manual_seed(3)
    mask_embed = torch.randn(7, 8, generator=g)
    mask_embed[4] = mask_embed[1]  # a tie: query 1 must win
    pixel_embed = torch.randn(8, 6, 5, generator=g)
    scores = torch.rand(7, generator=g)
    scores[4] = scores[1]
    ids, assigned, full = torch.ops.fastmaskformer.panoptic_assign_reference(scores, mask_embed, pixel_embed,
                                                                             [22, 19], [30, 26], [24, 20])
    masks = resized_mask_logits_reference(mask_embed, pixel_embed, [22, 19], [30, 26], [24, 20]).sigmoid()
    want = (scores[:, None, None] * masks).argmax(0)
    assert torch.equal(ids, want) and not bool((ids == 4).any())
    assert torch.equal(assigned, torch.bincount(want.flatten(), minlength=7))
    assert torch.equal(full, (masks >= 0.5).flatten(1).sum(1))
