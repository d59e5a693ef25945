"""EoMT inference as the official code runs it (tue-mps/eomt ``training/lightning_module.py``).

The references below restate the official functions step by step on dense tensors (PIL resize
by the official factor, windows cut with the official loop, ``[B,Q,H,W]`` logits upsampled to
the model size, ``to_per_pixel_logits_semantic``, window sums / counts, ``interpolate`` back;
resize + black padding, crop of the padded logits, the official panoptic and instance
post-processing); ``infer`` (lazy outputs, fused ops) must give the same labels, segments and
instances on odd-sized images.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from types import SimpleNamespace

from test_eomt import tiny_eomt
from fastmaskformer.config import get_config
from fastmaskformer.data.transforms import build_augmentation, eomt_test_size, resized_test_size
from fastmaskformer.engine.predictor import Predictor, infer
from fastmaskformer.ops import window_semantic_inference
from fastmaskformer.ops.window_inference import semantic_windows

SIZE = 64  # tiny_eomt's img_size: the square model size
THINGS = (0, 1, 4)
TEST_CFG = SimpleNamespace(object_mask_threshold=0.5, overlap_threshold=0.5, instance_topk=12, panoptic_on=False)
# original (H, W): landscape with 3 overlapping windows, portrait with 2, square, 1 px off square, tiny
ODD_SIZES = [(50, 117), (131, 61), (64, 64), (65, 64), (23, 31)]


def _model():
    """A tiny EoMT with sharp classes and masks: several classes per semantic map, two thing
    segments and void pixels per panoptic map."""
    model = tiny_eomt().eval()
    with torch.no_grad():
        model.class_head.weight.mul_(10.0)
        model.mask_head[-1].weight.mul_(10.0)
    return model


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


# ----------------------------------------------------------------------------- references
def _pil_resize(img, size):
    """The official resize: PIL bilinear of the uint8 image to (h, w)."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


def _dense_logits(model, batch):
    """uint8 [B,3,S,S] -> (mask logits [B,Q,S,S] upsampled from S/4, class logits [B,Q,K+1])."""
    out = model(model.preprocess(list(batch))[0])
    logits = torch.einsum("bqc,bchw->bqhw", out.mask_embed[-1], out.pixel_embed[-1])
    return F.interpolate(logits, (SIZE, SIZE), mode="bilinear"), out.class_logits[-1]


@torch.no_grad()
def official_semantic(model, images, average=True, return_scores=False):
    """window_imgs_semantic -> network -> to_per_pixel_logits_semantic ->
    revert_window_logits_semantic -> argmax. ``average=False`` keeps the last window's scores
    where windows overlap (what a broken implementation would do); ``return_scores``: the class scores
    [K, H, W] instead of their argmax."""
    crops, origins = [], []
    for i, img in enumerate(images):
        factor = max(SIZE / img.shape[-2], SIZE / img.shape[-1])
        resized = _pil_resize(img, [round(s * factor) for s in img.shape[-2:]])
        num = math.ceil(max(resized.shape[-2:]) / SIZE)
        overlap = num * SIZE - max(resized.shape[-2:])
        per_crop = overlap / (num - 1) if overlap > 0 else 0
        for j in range(num):
            start = int(j * (SIZE - per_crop))
            tall = resized.shape[-2] > resized.shape[-1]
            crops.append(resized[:, start:start + SIZE, :] if tall else resized[:, :, start:start + SIZE])
            origins.append((i, start, tall, resized.shape[-2:]))
    mask_logits, class_logits = _dense_logits(model, torch.stack(crops))
    crop_scores = torch.einsum("bqhw,bqc->bchw", mask_logits.sigmoid(), class_logits.softmax(-1)[..., :-1])
    sums = {i: torch.zeros(crop_scores.shape[1], *size) for i, _, _, size in origins}
    counts = {i: torch.zeros_like(s) for i, s in sums.items()}
    for scores, (i, start, tall, _) in zip(crop_scores, origins):
        window = slice(start, start + SIZE)
        region = (slice(None), window) if tall else (slice(None), slice(None), window)
        if average:
            sums[i][region] += scores
            counts[i][region] += 1
        else:
            sums[i][region] = scores
            counts[i][region] = 1
    out = [F.interpolate((sums[i] / counts[i])[None], tuple(img.shape[-2:]), mode="bilinear")[0]
           for i, img in enumerate(images)]
    return out if return_scores else [o.argmax(0) for o in out]


