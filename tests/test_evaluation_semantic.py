"""SemanticEvaluator (mIoU & co.) and SemanticPQEvaluator (PQ^St): hand cases, torchmetrics
parity, streaming, bad input, and the cross-rank sum on a 2-process gloo group."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fastmaskformer.evaluation import PanopticEvaluator, SemanticEvaluator, SemanticPQEvaluator

IGNORE = 255


def _jaccard(**kwargs):
    # Imported here, not at module level: torchmetrics takes seconds to import, and the spawned
    # distributed workers re-import this module.
    from torchmetrics.classification import MulticlassJaccardIndex

    return MulticlassJaccardIndex(**kwargs)


def _random_labels(num_classes, shape, ignore_fraction=0.1, seed=0, classes=None):
    """pred, gt int64 tensors of ``shape``; gt has ~ignore_fraction ignore pixels.
    classes: the label values to draw from (default all K)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.arange(num_classes) if classes is None else torch.as_tensor(classes)
    pred = values[torch.randint(len(values), shape, generator=g)]
    gt = values[torch.randint(len(values), shape, generator=g)]
    # Make predictions right on ~half the pixels so that IoUs are far from 0.
    right = torch.rand(shape, generator=g) < 0.5
    pred = torch.where(right, gt, pred)
    gt = gt.masked_fill(torch.rand(shape, generator=g) < ignore_fraction, IGNORE)
    return pred, gt


