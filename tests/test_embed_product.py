"""ops.mask_logits.embed_product: the losses' reference logit maps from bf16 operands in fp32,
with the operands (not fp32 copies of the pixel features) saved for the backward."""
import pytest
import torch

from fastmaskformer.ops.mask_logits import embed_product
from fastmaskformer.ops.point_loss import point_mask_loss


def _operands(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_(True)
    pixels = torch.randn(2, 24, 9, 13, generator=g).to(dtype).requires_grad_(True)
    return embed, pixels


def _saved(fn):
    """(dtype, numel) of every tensor autograd saves while fn runs."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_and_gradients_equal_the_einsum_of_upcasts(dtype):
    embed, pixels = _operands(dtype)
    out = embed_product(embed, pixels)
    ref_embed, ref_pixels = (t.detach().clone().requires_grad_(True) for t in (embed, pixels))
    ref = torch.einsum("bmc,bchw->bmhw", ref_embed.float(), ref_pixels.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert embed.grad.dtype == dtype and pixels.grad.dtype == dtype
    torch.testing.assert_close(embed.grad, ref_embed.grad)
    torch.testing.assert_close(pixels.grad, ref_pixels.grad)


def test_no_fp32_copy_of_the_operands_is_saved():
    embed, pixels = _operands(torch.bfloat16)
    _, saved = _saved(lambda: embed_product(embed, pixels))
    assert saved and all(dtype == torch.bfloat16 for dtype, _ in saved), saved
    _, reference = _saved(lambda: torch.einsum("bmc,bchw->bmhw", embed.float(), pixels.float()))
    assert (torch.float32, pixels.numel()) in reference  # what the plain upcast keeps


def test_fp32_operands_take_the_plain_product():
    embed, pixels = _operands(torch.float32)
    out = embed_product(embed, pixels)
    assert out.grad_fn is not None and "Function" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, torch.einsum("bmc,bchw->bmhw", embed, pixels), rtol=0, atol=0)


def test_point_loss_reference_keeps_no_fp32_pixel_copy():
    """The point-sampled loss on bf16 features: the fp32 values of the upcast inputs, and no
    saved fp32 tensor the size of the pixel features."""
    g = torch.Generator().manual_seed(3)
    mask_embed = torch.randn(2, 2, 6, 24, generator=g).bfloat16().requires_grad_(True)
    pixel_embed = torch.randn(2, 24, 16, 16, generator=g).bfloat16().requires_grad_(True)
    seg = torch.randint(-1, 3, (2, 64, 64), generator=g, dtype=torch.int32)
    assignment = torch.tensor([[[0, 2, -1], [1, 4, 5]], [[3, -1, 0], [2, 1, 0]]])
    cand = torch.rand(2, 2, 3, 30, 2, generator=g)
    extra = torch.rand(2, 2, 3, 10, 2, generator=g)
    args = (assignment, seg, torch.tensor(5.0), cand, extra, 20)
    (bce, dice), saved = _saved(lambda: point_mask_loss(mask_embed, pixel_embed, *args, impl="torch"))
    assert (torch.float32, pixel_embed.numel()) not in saved
    ref_bce, ref_dice = point_mask_loss(mask_embed.float(), pixel_embed.float(), *args, impl="torch")
    torch.testing.assert_close(bce, ref_bce, rtol=0, atol=0)
    torch.testing.assert_close(dice, ref_dice, rtol=0, atol=0)
    (bce.sum() + dice.sum()).backward()
    assert pixel_embed.grad.dtype == torch.bfloat16 and pixel_embed.grad.abs().sum() > 0