@torch.no_grad()
def official_panoptic_logits(model, images, unpad=True):
    """resize_and_pad_imgs_instance_panoptic -> network -> upsample to S ->
    revert_resize_and_pad_logits_instance_panoptic: per image (mask logits [Q,H,W], class logits)."""
    batch, scaled = [], []
    for img in images:
        factor = min(SIZE / img.shape[-2], SIZE / img.shape[-1])
        size = [round(s * factor) for s in img.shape[-2:]]
        resized = _pil_resize(img, size)
        batch.append(F.pad(resized, (0, SIZE - resized.shape[-1], 0, SIZE - resized.shape[-2])))
        scaled.append(size if unpad else [SIZE, SIZE])
    mask_logits, class_logits = _dense_logits(model, torch.stack(batch))
    return [(F.interpolate(m[None, :, :h, :w], tuple(img.shape[-2:]), mode="bilinear")[0], c)
            for m, c, (h, w), img in zip(mask_logits, class_logits, scaled, images)]


def official_panoptic(mask_logits, class_logits, thresh, overlap, things=THINGS):
    """to_per_pixel_preds_panoptic of one image -> (class map, segment map) [H,W], -1 = void."""
    num_classes = class_logits.shape[-1] - 1
    scores, classes = class_logits.softmax(-1).max(-1)
    keep = classes.ne(num_classes) & (scores > thresh)
    sem = torch.full(mask_logits.shape[-2:], -1, dtype=torch.long)
    seg = torch.full(mask_logits.shape[-2:], -1, dtype=torch.long)
    if not keep.any():
        return sem, seg
    masks = mask_logits.sigmoid()
    mask_ids = (scores[keep][:, None, None] * masks[keep]).argmax(0)
    stuff_ids, next_id, segment_classes = {}, 0, []
    for k, class_id in enumerate(classes[keep].tolist()):
        orig, new = masks[keep][k] >= 0.5, mask_ids == k
        final = orig & new
        if orig.sum() == 0 or new.sum() == 0 or final.sum() == 0 or new.sum() / orig.sum() < overlap:
            continue
        if class_id not in things:
            if class_id in stuff_ids:
                seg[final] = stuff_ids[class_id]
                continue
            stuff_ids[class_id] = next_id
        seg[final] = next_id
        segment_classes.append(class_id)
        next_id += 1
    for segment_id, class_id in enumerate(segment_classes):
        sem[seg == segment_id] = class_id
    return sem, seg


