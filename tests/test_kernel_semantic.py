"""Fused semantic inference (kernels/semantic.py) vs the plain-PyTorch reference.

Labels must equal the reference's wherever the reference's top-2 score margin exceeds the
precision's tolerance (elsewhere summation order or tf32 rounding may legitimately flip the
argmax); the agreement is printed. CPU runs go through the Triton interpreter (tests/conftest.py;
the kernels model tf32 rounding explicitly there): small sizes, one big block.
"""
import pytest
import torch

from fastmaskformer import ops
from fastmaskformer.ops.inference import semantic_scores_reference

# precision -> (relative score tolerance, label margin relative to the top score). tf32 operands
# keep 10 mantissa bits (truncation: up to 2^-10 relative per operand, 2 operands per product).
# bf16 operands keep 8 bits (round to nearest).
TOLERANCE = {"ieee": (1e-4, 1e-5), "tf32x3": (1e-4, 1e-5), "tf32": (4e-3, 4e-3), "bf16": (1.5e-2, 2e-2)}


def reference_top2(scores):
    """scores [K,H,W] -> (labels [H,W], top score [H,W], top-2 margin [H,W] (inf when K = 1))."""
    if scores.shape[0] == 1:
        return scores.argmax(0), scores[0], torch.full_like(scores[0], float("inf"))
    top = scores.topk(2, dim=0).values
    return scores.argmax(0), top[0], top[0] - top[1]


def assert_labels_agree(labels, ref_labels, margin, tag="", relative=1e-5, top=None):
    """100% agreement on pixels whose reference margin exceeds ``relative`` (times the top
    score when given); prints the agreement."""
    decided = margin > relative * (1.0 if top is None else top.abs())
    agree = (labels == ref_labels)[decided].float().mean().item() * 100 if decided.any() else 100.0
    overall = (labels == ref_labels).float().mean().item() * 100
    print(f"[semantic{tag}] agreement {agree:.3f}% on {int(decided.sum())} decided pixels "
          f"({overall:.3f}% of all {labels.numel()})")
    assert labels.shape == ref_labels.shape and labels.dtype == torch.int64
    assert agree == 100.0


def random_inputs(batch, queries, classes, channels, h, w, dtype=torch.float32):
    class_logits = torch.randn(batch, queries, classes + 1) * 3
    mask_embed = torch.randn(batch, queries, channels) / channels ** 0.5 * 3
    pixel_embed = torch.randn(batch, channels, h, w)
    return class_logits.to(dtype), mask_embed.to(dtype), pixel_embed.to(dtype)


def check_semantic(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, tag="",
                   precision="ieee", input_size=None):
    out = ops.semantic_inference(class_logits, mask_embed, pixel_embed, image_sizes, output_sizes,
                                 return_score=True, input_size=input_size, precision=precision, impl="triton")
    rtol, margin_tol = TOLERANCE[precision]
    for b, (labels, score) in enumerate(out):
        scores = semantic_scores_reference(class_logits[b], mask_embed[b], pixel_embed[b],
                                           image_sizes[b], output_sizes[b], input_size)
        ref_labels, ref_score, margin = reference_top2(scores)
        assert_labels_agree(labels, ref_labels, margin, f"{tag} {precision}", margin_tol, ref_score)
        torch.testing.assert_close(score, ref_score, rtol=rtol, atol=rtol * 0.1)


# Padded input 28 x 36 (h, w = 7, 9); originals not multiples of 32 (or 4); outputs larger and
# smaller than the image, and one equal to it (the reference skips that resize).
IMAGE_SIZES = [(27, 33), (25, 36)]
OUTPUT_SIZES = [(41, 50), (13, 10)]


@pytest.mark.parametrize("classes", [1, 19, 150, 847])
@pytest.mark.parametrize("queries", [1, 100])
def test_semantic_matches_reference(classes, queries):
    inputs = random_inputs(2, queries, classes, 16, 7, 9)
    check_semantic(*inputs, IMAGE_SIZES, OUTPUT_SIZES, tag=f" K={classes} Q={queries}")


@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "bf16"])
def test_semantic_precision_modes(precision):
    inputs = random_inputs(2, 100, 150, 16, 7, 9)
    check_semantic(*inputs, IMAGE_SIZES, OUTPUT_SIZES, precision=precision)


def test_semantic_default_precision_is_tf32():
    inputs = random_inputs(1, 30, 19, 16, 5, 6)
    default = ops.semantic_inference(*inputs, [(20, 24)], return_score=True, impl="triton")
    tf32 = ops.semantic_inference(*inputs, [(20, 24)], return_score=True, precision="tf32", impl="triton")
    assert torch.equal(default[0][1], tf32[0][1])
    with pytest.raises(ValueError, match="precision must be one of"):
        ops.semantic_inference(*inputs, [(20, 24)], precision="fp16", impl="triton")


def test_semantic_unpadded_input_size():
    # size_divisibility 0: a 27 x 35 input gives a 7 x 9 embedding (4h != 27): the logits are
    # upsampled to the true input size, not to (28, 36).
    inputs = random_inputs(2, 20, 19, 16, 7, 9)
    check_semantic(*inputs, [(27, 35), (25, 30)], [(27, 35), (40, 33)], input_size=(27, 35), tag=" input 27x35")
    with pytest.raises(ValueError, match="input_size"):
        ops.semantic_inference(*inputs, [(20, 24)] * 2, input_size=(6, 9), impl="triton")


