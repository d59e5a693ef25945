"""Image loading for prediction (any PIL mode -> uint8 RGB), the file helpers, and the inputs
prediction feeds the model (the evaluation's resize)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastmaskformer.engine.predictor import Predictor, colorize, find_images, ids_to_rgb, load_image, overlay, resize_image


def test_load_image_modes(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((2, 3), 7, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    gray = np.array([[0, 128, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")

    assert torch.equal(load_image(tmp_path / "rgb.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(load_image(tmp_path / "rgba.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    g = load_image(tmp_path / "gray.png")
    assert g.shape == (3, 1, 3) and g[:, 0].tolist() == [[0, 128, 255]] * 3
    d = load_image(tmp_path / "deep.png")
    assert d.dtype == torch.uint8 and d[0, 0].tolist() == [0, 100, 255]
    p = load_image(tmp_path / "palette.png")
    assert p.shape == (3, 2, 3) and p.dtype == torch.uint8
    assert load_image(tmp_path / "cmyk.jpg").shape == (3, 2, 3)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (3, 20, 10)


def test_find_images_and_helpers(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    (tmp_path / "c.txt").write_text("x")
    assert [p.name for p in find_images([tmp_path, tmp_path / "a.png"])] == ["a.png", "b.JPG"]
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images([tmp_path / "missing"])
    ids = np.array([[0, 1, 256 + 2, 65536 * 3]])
    rgb = ids_to_rgb(ids).astype(np.int64)
    assert (rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]).tolist() == ids.tolist()
    colours = colorize(np.array([[0, 1, 5]]), [(255, 0, 0), (0, 255, 0)])
    assert colours.tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 0]]]
    blended = overlay(np.zeros((1, 3, 3), np.uint8), colours, alpha=0.5, mask=np.array([[True, True, False]]))
    assert blended.tolist() == [[[128, 0, 0], [0, 128, 0], [0, 0, 0]]]


def test_predict_and_eval_feed_the_model_identical_inputs(tmp_path):
    # one resize path (PIL bilinear, antialiased when shrinking, as detectron2): single scale
    # and every multi-scale + flip view
    from engine_tiny import make_data, tiny_config

    from fastmaskformer import build_model
    from fastmaskformer.data import build_dataset
    from fastmaskformer.engine.evaluator import evaluate_dataset

    make_data(tmp_path, num_train=1, num_val=1)
    cfg = tiny_config(tmp_path)
    cfg.data.min_size_test = 40  # 64 px images shrink: where antialiasing matters
    model = build_model(cfg.model).eval()
    seen = []
    preprocess = model.preprocess

    def recording_preprocess(images):
        seen.extend(im.clone() for im in images)
        return preprocess(images)

    model.preprocess = recording_preprocess
    dataset = build_dataset(cfg.data, "val", train=False)
    images = [load_image(path) for path, _ in dataset.pairs]
    for scales, flip in (((), False), ((36, 56), True)):
        cfg.test.aug_scales, cfg.test.aug_flip = scales, flip
        seen.clear()
        evaluate_dataset(model, dataset, cfg, progress=False)
        from_eval = list(seen)
        seen.clear()
        Predictor(model, cfg, dataset.metadata, batch_size=1).predict(images)
        assert len(seen) == len(from_eval) == len(images) * (4 if flip else 1)
        for a, b in zip(seen, from_eval):
            assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert [tuple(im.shape[1:]) for im in seen[:4]] == [(36, 36), (36, 36), (56, 56), (56, 56)]


def test_resize_image_needs_uint8():
    with pytest.raises(TypeError, match=r"uint8 \[3, H, W\]"):
        resize_image(torch.zeros(3, 4, 4), (2, 2))


def _by_hand_scores(class_logits, mask_embed, pixel_embed, input_size, image_size, output_size):
    """The official post-processing written out: logits upsampled to the model input size,
    class-weighted mask probabilities, padding cropped, bilinear resize: scores [K, H, W]."""
    import torch.nn.functional as F

    logits = F.interpolate(torch.einsum("qc,chw->qhw", mask_embed, pixel_embed)[None], size=input_size,
                           mode="bilinear", align_corners=False)[0]
    scores = torch.einsum("qk,qhw->khw", class_logits.softmax(-1)[:, :-1], logits.sigmoid())
    scores = scores[:, : image_size[0], : image_size[1]]
    return F.interpolate(scores[None], size=output_size, mode="bilinear", align_corners=False)[0]


def _assert_labels(labels, scores):
    """labels equal argmax(scores) wherever the top two scores are not within float noise."""
    top2 = scores.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(labels[clear], scores.argmax(0)[clear])


def test_unpadded_inputs_are_upsampled_to_the_true_input_size():
    # size_divisibility 0 (official COCO panoptic): a 61 x 90 batch gives a 16 x 23 embedding,
    # 4 x 16 != 61: every task upsamples to 61 x 90, crops, resizes (not to 64 x 92)
    from types import SimpleNamespace

    from fastmaskformer import MaskFormerOutput, build_model, ops
    from fastmaskformer.config import ModelConfig
    from fastmaskformer.engine.predictor import infer, semantic_tta

    cfg = ModelConfig(num_classes=5, num_queries=6, hidden_dim=16, mask_dim=16, conv_dim=32, nheads=2,
                      dim_feedforward=32, dec_layers=2, size_divisibility=0)
    cfg.backbone.kwargs = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
    model = build_model(cfg).eval()
    forward = model.forward

    def varied_forward(batch):  # the real model's shapes, spatially varied values (seeded by shape)
        g = torch.Generator().manual_seed(batch.shape[-1])
        return MaskFormerOutput(*(3 * torch.randn(t.shape, generator=g) for t in forward(batch).as_tuple()))

    model.forward = varied_forward
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 61, 90), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 61, 90), generator=g, dtype=torch.uint8)]  # one batch: one size
    output_sizes = [(122, 181), (45, 63)]
    test_cfg = SimpleNamespace(object_mask_threshold=0.0, overlap_threshold=0.0, aug_scales=(), aug_flip=True,
                               aug_max_size=4000)
    results = infer(model, images, output_sizes, test_cfg, ("semantic", "panoptic", "instance"))
    with torch.no_grad():
        batch, sizes = model.preprocess(images)
        out = model(batch)
    assert batch.shape[-2:] == (61, 90) and out.pixel_embed.shape[-2:] == (16, 23)
    cls, emb, pix = out.class_logits[-1], out.mask_embed[-1], out.pixel_embed
    for b in range(2):
        scores = _by_hand_scores(cls[b], emb[b], pix[b], (61, 90), sizes[b], output_sizes[b])
        _assert_labels(results[b]["semantic"], scores)
        stale = _by_hand_scores(cls[b], emb[b], pix[b], (64, 92), sizes[b], output_sizes[b])
        assert not torch.equal(results[b]["semantic"], stale.argmax(0))  # (4h, 4w) would differ
    args = (cls, emb, pix, sizes, output_sizes)
    panoptic = ops.panoptic_inference(*args, object_mask_threshold=0.0, overlap_threshold=0.0, input_size=(61, 90))
    instance = ops.instance_inference(*args, input_size=(61, 90))
    for b in range(2):
        assert torch.equal(results[b]["panoptic"][0], panoptic[b][0]) and results[b]["panoptic"][1] == panoptic[b][1]
        assert results[b]["panoptic"][1] and torch.equal(results[b]["instance"]["masks"], instance[b]["masks"])
    # test-time augmentation (the image and its flip): each view at its own input size
    labels = semantic_tta(model, images[0], (122, 181), test_cfg)
    with torch.no_grad():
        views = [model(model.preprocess([im])[0]) for im in (images[0], images[0].flip(-1))]
    scores = sum(_by_hand_scores(v.class_logits[-1, 0], v.mask_embed[-1, 0], v.pixel_embed[0], (61, 90), (61, 90),
                                 (122, 181)).flip(-1) if flip else
                 _by_hand_scores(v.class_logits[-1, 0], v.mask_embed[-1, 0], v.pixel_embed[0], (61, 90), (61, 90),
                                 (122, 181)) for v, flip in zip(views, (False, True))) / 2
    _assert_labels(labels, scores)


def test_semantic_tta_flips_the_flipped_views_and_their_scores_back():
    # A model whose outputs depend on the image pixels and a left-right asymmetric image: a TTA
    # that does not flip the flipped view's input, or does not flip its scores back, differs.
    from types import SimpleNamespace

    import torch.nn.functional as F

    from fastmaskformer import MaskFormerOutput, build_model
    from fastmaskformer.config import ModelConfig
    from fastmaskformer.engine.predictor import semantic_tta

    cfg = ModelConfig(num_classes=5, num_queries=6, hidden_dim=16, mask_dim=16, conv_dim=32, nheads=2,
                      dim_feedforward=32, dec_layers=2, size_divisibility=0)
    cfg.backbone.kwargs = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
    model = build_model(cfg).eval()
    forward = model.forward
    g = torch.Generator().manual_seed(0)
    project = torch.randn(16, 3, generator=g)  # image colour -> embedding channels

    def content_forward(batch):  # the real model's shapes; pixel embedding = f(image pixels)
        out = forward(batch)
        gen = torch.Generator().manual_seed(1)
        cls, emb = (3 * torch.randn(t.shape, generator=gen) for t in (out.class_logits, out.mask_embed))
        pooled = F.adaptive_avg_pool2d(batch, out.pixel_embed.shape[-2:])  # [B, 3, h, w]
        pix = torch.einsum("dc,bchw->bdhw", project, pooled)
        return MaskFormerOutput(cls, emb, pix, *out.as_tuple()[3:])

    model.forward = content_forward
    image = torch.randint(0, 256, (3, 48, 72), generator=g, dtype=torch.uint8)
    image[:, :, :24] //= 4  # dark left third: not left-right symmetric
    assert not torch.equal(image, image.flip(-1))
    test_cfg = SimpleNamespace(aug_scales=(), aug_flip=True, aug_max_size=4000)
    labels = semantic_tta(model, image, (61, 90), test_cfg)

    def scores(im):
        with torch.no_grad():
            v = model(model.preprocess([im])[0])
        return _by_hand_scores(v.class_logits[-1, 0], v.mask_embed[-1, 0], v.pixel_embed[0], (48, 72), (48, 72),
                               (61, 90))

    plain, flipped = scores(image), scores(image.flip(-1))
    expected = (plain + flipped.flip(-1)) / 2
    _assert_labels(labels, expected)
    for wrong in ((plain + plain.flip(-1)) / 2, (plain + flipped) / 2):  # view not flipped / not flipped back
        assert (wrong.argmax(0) != expected.argmax(0)).float().mean() > 0.05


def test_predictions_do_not_depend_on_batch_mates(tmp_path, coco_sample):
    """Real photos and odd sizes, predicted in batches of 4 and one at a time: equal results for
    every task (a batch padded to its largest image changed 8-20% of the semantic pixels of real
    photos)."""
    from engine_tiny import tiny_config

    from fastmaskformer import build_model
    from fastmaskformer.data.metadata import Metadata
    from fastmaskformer.engine.predictor import same_padding_groups

    cfg = tiny_config(tmp_path)
    cfg.test.object_mask_threshold = 0.0  # panoptic keeps segments of an untrained model
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    k = cfg.model.num_classes
    metadata = Metadata("tiny", tuple(map(str, range(k))), tuple(range(k)), (True, False) * (k // 2),
                        ((0, 0, 0),) * k, 255)
    g = torch.Generator().manual_seed(0)
    images = [load_image(p) for p in sorted((coco_sample / "input_images").glob("*.jpg"))]
    images += [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
               for h, w in ((37, 53), (50, 61), (129, 65), (60, 64), (41, 90))]
    tasks = ("semantic", "panoptic", "instance")
    alone = Predictor(model, cfg, metadata, batch_size=1).predict(images, tasks)
    batched = Predictor(model, cfg, metadata, batch_size=4).predict(images, tasks)
    def changed(a, b):  # fraction of pixels that differ
        return (a != b).float().mean().item()

    for one, many in zip(alone, batched):
        # same padded size batched together: only float summation order differs (a batch of 2
        # may take another convolution algorithm), which flips pixels at a tie of the top two
        # scores or a mask probability of 0.5 (measured: at most 1.3e-6 of the mask pixels)
        assert changed(one["semantic"], many["semantic"]) <= 1e-4
        assert changed(one["panoptic"][0], many["panoptic"][0]) <= 1e-4
        assert [s["category_id"] for s in one["panoptic"][1]] == [s["category_id"] for s in many["panoptic"][1]]
        assert torch.equal(one["instance"]["labels"], many["instance"]["labels"])
        assert changed(one["instance"]["masks"], many["instance"]["masks"]) <= 1e-4
        torch.testing.assert_close(one["instance"]["scores"], many["instance"]["scores"], atol=1e-5, rtol=0)
    assert same_padding_groups([(50, 61), (60, 64), (37, 70), (64, 64)], 32) == [[0, 1, 3], [2]]
    assert same_padding_groups([(50, 61), (60, 64)], 0) == [[0], [1]]


def test_infer_runs_each_padded_size_as_its_own_batch(tmp_path):
    """infer itself (what eval --batch-size calls) splits a mixed batch by padded size and keeps
    the order: each result is the image's result alone."""
    from engine_tiny import tiny_config

    from fastmaskformer import build_model
    from fastmaskformer.engine.predictor import infer

    cfg = tiny_config(tmp_path)
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((64, 90), (64, 120),
                                                                                           (64, 70), (50, 64))]
    sizes = [(130, 181), (64, 120), (33, 35), (50, 64)]
    seen = []
    preprocess = model.preprocess

    def recording_preprocess(batch):
        seen.append([tuple(im.shape[-2:]) for im in batch])
        return preprocess(batch)

    model.preprocess = recording_preprocess
    mixed = infer(model, images, sizes, cfg.test, ("semantic",))
    assert seen == [[(64, 90), (64, 70)], [(64, 120)], [(50, 64)]]  # pad to 64x96, 64x128, 64x64
    for image, size, result in zip(images, sizes, mixed):
        alone = infer(model, [image], [size], cfg.test, ("semantic",))[0]
        assert (alone["semantic"] != result["semantic"]).float().mean() <= 1e-4