def official_instance(mask_logits, class_logits, topk):
    """The official instance eval_step of one image -> (masks, labels, scores)."""
    scores = class_logits.softmax(-1)[:, :-1]
    labels = torch.arange(scores.shape[-1]).repeat(scores.shape[0])
    top_scores, top = scores.flatten().topk(topk, sorted=False)
    logits = mask_logits[top // scores.shape[-1]]
    masks = logits > 0
    mask_scores = (logits.sigmoid().flatten(1) * masks.flatten(1)).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return masks, labels[top], top_scores * mask_scores


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("size,expected", [
    ((64, 150), [(0, 0), (0, 43), (0, 86)]),  # overlap 42 over 2 gaps: steps of 43
    ((150, 64), [(0, 0), (43, 0), (86, 0)]),
    ((64, 64), [(0, 0)]),
    ((64, 128), [(0, 0), (0, 64)]),  # no overlap
    ((64, 129), [(0, 0), (0, 32), (0, 65)]),
])
def test_windows_are_the_official_ones(size, expected):
    windows = semantic_windows(size, 64)
    assert windows == expected
    long = max(size)
    assert windows[-1][0] + windows[-1][1] + 64 == long  # the last window ends at the far edge


def test_eomt_test_size_is_the_official_rounding():
    assert eomt_test_size(480, 640, 640, "panoptic") == (480, 640)
    assert eomt_test_size(427, 640, 512, "semantic") == (512, 767)  # round(767.4)
    assert eomt_test_size(256, 341, 640, "semantic") == (640, 852)  # Python's round: 852.5 -> 852
    assert eomt_test_size(1001, 333, 640, "panoptic") == (640, 213)


def test_semantic_windows_average_as_the_official():
    model = _model()
    images = _images(ODD_SIZES)
    results = infer(model, images, ODD_SIZES, TEST_CFG, ("semantic",))
    expected = official_semantic(model, images)
    for r, ref in zip(results, expected):
        assert torch.equal(r["semantic"], ref)
        assert len(torch.unique(ref)) >= 2
    # the overlap matters: keeping one window's scores changes labels of the 3-window image
    assert not torch.equal(official_semantic(model, images[:1], average=False)[0], expected[0])


def test_panoptic_and_instance_resize_pad_and_revert_as_the_official():
    model = _model()
    images = _images(ODD_SIZES, seed=1)
    results = infer(model, images, ODD_SIZES, TEST_CFG, ("panoptic", "instance"), THINGS)
    reference = official_panoptic_logits(model, images)
    segments_seen = voids = 0
    for r, (logits, cls) in zip(results, reference):
        sem, seg = official_panoptic(logits, cls, TEST_CFG.object_mask_threshold, TEST_CFG.overlap_threshold)
        ids, info = r["panoptic"]
        category = {s["id"]: s["category_id"] for s in info}
        ours = torch.tensor([category.get(int(i), -1) for i in ids.flatten()]).view(ids.shape)
        assert torch.equal(ours, sem)
        # the same partition: each official segment is exactly one of ours
        pairs = torch.unique(torch.stack([seg.flatten(), ids.flatten().long()]), dim=1)
        assert pairs.shape[1] == len(torch.unique(seg)) == len(torch.unique(ids))
        segments_seen += len(info)
        voids += int((ids == 0).sum())  # won but not confident, or no kept query: void
        masks, labels, scores = official_instance(logits, cls, TEST_CFG.instance_topk)
        order = scores.argsort(descending=True)
        inst = r["instance"]
        ours_order = inst["scores"].argsort(descending=True)
        assert torch.equal(inst["labels"][ours_order], labels[order])
        torch.testing.assert_close(inst["scores"][ours_order], scores[order], atol=1e-5, rtol=1e-4)
        assert torch.equal(inst["masks"][ours_order], masks[order])
    assert segments_seen >= 2 * len(images) and voids > 0
    # skipping the un-padding (resizing the whole padded square) changes the result
    unpadded = official_panoptic_logits(model, images[:1], unpad=False)[0][0]
    assert not torch.equal(unpadded > 0, reference[0][0] > 0)


def test_images_already_at_their_test_size_give_the_same_result():
    """The evaluator feeds dataset-resized images: infer must not resize them again."""
    model = _model()
    images = _images(ODD_SIZES[:2], seed=2)
    direct = infer(model, images, ODD_SIZES[:2], TEST_CFG, ("semantic",))
    cfg = get_config("eomt-ade20k-150-dinov2-l-512")
    cfg.data.min_size_test = SIZE
    augment = build_augmentation(cfg.data, False, 255)
    pre = []
    for im in images:
        arr, _ = augment(im.permute(1, 2, 0).numpy(), np.zeros(im.shape[-2:], np.uint8), None)
        assert arr.shape[:2] == resized_test_size(cfg.data, *im.shape[-2:]) == eomt_test_size(*im.shape[-2:], SIZE,
                                                                                                 "semantic")
        pre.append(torch.from_numpy(np.array(arr)).permute(2, 0, 1))
    again = infer(model, pre, ODD_SIZES[:2], TEST_CFG, ("semantic",))
    for a, b in zip(direct, again):
        assert torch.equal(a["semantic"], b["semantic"])


def test_predict_end_to_end_writes_official_results(tmp_path):
    model = _model()
    cfg = get_config("eomt-coco-panoptic-dinov2-s-640")
    cfg.data.min_size_test = cfg.data.max_size_test = SIZE
    cfg.test.object_mask_threshold, cfg.test.overlap_threshold = TEST_CFG.object_mask_threshold, 0.5
    meta = SimpleNamespace(num_classes=5, thing_classes=list(THINGS), isthing=[1, 1, 0, 0, 1],
                           dataset_ids=[1, 2, 3, 4, 5], class_names=list("abcde"), colors=[(9, 9, 9)] * 5)
    images = _images([(70, 45), (33, 90)], seed=3)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"im{i}.png")
    predictor = Predictor(model, cfg, meta, batch_size=2)
    written = predictor.predict_files([tmp_path], tmp_path / "out", ("semantic", "panoptic"))
    assert {p.name for p in written} >= {"im0_sem.png", "im1_sem.png", "im0_panoptic.png", "panoptic.json"}
    sem = np.asarray(Image.open(tmp_path / "out" / "im1_sem.png"))
    assert np.array_equal(sem, official_semantic(model, images[1:])[0].numpy())
    results = predictor.predict(images, ("panoptic",))
    ref = official_panoptic_logits(model, images)
    for r, (logits, cls) in zip(results, ref):
        sem_ref, _ = official_panoptic(logits, cls, 0.5, 0.5)
        ids, info = r["panoptic"]
        category = {s["id"]: s["category_id"] for s in info}
        assert torch.equal(torch.tensor([category.get(int(i), -1) for i in ids.flatten()]).view(ids.shape), sem_ref)