def test_semantic_same_size_output_and_default_output_sizes():
    inputs = random_inputs(1, 10, 19, 8, 5, 6)
    check_semantic(*inputs, [(17, 21)], [(17, 21)])
    (labels,) = ops.semantic_inference(*inputs, [(17, 21)], impl="triton")
    (ref,) = ops.semantic_inference(*inputs, [(17, 21)], impl="torch")
    assert labels.shape == ref.shape == (17, 21)


def test_semantic_many_classes_tiny_image():
    inputs = random_inputs(1, 100, 4096, 8, 3, 4)
    check_semantic(*inputs, [(11, 13)], [(9, 14)], tag=" K=4096")


def test_semantic_more_queries_than_one_tile():
    # More than 128 queries take the chunked path (m rebuilt per class block in 32-query chunks).
    for queries in (200, 300):
        inputs = random_inputs(1, queries, 150, 8, 5, 6)
        check_semantic(*inputs, [(19, 23)], [(30, 26)], tag=f" Q={queries}")


def test_semantic_bf16_and_non_contiguous_inputs():
    class_logits, mask_embed, pixel_embed = random_inputs(2, 20, 19, 16, 6, 7, dtype=torch.bfloat16)
    pixel_embed = pixel_embed.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous h, w
    mask_embed = mask_embed.transpose(1, 2).contiguous().transpose(1, 2)  # stride(-1) != 1
    assert not pixel_embed.is_contiguous() and not mask_embed.is_contiguous()
    check_semantic(class_logits, mask_embed, pixel_embed, [(21, 28), (24, 25)], [(30, 31), (8, 9)],
                   tag=" bf16")


def tta_views(classes, queries=12, channels=8):
    """Three scales, each plain and flipped (the flipped view sees the mirrored input); the
    last scale's input is unpadded (input size 29 x 41 for an 8 x 11 embedding)."""
    views = []
    for h, w, image_size, input_size in [(4, 6, (14, 22), None), (6, 8, (21, 29), None),
                                         (8, 11, (29, 41), (29, 41))]:
        class_logits, mask_embed, pixel_embed = random_inputs(1, queries, classes, channels, h, w)
        for flipped in (False, True):
            views.append(dict(class_logits=class_logits[0], mask_embed=mask_embed[0], pixel_embed=pixel_embed[0],
                              image_size=image_size, input_size=input_size, flipped=flipped))
    return views


def tta_reference_scores(views, output_size):
    total = 0
    for v in views:
        s = semantic_scores_reference(v["class_logits"], v["mask_embed"], v["pixel_embed"],
                                      v["image_size"], output_size, v["input_size"])
        total = total + (s.flip(-1) if v["flipped"] else s)
    return total / len(views)


@pytest.mark.parametrize("classes", [19, 847])
@pytest.mark.parametrize("output_size", [(33, 47), (11, 9)])
def test_semantic_tta_matches_reference(classes, output_size):
    views = tta_views(classes)
    labels = ops.semantic_inference_tta(views, output_size, precision="ieee", impl="triton")
    ref_labels, top, margin = reference_top2(tta_reference_scores(views, output_size))
    assert torch.equal(ops.semantic_inference_tta(views, output_size, impl="torch"), ref_labels)
    assert_labels_agree(labels, ref_labels, margin, tag=f" TTA K={classes}")
    labels = ops.semantic_inference_tta(views, output_size, impl="triton")  # default tf32
    assert_labels_agree(labels, ref_labels, margin, f" TTA K={classes} tf32", TOLERANCE["tf32"][1], top)


def test_semantic_tta_rejects_mixed_class_counts():
    views = tta_views(19)[:1] + tta_views(20)[:1]
    with pytest.raises(ValueError, match="same number of classes"):
        ops.semantic_inference_tta(views, (10, 10), impl="triton")


# ---------------------------------------------------------------------------- GPU (H100)
@pytest.mark.gpu
@pytest.mark.parametrize("classes", [150, 847])
def test_semantic_gpu_ade_sizes(classes):
    torch.manual_seed(0)
    inputs = [t.cuda() for t in random_inputs(2, 100, classes, 256, 128, 176)]
    for precision in TOLERANCE:
        check_semantic(*inputs, [(512, 683), (497, 701)], [(512, 683), (1024, 1400)], tag=" GPU",
                       precision=precision)


@pytest.mark.gpu
def test_semantic_gpu_cityscapes_and_tta():
    torch.manual_seed(0)
    inputs = [t.cuda() for t in random_inputs(1, 100, 19, 256, 256, 512)]
    check_semantic(*inputs, [(1024, 2048)], [(1024, 2048)], tag=" GPU cityscapes")
    views = [{k: (t.cuda() if torch.is_tensor(t) else t) for k, t in v.items()}
             for v in tta_views(847, queries=100, channels=64)]
    labels = ops.semantic_inference_tta(views, (64, 90), impl="triton")
    ref_labels, top, margin = reference_top2(tta_reference_scores(views, (64, 90)))
    assert_labels_agree(labels, ref_labels, margin, " GPU TTA", TOLERANCE["tf32"][1], top)
