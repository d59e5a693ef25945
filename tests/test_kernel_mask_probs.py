"""Mask logits / probabilities kernels (kernels/mask_probs.py) vs the plain-PyTorch reference:
``ops.mask_logits``, ``ops.mask_probs`` and instance inference (composed resampling)."""
import pytest
import torch

from fastmaskformer import ops
from fastmaskformer.ops.inference import resized_mask_logits_reference
from fastmaskformer.ops.mask_logits import resampled_masks


def embeddings(batch=2, queries=13, channels=24, h=7, w=9, dtype=torch.float32):
    mask_embed = torch.randn(batch, queries, channels) / channels ** 0.5 * 3
    return mask_embed.to(dtype), torch.randn(batch, channels, h, w).to(dtype)


@pytest.mark.parametrize("out_size", [None, (7, 9), (28, 36), (19, 50), (4, 5)])
def test_mask_logits_matches_reference(out_size):
    mask_embed, pixel_embed = embeddings()
    got = ops.mask_logits(mask_embed, pixel_embed, out_size, impl="triton")
    ref = ops.mask_logits(mask_embed, pixel_embed, out_size, impl="torch")
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_mask_logits_bf16_non_contiguous_and_many_queries():
    mask_embed, pixel_embed = embeddings(queries=150, dtype=torch.bfloat16)
    pixel_embed = pixel_embed.transpose(-1, -2).contiguous().transpose(-1, -2)
    mask_embed = mask_embed.transpose(1, 2).contiguous().transpose(1, 2)
    for out_size in (None, (30, 31)):
        got = ops.mask_logits(mask_embed, pixel_embed, out_size, impl="triton")
        torch.testing.assert_close(got, ops.mask_logits(mask_embed, pixel_embed, out_size, impl="torch"),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("image_size,output_size,input_size", [
    ((27, 33), (41, 50), None), ((25, 36), (13, 10), None), ((28, 36), (28, 36), None),
    ((27, 35), (27, 35), (27, 35)), ((20, 30), (33, 17), (27, 35))])  # unpadded 27 x 35 input
def test_resized_mask_logits_matches_reference(image_size, output_size, input_size):
    mask_embed, pixel_embed = embeddings(batch=1)
    size = input_size or (4 * pixel_embed.shape[-2], 4 * pixel_embed.shape[-1])
    got = resampled_masks(mask_embed, pixel_embed, image_size, output_size, size, False, torch.float32, "triton")[0]
    ref = resized_mask_logits_reference(mask_embed[0], pixel_embed[0], image_size, output_size, input_size)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sized", [False, True])
def test_mask_probs_gradients_match_reference(sized):
    """The Triton operator's autograd (the reference's vjp) against autograd of the reference."""
    grads, inputs = {}, embeddings(batch=2)
    for impl in ("triton", "torch"):
        mask_embed, pixel_embed = (t.clone().requires_grad_() for t in inputs)
        sizes = dict(image_sizes=[(25, 33), (28, 30)], output_sizes=[(41, 50), (13, 17)]) if sized else {}
        probs = ops.mask_probs(mask_embed, pixel_embed, impl=impl, **sizes)
        weights = torch.Generator().manual_seed(0)
        loss = sum((p * torch.rand(p.shape, generator=weights)).sum() for p in probs)
        loss.backward()
        grads[impl] = (mask_embed.grad, pixel_embed.grad)
    for got, ref in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_mask_probs_matches_reference(out_dtype):
    mask_embed, pixel_embed = embeddings()
    tol = dict(rtol=1e-4, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)
    got = ops.mask_probs(mask_embed, pixel_embed, out_dtype=out_dtype, impl="triton")
    ref = ops.mask_probs(mask_embed, pixel_embed, out_dtype=out_dtype, impl="torch")
    assert got.dtype == out_dtype and got.shape == (2, 13, 7, 9)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    for kwargs in (dict(image_sizes=[(27, 33), (25, 36)], output_sizes=[(41, 50), (13, 10)]),
                   dict(image_sizes=[(27, 33), (25, 36)]), dict(output_sizes=[(20, 20), (40, 41)])):
        got = ops.mask_probs(mask_embed, pixel_embed, out_dtype=out_dtype, impl="triton", **kwargs)
        ref = ops.mask_probs(mask_embed, pixel_embed, out_dtype=out_dtype, impl="torch", **kwargs)
        assert len(got) == 2
        for g, r in zip(got, ref):
            assert g.dtype == out_dtype and g.shape == r.shape
            torch.testing.assert_close(g.float(), r.float(), **tol)


def test_mask_probs_bad_arguments():
    mask_embed, pixel_embed = embeddings()
    with pytest.raises(TypeError, match="out_dtype"):
        ops.mask_probs(mask_embed, pixel_embed, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="image_sizes"):
        ops.mask_probs(mask_embed, pixel_embed, image_sizes=[(29, 36), (28, 36)])
    with pytest.raises(ValueError, match="need 2"):
        ops.mask_probs(mask_embed, pixel_embed, output_sizes=[(10, 10)])


def test_instance_inference_matches_reference():
    mask_embed, pixel_embed = embeddings()
    class_logits = torch.randn(2, 13, 20) * 3
    args = (class_logits, mask_embed, pixel_embed, [(27, 33), (25, 36)], [(41, 50), (13, 10)])
    for got, ref in zip(ops.instance_inference(*args, impl="triton"), ops.instance_inference(*args, impl="torch")):
        assert torch.equal(got["labels"], ref["labels"])
        # A logit within fp32 rounding of 0 may flip its mask bit: allow a stray pixel.
        assert got["masks"].shape == ref["masks"].shape
        assert (got["masks"] == ref["masks"]).float().mean() > 0.9999
        torch.testing.assert_close(got["scores"], ref["scores"], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_mask_probs_gpu_large():
    torch.manual_seed(0)
    mask_embed, pixel_embed = (t.cuda() for t in embeddings(batch=2, queries=100, channels=256, h=128, w=176))
    for out_dtype in (torch.float32, torch.bfloat16):
        kwargs = dict(image_sizes=[(512, 683), (500, 700)], output_sizes=[(512, 683), (1024, 1400)],
                      out_dtype=out_dtype)
        got = ops.mask_probs(mask_embed, pixel_embed, impl="triton", **kwargs)
        ref = ops.mask_probs(mask_embed, pixel_embed, impl="torch", **kwargs)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.float(), r.float(), rtol=1e-2, atol=4e-3)
    got = ops.mask_logits(mask_embed, pixel_embed, (512, 704), impl="triton")
    torch.testing.assert_close(got, ops.mask_logits(mask_embed, pixel_embed, (512, 704), impl="torch"),
                               rtol=1e-4, atol=1e-4)