BACKENDS = ["hotcoco", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_case(backend):
    # Valid pixels: (gt 0, pred 0), (gt 1, pred 1), (gt 1, pred 2); one ignored pixel.
    ev = SemanticEvaluator(4, ignore_label=IGNORE, backend=backend)
    ev.update(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1], [1, IGNORE]]))
    r = ev.compute()
    assert r["IoU"][:3] == [100.0, 50.0, 0.0]  # class 2 predicted, absent from GT: IoU 0
    assert math.isnan(r["IoU"][3])  # class 3 only predicted on an ignored pixel: absent
    assert r["ACC"][:2] == [100.0, 50.0] and all(math.isnan(a) for a in r["ACC"][2:])
    assert r["mIoU"] == pytest.approx(50.0)  # (100 + 50 + 0) / 3
    assert r["mACC"] == pytest.approx(75.0)
    assert r["pAcc"] == pytest.approx(200 / 3)
    assert r["fwIoU"] == pytest.approx((1 * 100 + 2 * 50) / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torchmetrics_and_hand_formulas(backend):
    k = 7
    pred, gt = _random_labels(k, (3, 17, 23), seed=1)
    ev = SemanticEvaluator(k, ignore_label=IGNORE, backend=backend)
    ev.update(pred, gt)
    r = ev.compute()
    miou = _jaccard(num_classes=k, average="macro", ignore_index=IGNORE)
    assert r["mIoU"] == pytest.approx(100 * float(miou(pred, gt)), abs=1e-4)
    per_class = _jaccard(num_classes=k, average="none", ignore_index=IGNORE)
    np.testing.assert_allclose(r["IoU"], 100 * per_class(pred, gt).double().numpy(), atol=1e-4)
    valid = gt != IGNORE
    assert r["pAcc"] == pytest.approx(100 * float((pred == gt)[valid].double().mean()))
    accs = [float((pred[gt == c] == c).double().mean()) for c in range(k)]
    assert r["mACC"] == pytest.approx(100 * np.mean(accs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_classes_absent_from_both_are_skipped_like_torchmetrics(backend):
    # Only labels {0, 2, 5, 7} occur in a K = 9 problem. torchmetrics (1.9) gives zero weight
    # to classes absent from both GT and prediction in its macro mean, as detectron2 skips
    # them, so the means agree (older torchmetrics counted them as 0); per-class values agree
    # on the classes that occur (torchmetrics reports 0 for the others, we report NaN).
    k = 9
    pred, gt = _random_labels(k, (2, 31, 19), seed=2, classes=[0, 2, 5])
    pred[0, 0, 0] = 7  # predicted, never in GT: IoU 0, counted in the mean
    ev = SemanticEvaluator(k, ignore_label=IGNORE, backend=backend)
    ev.update(pred, gt)
    r = ev.compute()
    occurs = [0, 2, 5, 7]
    assert [c for c in range(k) if not math.isnan(r["IoU"][c])] == occurs
    assert r["IoU"][7] == 0.0
    miou = _jaccard(num_classes=k, average="macro", ignore_index=IGNORE)
    assert r["mIoU"] == pytest.approx(100 * float(miou(pred, gt)), abs=1e-4)
    per_class = _jaccard(num_classes=k, average="none", ignore_index=IGNORE)(pred, gt)
    np.testing.assert_allclose([r["IoU"][c] for c in occurs], 100 * per_class[occurs].numpy(), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_and_input_forms_agree(backend):
    k = 5
    pred, gt = _random_labels(k, (4, 9, 11), seed=3)
    batched = SemanticEvaluator(k, backend="reference")
    batched.update(pred, gt)
    streamed = SemanticEvaluator(k, backend=backend)
    for p, g in zip(pred, gt):
        streamed.update(p.numpy().astype(np.int32), g.numpy().astype(np.uint8))  # numpy [H, W]
    assert torch.equal(batched.confusion, streamed.confusion)
    assert batched.confusion.dtype == torch.int64 and batched.confusion.sum() == (gt != IGNORE).sum()
    streamed.reset()
    assert all(math.isnan(v) for v in streamed.compute()["IoU"])
    # Non-contiguous (transposed) inputs count the same pixels.
    transposed = SemanticEvaluator(k, backend=backend)
    transposed.update(pred.transpose(1, 2), gt.transpose(1, 2))
    assert torch.equal(transposed.confusion, batched.confusion)


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        ([[0, 5]], [[0, 1]], r"pred (contains|pixel \d+ has) label 5"),
        ([[-1, 0]], [[0, 1]], r"pred (contains label -1|pixel \d+ has a negative label)"),
        ([[0, 1]], [[0, 5]], r"gt (contains|pixel \d+ has) label 5"),  # 5 == K: not the ignore row
        ([[0, 1]], [[0, 7]], r"gt (contains|pixel \d+ has) label 7"),
        ([[0, 1]], [[0, 1], [1, 1]], "shape"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_labels_and_shapes_raise(pred, gt, message, backend):
    with pytest.raises(ValueError, match=message):
        SemanticEvaluator(5, backend=backend).update(torch.tensor(pred), torch.tensor(gt))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_labels_raise(backend):
    with pytest.raises(TypeError, match="integer"):
        SemanticEvaluator(5, backend=backend).update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_backends_count_the_same_pixels():
    """Every integer dtype, batches, and ignore pixels: identical confusion matrices."""
    pred, gt = _random_labels(11, (3, 40, 57), seed=9)
    expected = SemanticEvaluator(11, backend="reference")
    expected.update(pred, gt)
    for pred_dtype, gt_dtype in [(np.int64, np.uint8), (np.int32, np.int16), (np.uint8, np.int64)]:
        ev = SemanticEvaluator(11, backend="hotcoco")
        ev.update(pred.numpy().astype(pred_dtype), gt.numpy().astype(gt_dtype))
        assert torch.equal(ev.confusion, expected.confusion), (pred_dtype, gt_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_update_counts_nothing(backend):
    ev = SemanticEvaluator(5, backend=backend)
    ev.update(np.array([[0, 1]]), np.array([[0, 1]]))
    before = ev.confusion.clone()
    with pytest.raises(ValueError, match="label 7"):
        ev.update(np.array([[0, 1], [2, 3]]), np.array([[0, 1], [2, 7]]))
    assert torch.equal(ev.confusion, before)


def test_counts_of_both_engines_add_up():
    """CUDA inputs of a hotcoco-backend evaluator are counted by the reference: the two parts of
    the state add up (here the reference is forced on CPU inputs)."""
    pred, gt = _random_labels(6, (2, 10, 12), seed=12)
    expected = SemanticEvaluator(6, backend="reference")
    expected.update(pred, gt)
    ev = SemanticEvaluator(6, backend="hotcoco")
    ev.update(pred[0], gt[0])
    ev.backend = "reference"
    ev.update(pred[1], gt[1])
    assert torch.equal(ev.confusion, expected.confusion)


def test_negative_ignore_label_counts_with_the_reference():
    pred, gt = _random_labels(4, (2, 7, 9), seed=11)
    expected = SemanticEvaluator(4)
    expected.update(pred, gt)
    ev = SemanticEvaluator(4, ignore_label=-1)  # auto: hotcoco takes only ignore labels >= 0
    assert ev.backend == "reference"
    ev.update(pred, gt.masked_fill(gt == IGNORE, -1))
    assert torch.equal(ev.confusion, expected.confusion)
    with pytest.raises(ValueError, match="ignore_label >= 0"):
        SemanticEvaluator(4, ignore_label=-1, backend="hotcoco")


def _semantic_to_panoptic(labels):
    """Label map -> (id map, segments_info) with one stuff segment per class, ignore -> void."""
    labels = np.asarray(labels)
    ids = np.where(labels == IGNORE, 0, labels + 1)
    info = [{"id": int(c) + 1, "category_id": int(c)} for c in np.unique(labels) if c != IGNORE]
    return ids, info


def test_pq_st_hand_case():
    # 4x4 image. GT: class 0 on the left half, class 1 on the right half, one ignored pixel.
    gt = np.array([[0, 0, 1, 1]] * 4)
    gt[0, 3] = IGNORE
    pred = np.array([[0, 0, 0, 1]] * 4)  # class 0 IoU 8/12, class 1 IoU 3/7 (void pixel excused)
    pred[0, 3] = 2  # class 2 only on void: not a false positive
    ev = SemanticPQEvaluator(3)
    ev.update(pred, gt)
    r = ev.compute()
    assert r["per_class"][0] == pytest.approx({"pq": 8 / 12, "sq": 8 / 12, "rq": 1.0})
    assert r["per_class"][1] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0})  # IoU 3/7 < 0.5
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["All"]["n"] == 2 and r["Stuff"]["n"] == 2 and r["Things"]["n"] == 0
    assert r["All"]["pq"] == pytest.approx((8 / 12 + 0) / 2)
    assert math.isnan(r["Things"]["pq"])


def test_pq_st_equals_panoptic_evaluator_on_converted_maps():
    k = 6
    pred, gt = _random_labels(k, (5, 13, 17), seed=4)
    sem = SemanticPQEvaluator(k)
    sem.update(pred, gt)
    pan = PanopticEvaluator([{"id": c, "isthing": 0} for c in range(k)])
    for p, g in zip(pred.numpy(), gt.numpy()):
        pan.update(*_semantic_to_panoptic(p), *_semantic_to_panoptic(g))
    assert _results_close(sem.compute(), pan.compute())


def _results_close(a, b):
    for group in ("All", "Stuff"):
        assert a[group] == pytest.approx(b[group], abs=1e-12)
    for c in a["per_class"]:
        assert a["per_class"][c] == pytest.approx(b["per_class"][c], abs=1e-12)
    return True


def _distributed_worker(rank, world_size, init_file, k, result_queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pred, gt = _random_labels(k, (2, 8, 9), seed=10)
        miou_ev, pq_ev = SemanticEvaluator(k), SemanticPQEvaluator(k)
        miou_ev.update(pred[rank], gt[rank])  # each rank sees one of the two images
        pq_ev.update(pred[rank], gt[rank])
        reduced = miou_ev.compute(distributed=True)
        miou_ev.sync()
        pq_ev.sync()
        result_queue.put((rank, reduced, miou_ev.compute(), miou_ev.confusion.tolist(), pq_ev.compute()))
    finally:
        dist.destroy_process_group()


def test_distributed_sum_over_two_gloo_ranks(tmp_path):
    k = 4
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "pg"), k, queue), nprocs=2, join=True)
    pred, gt = _random_labels(k, (2, 8, 9), seed=10)
    single, single_pq = SemanticEvaluator(k), SemanticPQEvaluator(k)
    single.update(pred, gt)
    single_pq.update(pred, gt)
    expected, expected_pq = single.compute(), single_pq.compute()
    for _ in range(2):
        _, reduced, synced, confusion, pq = queue.get()
        assert confusion == single.confusion.tolist()
        for key, value in expected.items():
            assert reduced[key] == pytest.approx(value, nan_ok=True)
            assert synced[key] == pytest.approx(value, nan_ok=True)
        assert _results_close(pq, expected_pq)


def test_sync_twice_or_update_after_sync_raises():
    ev = SemanticEvaluator(3)
    ev.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    before = ev.confusion.clone()
    ev.sync()  # no process group: a no-op sum
    assert torch.equal(ev.confusion, before)
    with pytest.raises(RuntimeError):
        ev.sync()
    with pytest.raises(RuntimeError):
        ev.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.gpu
def test_confusion_stays_on_the_input_device():
    k = 6
    pred, gt = _random_labels(k, (2, 33, 47), seed=6)
    on_gpu, on_cpu = SemanticEvaluator(k), SemanticEvaluator(k)
    on_gpu.update(pred.cuda(), gt.to(torch.uint8).cuda())
    on_cpu.update(pred, gt)
    assert on_gpu.confusion.device.type == "cuda"
    assert torch.equal(on_gpu.confusion.cpu(), on_cpu.confusion)
    assert on_gpu.compute()["IoU"] == pytest.approx(on_cpu.compute()["IoU"], nan_ok=True)
