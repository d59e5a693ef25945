"""The workloads of the ahead-of-time check (``aot.py``): real launcher calls on CPU tensors of
the benchmark sizes (DESIGN 7). Only the arguments matter (the launches are recorded, not run),
so tensors are uninitialised where their values do not steer the launcher."""
from __future__ import annotations

import torch

from aot import Case
from fastmaskformer.kernels.semantic import SEMANTIC_PRECISIONS

# Training: B=16 images of 512x512, 6 decoder layers, Q=100, C=256 -> 128x128 embeddings.
B, LAYERS, Q, C, SIZE = 16, 6, 100, 256, 512
# Inference: 512x683 images padded to a 512x704 input -> 128x176 embeddings.
IMAGE, INPUT = (512, 683), (512, 704)


def _segment_maps(segments: int, size=(SIZE, SIZE), batch=B, cell: int = 16) -> torch.Tensor:
    """int32 [batch, *size] in [-1, segments): cell x cell blocks, every segment present."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(-1, segments, (batch, size[0] // cell, size[1] // cell), generator=g, dtype=torch.int32)
    coarse[:, 0, :segments] = torch.arange(segments, dtype=torch.int32)
    return coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def _labels(segments: int, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 10, (batch, segments)), torch.full((batch,), segments, dtype=torch.int64)


def _matching_cost(classes: int, segments: int, dtype, precision: str, batch: int = B):
    from fastmaskformer.kernels.matching_cost import matching_cost

    def run():
        class_logits = torch.empty(LAYERS * batch, Q, classes + 1)
        mask_embed = torch.empty(LAYERS * batch, Q, C, dtype=dtype)
        pixel_embed = torch.empty(batch, C, SIZE // 4, SIZE // 4, dtype=dtype)
        seg_small = _segment_maps(segments, (SIZE // 4, SIZE // 4), batch, cell=4)
        matching_cost(class_logits, mask_embed, pixel_embed, seg_small, *_labels(segments, batch), [1.0, 20.0, 1.0],
                      precision, LAYERS)
    return run


def _point_matching_cost(precision: str, segments: int = 32):
    """Mask2Former's matcher: 10 predictions, 2 images per GPU (the official batch 16 over 8),
    12544 points, Q=100, C=256."""
    from fastmaskformer.kernels.point_matching_cost import point_matching_sums

    def run():
        layers, batch, points = 10, 2, 12544
        point_matching_sums(torch.empty(layers, batch, Q, C), torch.empty(batch, C, SIZE // 4, SIZE // 4),
                            torch.empty(layers, batch, points, 2), torch.empty(layers, batch, segments, points),
                            precision)
    return run


def _mask_loss_bce(segments: int = 32):
    """Mask2Former's ``mask_sampling: full``: the BCE variant, 10 predictions, 2 images."""
    from fastmaskformer.kernels.mask_loss import mask_loss

    def run():
        layers, batch = 10, 2
        mask_embed = torch.zeros(layers, batch, Q, C, requires_grad=True)
        pixel_embed = torch.zeros(batch, C, SIZE // 4, SIZE // 4, requires_grad=True)
        assignment = torch.arange(segments).repeat(layers, batch, 1)
        seg_maps = _segment_maps(segments, batch=batch)
        bce, dice = mask_loss(mask_embed, pixel_embed, assignment, seg_maps, torch.tensor(float(batch * segments)),
                              "ieee", "bce")
        (bce.sum() + dice.sum()).backward()
    return run


def _point_loss(precision: str, segments: int = 32):
    """Mask2Former's point-sampled loss, forward and backward: 10 predictions, 2 images per GPU,
    M=32 matched masks, 12544 points (3 x 12544 candidates, 75% importance-sampled)."""
    from fastmaskformer.kernels.point_loss import point_mask_loss

    def run():
        layers, batch, points = 10, 2, 12544
        uncertain = int(0.75 * points)
        mask_embed = torch.zeros(layers, batch, Q, C, requires_grad=True)
        pixel_embed = torch.zeros(batch, C, SIZE // 4, SIZE // 4, requires_grad=True)
        assignment = torch.arange(segments).repeat(layers, batch, 1)
        seg_maps = _segment_maps(segments, batch=batch)
        candidates = torch.rand(layers, batch, segments, 3 * points, 2)
        extra = torch.rand(layers, batch, segments, points - uncertain, 2)
        bce, dice = point_mask_loss(mask_embed, pixel_embed, assignment, seg_maps,
                                    torch.tensor(float(batch * segments)), candidates, extra, uncertain, precision)
        (bce.sum() + dice.sum()).backward()
    return run


def _mask_loss(segments: int):
    """Forward and backward of all 6 layers' focal + dice, ``segments`` matches per image."""
    from fastmaskformer.kernels.mask_loss import mask_loss

    def run():
        mask_embed = torch.zeros(LAYERS, B, Q, C, requires_grad=True)
        pixel_embed = torch.zeros(B, C, SIZE // 4, SIZE // 4, requires_grad=True)
        assignment = torch.arange(segments).expand(LAYERS, B, segments).contiguous()
        focal, dice = mask_loss(mask_embed, pixel_embed, assignment, _segment_maps(segments),
                                torch.tensor(float(B * segments)))
        (focal.sum() + dice.sum()).backward()
    return run


def _inference_inputs(queries: int, classes: int, batch: int = B):
    h, w = INPUT[0] // 4, INPUT[1] // 4
    return torch.randn(batch, queries, classes + 1), torch.empty(batch, queries, C), torch.empty(batch, C, h, w)


def _semantic(queries: int, classes: int, resize: bool, precision: str):
    from fastmaskformer.kernels.semantic import semantic_inference

    out = (1024, 1366) if resize else IMAGE

    def run():
        semantic_inference(*_inference_inputs(queries, classes), list(IMAGE) * B, list(out) * B, list(INPUT), False,
                           precision)
    return run


def _semantic_tta(classes: int):
    """ADE20K TTA: short edges 256..896 step 128 (x1.0 of 512 crops), each plain and flipped."""
    from fastmaskformer.kernels.semantic import semantic_inference_tta

    def run():
        logits, embeds, pixels, image_sizes, input_sizes, flipped = [], [], [], [], [], []
        for short in range(256, 897, 128):
            size = (short, round(short * IMAGE[1] / IMAGE[0]))
            padded = tuple(-(-s // 32) * 32 for s in size)
            cl, me, _ = _inference_inputs(Q, classes, batch=1)
            pe = torch.empty(C, padded[0] // 4, padded[1] // 4)
            for flip in (False, True):
                logits.append(cl[0])
                embeds.append(me[0])
                pixels.append(pe)
                image_sizes += size
                input_sizes += padded
                flipped.append(flip)
        semantic_inference_tta(logits, embeds, pixels, image_sizes, input_sizes, flipped, list(IMAGE), "tf32")
    return run


def _panoptic(resize: bool):
    from fastmaskformer.kernels.panoptic import panoptic_assign

    kept = 50  # about half of the queries pass the 0.8 threshold

    def run():
        _, me, pe = _inference_inputs(kept, 133, batch=1)
        panoptic_assign(torch.rand(kept), me[0], pe[0], list(IMAGE), [480, 640] if resize else list(IMAGE),
                        list(INPUT))
    return run


def _mask_probs(dtype, out_dtype, sized: bool):
    from fastmaskformer.kernels.mask_probs import resampled_masks

    def run():
        _, me, pe = _inference_inputs(Q, 150, batch=2)
        me, pe = me.to(dtype), pe.to(dtype)
        low = list(pe.shape[-2:])
        if sized:
            resampled_masks(me[:1], pe[:1], list(IMAGE), [1024, 1366], list(INPUT), True, out_dtype)
            resampled_masks(me[:1], pe[:1], list(IMAGE), list(IMAGE), list(INPUT), False, torch.float32)
        else:
            resampled_masks(me, pe, low, low, low, True, out_dtype)
            resampled_masks(me, pe, list(INPUT), list(INPUT), list(INPUT), False, torch.float32)
    return run


# Mask2Former pixel decoder: levels 1/32, 1/16, 1/8 of the input, H=8 heads, L=3 levels, P=4 points.
DEFORM_HEADS, DEFORM_LEVELS, DEFORM_POINTS = 8, 3, 4


def _ms_deform_attn(size: int, head_dim: int, dtype, loc_dtype=None):
    """Forward and backward of one deformable-attention layer of the pixel decoder (Lq = S)."""
    from fastmaskformer.kernels.ms_deform_attn import ms_deform_attn

    def run():
        shapes = torch.tensor([[size // s, size // s] for s in (32, 16, 8)], dtype=torch.int64)
        tokens = int((shapes[:, 0] * shapes[:, 1]).sum())
        ldt = loc_dtype or dtype
        value = torch.zeros(B, tokens, DEFORM_HEADS, head_dim, dtype=dtype, requires_grad=True)
        loc = torch.zeros(B, tokens, DEFORM_HEADS, DEFORM_LEVELS, DEFORM_POINTS, 2, dtype=ldt, requires_grad=True)
        attn = torch.zeros(B, tokens, DEFORM_HEADS, DEFORM_LEVELS, DEFORM_POINTS, dtype=ldt, requires_grad=True)
        ms_deform_attn(value, shapes, loc, attn).sum().backward()
        ms_deform_attn(value, shapes, loc, attn, deterministic=False).sum().backward()  # float atomics
    return run


def cases() -> list[Case]:
    out = []
    for classes in (150, 847):
        for segments in (8, 16, 32):
            for dtype in (torch.float32, torch.bfloat16):
                for precision in ("tf32", "tf32x3", "ieee"):
                    name = f"matching_cost K={classes} M={segments} {str(dtype)[6:]} {precision}"
                    main = segments == 16 and dtype == torch.float32 and (classes == 150 or precision == "tf32")
                    out.append(Case(name, _matching_cost(classes, segments, dtype, precision), main))
    out.append(Case("matching_cost B=2 (pixel split)", _matching_cost(150, 16, torch.float32, "tf32", batch=2), True))
    out += [Case(f"mask_loss 6 layers M={m}", _mask_loss(m), m == 16) for m in (8, 16, 32)]
    out.append(Case("mask_loss bce 10 layers B=2 M=32 (Mask2Former full)", _mask_loss_bce(), True))
    out += [Case(f"point_matching_cost 10 layers B=2 P=12544 M=32 {p}", _point_matching_cost(p), p == "tf32")
            for p in ("tf32", "ieee")]
    out += [Case(f"point_loss 10 layers B=2 P=12544 M=32 {p}", _point_loss(p), p == "ieee") for p in ("ieee", "tf32")]
    for queries in (100, 200):
        for classes in (150, 847):
            for resize in (False, True):
                for precision in SEMANTIC_PRECISIONS:
                    name = f"semantic Q={queries} K={classes} {'resized' if resize else 'same size'} {precision}"
                    main = queries == 100 and (precision == "tf32" or (classes == 150 and not resize))
                    out.append(Case(name, _semantic(queries, classes, resize, precision), main))
    out += [Case(f"semantic TTA 12 views K={k}", _semantic_tta(k), k == 150) for k in (150, 847)]
    out += [Case(f"panoptic k=50 {'resized' if r else 'same size'}", _panoptic(r), True) for r in (False, True)]
    for dtype, out_dtype, sized in [(torch.float32, torch.float32, False), (torch.float32, torch.float32, True),
                                    (torch.bfloat16, torch.bfloat16, True)]:
        name = f"mask_probs {str(dtype)[6:]}->{str(out_dtype)[6:]} {'resized' if sized else 'low-res'}"
        out.append(Case(name, _mask_probs(dtype, out_dtype, sized), dtype == torch.float32))
    for size, head_dim, dtype, loc_dtype in [(512, 32, torch.float32, None), (512, 32, torch.bfloat16, torch.float32),
                                             (1024, 32, torch.float32, None), (512, 64, torch.float32, None),
                                             (512, 32, torch.float16, None)]:
        name = f"ms_deform_attn {size}x{size} D={head_dim} {str(dtype)[6:]}" + (
            f" (loc {str(loc_dtype)[6:]})" if loc_dtype else "")
        out.append(Case(name, _ms_deform_attn(size, head_dim, dtype, loc_dtype),
                        size == 512 and head_dim == 32 and dtype in (torch.float32, torch.bfloat16)))
    return out