def test_window_op_reports_bad_input():
    q, c = torch.zeros(1, 3, 4), torch.zeros(1, 3, 8)
    pix = torch.zeros(1, 8, 16, 16)
    with pytest.raises(ValueError, match="outside"):
        window_semantic_inference(q, c, pix, [(0, 10, 0)], [(64, 64)], [(64, 64)], 64)
    with pytest.raises(ValueError, match="uncovered"):
        window_semantic_inference(q, c, pix, [(0, 0, 0)], [(64, 100)], [(64, 100)], 64)
    with pytest.raises(ValueError, match="one prediction per window"):
        window_semantic_inference(q, c, pix, [(0, 0, 0), (0, 0, 36)], [(64, 100)], [(64, 100)], 64)
    with pytest.raises(ValueError, match="shorter image side"):
        semantic_windows((70, 100), 64)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_confident_pixels_rule_is_the_official_one(impl):
    """ops.panoptic_inference(confident_pixels=True), fused or not, against the official
    ``to_per_pixel_preds_panoptic`` on the panoptic kernel test's inputs (every rule exercised)."""
    from test_kernel_panoptic import THING_CLASSES, panoptic_inputs
    from fastmaskformer import ops
    from fastmaskformer.ops.inference import resized_mask_logits_reference

    torch.manual_seed(0)
    class_logits, mask_embed, pixel_embed = panoptic_inputs(2, 16, 9, 11)
    image_sizes, output_sizes = [(33, 41), (36, 44)], [(50, 61), (21, 17)]
    got = ops.panoptic_inference(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, 0.8, 0.8,
                                 THING_CLASSES, confident_pixels=True, impl=impl)
    maskformer_rule = ops.panoptic_inference(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, 0.8,
                                             0.8, THING_CLASSES, impl=impl)
    voids = 0
    for b, (ids, info) in enumerate(got):
        logits = resized_mask_logits_reference(mask_embed[b], pixel_embed[b], image_sizes[b], output_sizes[b])
        sem, seg = official_panoptic(logits, class_logits[b], 0.8, 0.8, set(THING_CLASSES))
        category = {s["id"]: s["category_id"] for s in info}
        assert torch.equal(torch.tensor([category.get(int(i), -1) for i in ids.flatten()]).view(ids.shape), sem)
        pairs = torch.unique(torch.stack([seg.flatten(), ids.flatten().long()]), dim=1)
        assert pairs.shape[1] == len(torch.unique(seg)) == len(torch.unique(ids))
        voids += int(((ids == 0) & (maskformer_rule[b][0] != 0)).sum())
    assert voids > 0  # the rule voids pixels MaskFormer's rule assigns


# ----------------------------------------------------------------------------- data pipelines
@pytest.mark.parametrize("name,scales,jitter", [
    ("eomt-coco-panoptic-dinov2-l-640", (0.1, 2.0), False), ("eomt-coco-instance-dinov2-l-1280", (0.1, 2.0), False),
    ("eomt-ade20k-150-dinov2-l-512", (0.5, 2.0), True), ("eomt-cityscapes-dinov2-l-1024", (0.5, 2.0), True),
    ("eomt-ade20k-panoptic-dinov2-l-640", (0.1, 2.0), True)])
