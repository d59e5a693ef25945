"""PQ / SQ / RQ: parity with panopticapi's pq_compute (both backends: hotcoco and our reference)
on the real COCO sample with perturbed predictions and on synthetic data with crowd regions,
empty images and images without predictions, the streaming evaluator, bad input, and the
cross-rank sum."""
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fastmaskformer.evaluation import PanopticEvaluator, pq_compute, read_id_png
from fastmaskformer.evaluation.panoptic import _dense_index, segment_intersections, segment_pair_counts

panopticapi_evaluation = pytest.importorskip("panopticapi.evaluation")


# ---------------------------------------------------------------- COCO-format files


def _write_png(path, id_map):
    """int [H, W] ids -> COCO RGB PNG (id = R + 256 G + 256^2 B)."""
    id_map = np.asarray(id_map, dtype=np.int64)
    rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(path)


def _write_dataset(root, name, images, categories):
    """Write root/name.json + root/name/*.png. images: [(image_id, id_map, segments_info)]."""
    folder = root / name
    folder.mkdir()
    annotations = []
    for image_id, id_map, segments in images:
        file_name = f"{image_id:012d}.png"
        _write_png(folder / file_name, id_map)
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    json_file = root / f"{name}.json"
    json_file.write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return str(json_file), str(folder)