def test_presets_use_the_official_training_pipeline(name, scales, jitter):
    """datasets/<dataset>.py defaults: every dataset the same Transforms (colour jitter, flip,
    ScaleJitter to the square size, black padding, RandomCrop); scale range and jitter per dataset."""
    data = get_config(name).data
    size = data.crop_size[0]
    augment = build_augmentation(data, True, 255)
    names = [type(t).__name__ for t in augment.transforms]
    assert names == (["ColorJitterEoMT"] if jitter else []) + ["RandomFlip", "ResizeScale", "FixedSizeCrop"]
    resize, crop = augment.transforms[-2], augment.transforms[-1]
    assert (resize.min_scale, resize.max_scale, resize.target) == (*scales, (size, size))
    assert crop.crop_size == (size, size) and crop.pad.image_value == 0 and crop.pad.seg_value == 255
    assert data.test_resize == "eomt" and data.min_size_test == size
    rng = np.random.default_rng(0)
    image, seg = augment(np.full((30, 50, 3), 200, np.uint8), np.ones((30, 50), np.int64), rng)
    assert image.shape == (size, size, 3) and seg.shape == (size, size)
    assert (image[seg == 255] == 0).all() and (image[seg == 1] > 0).all()  # padding: black, ignored


def test_eomt_colour_jitter_is_torchvision_s():
    """Each step of ColorJitterEoMT against the torchvision function the official code calls
    (within one level where float32 rounding of the blend differs, two for the hue)."""
    import torchvision.transforms.v2.functional as TF
    from fastmaskformer.data import transforms as T

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    tv = torch.from_numpy(image).permute(2, 0, 1)
    back = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    assert np.array_equal(T._blend(image, np.float32(0), 1.1), back(TF.adjust_brightness(tv, 1.1)))
    contrast = T._blend(image, T._grey(image).mean(dtype=np.float32), 0.7)
    assert np.abs(contrast.astype(int) - back(TF.adjust_contrast(tv, 0.7)).astype(int)).max() <= 1
    saturation = T._blend(image, T._grey(image)[..., None], 1.3)
    assert np.abs(saturation.astype(int) - back(TF.adjust_saturation(tv, 1.3)).astype(int)).max() <= 1
    hue = T.shift_hue(image, 0.04 * 360)
    assert np.abs(hue.astype(int) - back(TF.adjust_hue(tv, 0.04)).astype(int)).max() <= 2
    jittered, _ = T.ColorJitterEoMT()(image, None, np.random.default_rng(3))
    assert jittered.dtype == np.uint8 and jittered.shape == image.shape and not np.array_equal(jittered, image)


def test_evaluator_runs_eomt_panoptic_and_semantic_as_predict(tmp_path):
    """evaluate_dataset (also the in-training evaluation) on EoMT: panoptic is evaluated (an
    EoMT is a mask-classification model), through the official inference of infer."""
    from engine_tiny import make_data
    from fastmaskformer.config import Config
    from fastmaskformer.data import build_dataset
    from fastmaskformer.engine.evaluator import evaluate_dataset

    make_data(tmp_path)
    model = _model()
    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.task = "synthetic-panoptic", str(tmp_path), "panoptic"
    cfg.data.min_size_test, cfg.data.test_resize, cfg.data.num_workers = SIZE, "eomt", 0
    cfg.test.semantic_on = cfg.test.panoptic_on = True
    dataset = build_dataset(cfg.data, "val", train=False)
    num_classes = dataset.metadata.num_classes
    torch.manual_seed(0)
    model.class_head = torch.nn.Linear(model.class_head.in_features, num_classes + 1)
    model.num_classes = num_classes
    out = evaluate_dataset(model, dataset, cfg, progress=False, batch_size=2)
    assert set(out) == {"sem_seg", "panoptic"} and 0 <= out["panoptic"]["PQ"] <= 100
    assert out["panoptic"]["PQ"] > 0 or out["sem_seg"]["mIoU"] > 0  # predictions reached the metrics