def _assert_same_results(ours, theirs):
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == theirs[group]["n"], group
        for key in ("pq", "sq", "rq"):
            assert ours[group][key] == pytest.approx(theirs[group][key], abs=1e-6), (group, key)
    assert set(ours["per_class"]) == set(theirs["per_class"])
    for cat_id, values in theirs["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert ours["per_class"][cat_id][key] == pytest.approx(values[key], abs=1e-6), (cat_id, key)


BACKENDS = ["hotcoco", "reference"]


def _compare_with_panopticapi(gt_json, gt_folder, pred_json, pred_folder, backend):
    ours = pq_compute(gt_json, pred_json, gt_folder, pred_folder, backend=backend)
    theirs = panopticapi_evaluation.pq_compute(gt_json, pred_json, gt_folder, pred_folder)
    _assert_same_results(ours, theirs)
    return ours


# ---------------------------------------------------------------- perturbations


def _next_id(segments):
    return max([s["id"] for s in segments], default=0) + 1


def _perturb(id_map, segments, kind, categories, rng, gt_segments):
    """One prediction derived from GT: returns (id map, segments_info) of ``kind``."""
    id_map = id_map.copy()
    segments = [{"id": s["id"], "category_id": s["category_id"]} for s in segments]
    h, w = id_map.shape
    if kind in ("void", "all"):
        # Erase a block and a few whole segments to void (some become false negatives).
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        id_map[y:y + h // 3, x:x + w // 3] = 0
        for seg in rng.choice(segments, size=max(1, len(segments) // 5), replace=False):
            id_map[id_map == seg["id"]] = 0
    if kind in ("relabel", "all"):
        for seg in rng.choice(segments, size=max(1, len(segments) // 4), replace=False):
            seg["category_id"] = int(rng.choice([c["id"] for c in categories]))
    if kind in ("shift", "all"):
        id_map = np.roll(id_map, shift=(int(rng.integers(5, 30)), int(rng.integers(-30, 30))), axis=(0, 1))
    if kind in ("crowd", "all"):
        # Predicted segments on the GT crowd regions: the crowd's own category (excused when
        # mostly on crowd/void) and another category (a false positive).
        for crowd in [s for s in gt_segments if s.get("iscrowd", 0) == 1]:
            region = np.argwhere(id_map == crowd["id"])
            if len(region) == 0:
                continue
            top = region[: len(region) // 2]
            new_id = _next_id(segments)
            id_map[top[:, 0], top[:, 1]] = new_id
            segments.append({"id": new_id, "category_id": crowd["category_id"]})
            bottom = region[len(region) // 2:]
            new_id = _next_id(segments)
            id_map[bottom[:, 0], bottom[:, 1]] = new_id
            other = [c["id"] for c in categories if c["id"] != crowd["category_id"]]
            segments.append({"id": new_id, "category_id": int(rng.choice(other))})
    if kind in ("drop_merge", "all"):
        by_category = {}
        for seg in segments:
            by_category.setdefault(seg["category_id"], []).append(seg)
        for same in by_category.values():
            if len(same) >= 2:  # merge two segments of one category into one
                id_map[id_map == same[1]["id"]] = same[0]["id"]
        dropped = rng.choice(segments, size=max(1, len(segments) // 6), replace=False)
        for seg in dropped:
            id_map[id_map == seg["id"]] = 0
    present = set(np.unique(id_map).tolist())
    return id_map, [s for s in segments if s["id"] in present]


@pytest.fixture
def coco_gt(coco_sample):
    gt_json = coco_sample / "panoptic_examples.json"
    gt = json.loads(gt_json.read_text())
    maps = {ann["image_id"]: read_id_png(str(coco_sample / "panoptic_examples" / ann["file_name"]))
            for ann in gt["annotations"]}
    return str(gt_json), str(coco_sample / "panoptic_examples"), gt, maps


PERTURBATIONS = ["identity", "void", "relabel", "shift", "crowd", "drop_merge", "all"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_matches_panopticapi_on_real_coco_sample(coco_gt, tmp_path, kind, backend):
    gt_json, gt_folder, gt, maps = coco_gt
    rng = np.random.default_rng(PERTURBATIONS.index(kind))
    predictions = []
    for ann in gt["annotations"]:
        id_map, segments = maps[ann["image_id"]], ann["segments_info"]
        if kind != "identity":
            id_map, segments = _perturb(id_map, segments, kind, gt["categories"], rng, segments)
        predictions.append((ann["image_id"], id_map, segments))
    pred_json, pred_folder = _write_dataset(tmp_path, "pred", predictions, gt["categories"])
    ours = _compare_with_panopticapi(gt_json, gt_folder, pred_json, pred_folder, backend)
    if kind == "identity":
        assert ours["All"]["pq"] == 1.0
    else:
        assert ours["All"]["pq"] < 1.0


# ---------------------------------------------------------------- synthetic data

SYNTH_CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 5, "isthing": 1},
                    {"id": 7, "isthing": 0}, {"id": 8, "isthing": 0}, {"id": 11, "isthing": 0}]


def _synthetic_gt(rng, h=48, w=64):
    """Stuff bands, thing rectangles (some of one class), at most one crowd per category, void."""
    id_map = np.zeros((h, w), dtype=np.int64)
    segments = []
    bounds = np.sort(rng.choice(np.arange(1, h), size=2, replace=False))
    for top, bottom in zip([0, *bounds], [*bounds, h]):  # stuff: horizontal bands
        seg_id = int(rng.integers(1, 2**24))
        while any(s["id"] == seg_id for s in segments):
            seg_id = int(rng.integers(1, 2**24))
        id_map[top:bottom] = seg_id
        segments.append({"id": seg_id, "category_id": int(rng.choice([7, 8, 11])), "iscrowd": 0})
    crowded = set()
    for _ in range(rng.integers(3, 8)):  # things: rectangles drawn over the stuff
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        dy, dx = rng.integers(3, h // 2), rng.integers(3, w // 2)
        category = int(rng.choice([1, 2, 5]))
        crowd = category not in crowded and rng.random() < 0.25
        if crowd:
            crowded.add(category)
        seg_id = _next_id(segments) + int(rng.integers(0, 1000))
        id_map[y:y + dy, x:x + dx] = seg_id
        segments.append({"id": seg_id, "category_id": category, "iscrowd": int(crowd)})
    id_map[rng.random((h, w)) < 0.05] = 0  # scattered void
    id_map[:, : rng.integers(0, 6)] = 0  # a void border
    areas = dict(zip(*np.unique(id_map, return_counts=True)))
    # COCO GT lists each segment's pixel count as "area"; panopticapi reads it.
    return id_map, [{**s, "area": int(areas[s["id"]])} for s in segments if s["id"] in areas]


def _synthetic_pred(rng, gt_map, gt_segments):
    """Perturbations of GT plus random extra segments, so that IoUs spread around 0.5."""
    kind = rng.choice(["void", "relabel", "shift", "crowd", "drop_merge", "all"])
    id_map, segments = _perturb(gt_map, gt_segments, kind, SYNTH_CATEGORIES, rng, gt_segments)
    for _ in range(rng.integers(0, 3)):
        y, x = rng.integers(0, gt_map.shape[0] - 2), rng.integers(0, gt_map.shape[1] - 2)
        new_id = _next_id(segments)
        id_map[y:y + rng.integers(2, 20), x:x + rng.integers(2, 20)] = new_id
        category = int(rng.choice([c["id"] for c in SYNTH_CATEGORIES]))
        segments.append({"id": new_id, "category_id": category})
    present = set(np.unique(id_map).tolist())
    return id_map, [s for s in segments if s["id"] in present]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_panopticapi_on_synthetic_data(tmp_path, seed, backend):
    """12 images, the last three special: an empty image (all void, no segments) with an
    all-void prediction, an empty image with predicted segments (all false positives), and an
    image without predictions (every GT segment a false negative)."""
    rng = np.random.default_rng(seed)
    gt_images, pred_images = [], []
    for image_id in range(12):
        gt_map, gt_segments = _synthetic_gt(rng)
        pred_map, pred_segments = _synthetic_pred(rng, gt_map, gt_segments)
        if image_id in (9, 10):
            gt_map, gt_segments = np.zeros_like(gt_map), []
        if image_id in (9, 11):
            pred_map, pred_segments = np.zeros_like(pred_map), []
        gt_images.append((image_id, gt_map, gt_segments))
        pred_images.append((image_id, pred_map, pred_segments))
    gt_json, gt_folder = _write_dataset(tmp_path, "gt", gt_images, SYNTH_CATEGORIES)
    pred_json, pred_folder = _write_dataset(tmp_path, "pred", pred_images, SYNTH_CATEGORIES)
    ours = _compare_with_panopticapi(gt_json, gt_folder, pred_json, pred_folder, backend)
    assert 0.0 < ours["All"]["pq"] < 1.0

    # The streaming evaluator on in-memory tensors gives the same numbers.
    streaming = PanopticEvaluator(SYNTH_CATEGORIES)
    for (_, gt_map, gt_segments), (_, pred_map, pred_segments) in zip(gt_images, pred_images):
        streaming.update(torch.from_numpy(pred_map).int(), pred_segments,
                         torch.from_numpy(gt_map), gt_segments)
    _assert_same_results(streaming.compute(), ours)


def test_large_ids_take_the_binary_search_and_agree():
    """Ids past the lookup table (2^24, beyond any COCO colour) give the same counts through
    the binary-search path, and an unlisted id is still an error there."""
    rng = np.random.default_rng(4)
    small, large = PanopticEvaluator(SYNTH_CATEGORIES), PanopticEvaluator(SYNTH_CATEGORIES)
    shift = 1 << 40
    for _ in range(3):
        gt_map, gt_segments = _synthetic_gt(rng)
        pred_map, pred_segments = _synthetic_pred(rng, gt_map, gt_segments)
        small.update(pred_map, pred_segments, gt_map, gt_segments)
        large.update(np.where(pred_map > 0, pred_map + shift, 0),
                     [dict(s, id=s["id"] + shift) for s in pred_segments],
                     np.where(gt_map > 0, gt_map + shift, 0), [dict(s, id=s["id"] + shift) for s in gt_segments])
    _assert_same_results(large.compute(), small.compute())
    gt, gt_segments = _tiny()
    with pytest.raises(ValueError, match=f"contains segment id {shift + 9}"):
        large.update(np.array([[shift + 1, 0], [shift + 9, 0]]), [{"id": shift + 1, "category_id": 1}], gt, gt_segments)


def _renumbered(id_map, segments):
    """The same image with segment ids 1..S (small enough for uint8 maps)."""
    new_id = {s["id"]: i + 1 for i, s in enumerate(segments)}
    lookup = np.vectorize(lambda x: new_id.get(int(x), 0), otypes=[np.int64])
    return lookup(id_map), [dict(s, id=new_id[s["id"]]) for s in segments]


def test_lookup_path_agrees_across_dtypes_and_image_sizes():
    """The table-gather path (ids < 2^24) on uint8 / uint16 / int32 / int64 maps and on images
    of changing size (the evaluator's scratch buffer is reused and regrown) counts what the
    binary search counts, image by image."""
    rng = np.random.default_rng(7)
    images = []
    for h, w in [(48, 64), (12, 16), (64, 80), (16, 12)]:
        gt_map, gt_segments = _renumbered(*_synthetic_gt(rng, h, w))
        images.append((gt_map, gt_segments, *_renumbered(*_synthetic_pred(rng, gt_map, gt_segments))))
    for gt_map, gt_segments, pred_map, pred_segments in images:
        gt_ids, pred_ids = (np.array(sorted(s["id"] for s in seg)) for seg in (gt_segments, pred_segments))
        expected = segment_intersections(_dense_index(gt_map, gt_ids, "gt", 0), len(gt_ids),
                                         _dense_index(pred_map, pred_ids, "pred", 0), len(pred_ids))
        assert expected[1:, 1:].any() and expected[0].any()  # segments overlap, and GT has void
        for dtype in (np.uint8, np.uint16, np.int32, np.int64):
            got = segment_pair_counts(gt_map.astype(dtype), gt_ids, pred_map.astype(dtype), pred_ids, 0)
            np.testing.assert_array_equal(got, expected, err_msg=str(dtype))
    reused, fresh = PanopticEvaluator(SYNTH_CATEGORIES), []
    for gt_map, gt_segments, pred_map, pred_segments in images:
        reused.update(torch.from_numpy(pred_map).to(torch.int32), pred_segments, gt_map.astype(np.uint16), gt_segments)
        fresh.append(PanopticEvaluator(SYNTH_CATEGORIES))
        fresh[-1].update(pred_map, pred_segments, gt_map, gt_segments)
    for name in ("tp", "fp", "fn", "iou"):
        np.testing.assert_array_equal(getattr(reused.stats, name), sum(getattr(f.stats, name) for f in fresh))


def test_lookup_path_names_unlisted_and_negative_ids():
    gt, gt_segments = _tiny()
    pred_segments = [{"id": 1, "category_id": 1}]
    ev = PanopticEvaluator(SYNTH_CATEGORIES)
    with pytest.raises(ValueError, match="image 3: ground-truth id map contains segment id 6"):
        ev.update(np.array([[1, 1], [0, 0]]), pred_segments, np.array([[1, 6], [2, 0]]), gt_segments, image_id=3)
    with pytest.raises(ValueError, match="predicted id map contains segment id 300"):  # past the table
        ev.update(np.array([[1, 300], [0, 0]], dtype=np.uint16), pred_segments, gt, gt_segments)
    with pytest.raises(ValueError, match="predicted id map contains segment id -2"):  # never void
        ev.update(np.array([[1, -2], [0, 0]]), pred_segments, gt, gt_segments)
    assert ev.num_images == 0 and ev.stats.tp.sum() == ev.stats.fp.sum() == ev.stats.fn.sum() == 0
    ev.update(np.zeros((0, 0), dtype=np.int64), [], np.zeros((0, 0), dtype=np.int64), [])  # empty image
    assert ev.num_images == 1 and ev.stats.fn.sum() == 0


def test_hand_computed_case():
    # GT: thing 1 (8 px) and stuff 7 (8 px) in a 4x4 image; 2 void pixels in the stuff half.
    gt = np.array([[1] * 2 + [2] * 2] * 4)
    gt[0, 2:] = 0
    pred = np.array([[3] * 3 + [4]] * 4)  # 3: 12 px (8 on GT 1, 1 on void), 4: 4 px (1 on void)
    ev = PanopticEvaluator(SYNTH_CATEGORIES)
    ev.update(pred, [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 7}],
              gt, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 7}])
    r = ev.compute()
    # Segment 3 vs GT 1: IoU 8 / (12 + 8 - 8 - 1 void) = 8/11, a match. Segment 4 vs GT 2:
    # IoU 3 / (4 + 6 - 3 - 1 void) = 0.5, not > 0.5: one FP and one FN for category 7.
    assert r["per_class"][1] == pytest.approx({"pq": 8 / 11, "sq": 8 / 11, "rq": 1.0})
    assert r["per_class"][7] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["Things"]["n"] == 1 and r["Stuff"]["n"] == 1
    assert r["All"]["pq"] == pytest.approx(4 / 11)


# ---------------------------------------------------------------- bad input


def _tiny():
    gt = np.array([[1, 1], [2, 0]])
    return gt, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 7}]


@pytest.mark.parametrize(
    "pred, segments, message",
    [
        (np.array([[1, 1], [9, 0]]), [{"id": 1, "category_id": 1}],
         "image 42: predicted id map contains segment id 9"),
        (np.array([[1, 1], [0, 0]]), [{"id": 1, "category_id": 1}, {"id": 3, "category_id": 1}],
         r"segments \[3\]"),
        (np.array([[1, 1], [0, 0]]), [{"id": 1, "category_id": 99}], "unknown category_id 99"),
        (np.array([[1, 1], [0, 0]]), [{"id": 1, "category_id": 1}, {"id": 1, "category_id": 2}],
         "listed twice"),
        (np.array([[1, 1], [0, 0]]), [{"id": 1}], "lacks 'id' or 'category_id'"),
        (np.array([[1, 1, 1]]), [{"id": 1, "category_id": 1}], "size"),
    ],
)
def test_bad_predictions_raise(pred, segments, message):
    gt, gt_segments = _tiny()
    with pytest.raises(ValueError, match=message):
        PanopticEvaluator(SYNTH_CATEGORIES).update(pred, segments, gt, gt_segments, image_id=42)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_raise(tmp_path, backend):
    gt, gt_segments = _tiny()
    gt_json, gt_folder = _write_dataset(tmp_path, "gt", [(0, gt, gt_segments)], SYNTH_CATEGORIES)
    bad_size = np.ones((3, 3), dtype=np.int64)
    pred_json, pred_folder = _write_dataset(tmp_path, "pred", [(0, bad_size, [{"id": 1, "category_id": 1}])],
                                            SYNTH_CATEGORIES)
    # default folders: the JSON paths without ".json"
    with pytest.raises(ValueError, match="image 0: (predicted id map has size|ground truth is 2.2 but the prediction)"):
        pq_compute(gt_json, pred_json, backend=backend)
    (tmp_path / "pred" / "000000000000.png").unlink()
    with pytest.raises(FileNotFoundError, match="000000000000.png"):
        pq_compute(gt_json, pred_json, gt_folder, pred_folder, backend=backend)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pq_compute(gt_json, pred_json, gt_folder, str(tmp_path / "nowhere"), backend=backend)
    empty_json, _ = _write_dataset(tmp_path, "empty", [], SYNTH_CATEGORIES)
    with pytest.raises(ValueError, match="no prediction for image 0"):
        pq_compute(gt_json, empty_json, gt_folder, pred_folder, backend=backend)
    for segments, message in [([{"id": 1, "category_id": 1}, {"id": 1, "category_id": 2}], "listed twice"),
                              ([{"id": 1, "category_id": 99}], "unknown category_id 99")]:
        folder = tmp_path / message.replace(" ", "_")
        folder.mkdir()
        bad_json, bad_folder = _write_dataset(folder, "pred", [(0, gt, segments)], SYNTH_CATEGORIES)
        with pytest.raises(ValueError, match=f"image 0: predicted segment.* {message}"):
            pq_compute(gt_json, bad_json, gt_folder, bad_folder, backend=backend)


def test_group_without_categories_is_nan(tmp_path):
    categories = [{"id": 7, "isthing": 0}]
    ev = PanopticEvaluator(categories)
    segments = [{"id": 1, "category_id": 7}]
    ev.update(np.array([[1]]), segments, np.array([[1]]), segments)
    gt_json, gt_folder = _write_dataset(tmp_path, "gt", [(0, np.array([[1]]), segments)], categories)
    for r in (ev.compute(), pq_compute(gt_json, gt_json, backend="hotcoco")):
        assert r["Stuff"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
        assert r["Things"]["n"] == 0 and math.isnan(r["Things"]["pq"])


# ---------------------------------------------------------------- distributed


def _distributed_worker(rank, world_size, init_file, images, result_queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ev = PanopticEvaluator(SYNTH_CATEGORIES)
        for gt_map, gt_segments, pred_map, pred_segments in images[rank::world_size]:
            ev.update(pred_map, pred_segments, gt_map, gt_segments)
        reduced = ev.compute(distributed=True)
        ev.sync()
        result_queue.put((reduced, ev.compute()))
    finally:
        dist.destroy_process_group()


def test_distributed_sum_over_two_gloo_ranks(tmp_path):
    rng = np.random.default_rng(5)
    images = []
    for _ in range(4):
        gt_map, gt_segments = _synthetic_gt(rng)
        images.append((gt_map, gt_segments, *_synthetic_pred(rng, gt_map, gt_segments)))
    single = PanopticEvaluator(SYNTH_CATEGORIES)
    for gt_map, gt_segments, pred_map, pred_segments in images:
        single.update(pred_map, pred_segments, gt_map, gt_segments)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "pg"), images, queue), nprocs=2, join=True)
    for _ in range(2):
        reduced, synced = queue.get()
        _assert_same_results(reduced, single.compute())
        _assert_same_results(synced, single.compute())
