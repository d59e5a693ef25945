"""Fused semantic inference: marginalisation over queries + running argmax over classes (DESIGN 4).

The reference forms ``scores[k] = sum_q p[q, k] sigmoid(up(X_q))`` at the model input size
(``K x H_in x W_in``), crops it and resizes it to the output size before the argmax. The
crop-resize is linear, so it moves inside the sum over queries: at an output pixel

    scores[k] = sum_q p[q, k] m_q,   m_q = sum_{j<4} w_j sigmoid(up(X_q)(tap_j)),

with tap_j the 4 bilinear taps of the output pixel on the cropped input grid and up(X_q)(tap)
itself 4 bilinear taps of the low-res logits X [h*w, Q] (one matmul, ``mask_probs.lowres_logits``).
When the output size equals the image size (the usual evaluation case) the resize is the
identity and m_q is 4 taps (RESIZE=False).

A program owns BLOCK_P output pixels of one image and streams the class probabilities in
BLOCK_K columns, ``scores = m @ p[:, block]`` (tl.dot), keeping a running (max, argmax). With one
view of at most BLOCK_Q queries (HOIST) m [BLOCK_P, BLOCK_Q] is built once and stays in
registers; otherwise (TTA: several views, or more queries than fit) m is rebuilt in BLOCK_Q
chunks per class block. Memory beyond the inputs: X, the probabilities and the [H, W] outputs;
nothing of size K x H x W or Q x H x W exists.

Multi-scale/flip TTA averages the views' scores at the output resolution: the same sum over the
union of all views' queries, each view with its own low-res logits, input size, crop and resize
(and a mirrored x for flipped views). All images of a batch (or all views of a TTA image) go in
one launch; a table describes the views.

Precision: the low-res logits and the class sum are tl.dots; ``precision`` is theirs. Only the
argmax is returned, so the default is "tf32" (see ``DEFAULT_PRECISION``): labels can differ from
exact fp32 only where the top two class scores are within ~4e-3 of each other. "tf32x3" (about
fp32 accuracy) and "ieee" (exact fp32 products) are opt-in, and so is "bf16" (twice tf32's
tensor-core rate; labels can differ where the top two are within ~2e-2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmaskformer.shared import interpreter_enabled

from .common import (
    PRECISIONS,
    autotune_configs,
    launch,
    triton_operator,
    check_precision,
    dot,
    pixel_major_stride,
    resampled,
    resize_scale,
    upsample_scales,
)
from .mask_probs import lowres_logits

DEFAULT_PRECISION = "tf32"
SEMANTIC_PRECISIONS = PRECISIONS + ("bf16",)
LOGITS_PRECISION = {"bf16": "tf32"}  # the low-res logits matmul in bf16 mode
VIEW_COLS = 8  # per view: x offset, probs row offset, nq, h, w, crop_h, crop_w, flipped
IMAGE_COLS = 5  # per image: first view, number of views, output offset, out_h, out_w
# m [BLOCK_P, BLOCK_Q] fp32 tiles are capped at this many elements (32 registers per thread
# at 8 warps): bigger query tiles get fewer pixels.
MAX_TILE = 8192
MAX_BLOCK_Q = 128  # hoisted m tiles of 256 queries spill (sm_90 and sm_80)
CHUNK_Q = 32


# (BLOCK_P, BLOCK_K, num_warps, num_stages) per kind of launch, checked for sm_90 / sm_80 with
# python benchmarks/aot.py. "hoisted": tf32 / bf16, one view, m [BLOCK_P, <= 128
# queries] kept in registers; "chunked":
# ieee (FMA loops keep both operands in registers), tf32x3 (two operand halves) and TTA stream
# the queries in CHUNK_Q chunks, m rebuilt per class block. With RESIZE (16 gathers per m
# element) fewer configs fit.
_GPU_CONFIGS = {
    "hoisted": [(64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
    "hoisted-resize": [(64, 64, 8, 2)],
    "chunked": [(64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (32, 128, 4, 2)],
    "chunked-resize": [(64, 128, 8, 2), (32, 128, 4, 2)],
}


def _kind(hoist: bool, resize: bool) -> str:
    return ("hoisted" if hoist else "chunked") + ("-resize" if resize else "")


def _fitting(kind: str, block_q: int) -> list[tuple]:
    """The configs tuned for a kind of launch whose m tile fits (BLOCK_P * BLOCK_Q <= MAX_TILE),
    or the one with the fewest pixels."""
    tuned = _GPU_CONFIGS[kind]
    return [c for c in tuned if c[0] * block_q <= MAX_TILE] or [min(tuned, key=lambda c: c[0])]


@triton.jit
def _view_probs(x_ptr, ldq, view_ptr, scale_ptr, v, oy, ox, out_w, pmask, q0,
                RESIZE: tl.constexpr, BLOCK_Q: tl.constexpr):
    """m [P, BLOCK_Q] of view v for queries q0 .. q0 + BLOCK_Q (0 past the view's queries), and
    the view's row offset into the class probabilities and its query count."""
    row = view_ptr + v * 8
    x_off, p_off, nq = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    h, w, crop_h, crop_w = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
    flipped = tl.load(row + 7)
    scale_y, scale_x = tl.load(scale_ptr + v * 4), tl.load(scale_ptr + v * 4 + 1)
    up_y, up_x = tl.load(scale_ptr + v * 4 + 2), tl.load(scale_ptr + v * 4 + 3)
    # A flipped view's scores are mirrored back: output column ox reads its column W-1-ox.
    ox = tl.where(flipped != 0, out_w - 1 - ox, ox)
    q = q0 + tl.arange(0, BLOCK_Q)
    mask = pmask[:, None] & (q < nq)[None, :]
    # Every view's logits start at a multiple of 16 floats (the launcher's layout): with the
    # 16-divisible row stride ldq the row gathers vectorise.
    m = resampled(x_ptr + tl.multiple_of(x_off, 16), oy, ox, scale_y, scale_x, up_y, up_x, h.to(tl.int32),
                  w.to(tl.int32), crop_h.to(tl.int32), crop_w.to(tl.int32), ldq, q, mask, RESIZE, True)
    # Masked entries are sigmoid(0) = 0.5: zero them so that the class sum does not rely on the
    # probabilities' zero padding.
    return tl.where(mask, m, 0.0), p_off, nq


@triton.jit
def _class_block(probs_ptr, p_off, nq, q0, k0, nk, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """Class probabilities [BLOCK_Q, BLOCK_K] of queries q0.. of a view, classes k0.. (0 padded)."""
    q = q0 + tl.arange(0, BLOCK_Q)
    k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(probs_ptr + (p_off + q)[:, None] * nk + k[None, :],
                   mask=(q < nq)[:, None] & (k < nk)[None, :], other=0.0)


@triton.jit
def _update_argmax(scores, k0, nk, best, best_idx, BLOCK_K: tl.constexpr):
    """Fold a [P, BLOCK_K] score block into the running (max, argmax); strict > keeps the first
    index on exact ties, like torch.argmax."""
    k = k0 + tl.arange(0, BLOCK_K)
    scores = tl.where((k < nk)[None, :], scores, float("-inf"))
    block_max, block_idx = tl.max(scores, 1, return_indices=True, return_indices_tie_break_left=True)
    better = block_max > best
    return tl.where(better, block_max, best), tl.where(better, block_idx + k0, best_idx)


@triton.jit
def _semantic_kernel(x_ptr, ldq, probs_ptr, view_ptr, scale_ptr, image_ptr, label_ptr, score_ptr, nk,
                     PRECISION: tl.constexpr, EMULATE: tl.constexpr, HOIST: tl.constexpr,
                     RESIZE: tl.constexpr, WRITE_SCORE: tl.constexpr, BLOCK_Q: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Labels (and scores) of output pixels of one image: argmax_k sum over the image's views v
    and their queries q of p_v[q, k] m_{v,q}.

    x: the views' pixel-major low-res logits [h_v*w_v, ldq], flat; probs [sum nq_v, nk] fp32;
    view [V, 8] int64 and scale [V, 4] fp32 (crop/out, h/H_in per axis) describe the views;
    image [B, 5] int64 the images; label int64 / score fp32 [sum H_i*W_i]. Grid
    (cdiv(max H_i*W_i, BLOCK_P), B).
    """
    img = tl.program_id(1)
    first_view, num_views = tl.load(image_ptr + img * 5), tl.load(image_ptr + img * 5 + 1)
    out_off = tl.load(image_ptr + img * 5 + 2)
    out_h, out_w = tl.load(image_ptr + img * 5 + 3), tl.load(image_ptr + img * 5 + 4)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < out_h * out_w
    oy, ox = p // out_w, p % out_w
    best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_P,), tl.int32)
    if HOIST:  # one view, all its queries in one tile: m once, then stream the classes
        m, p_off, nq = _view_probs(x_ptr, ldq, view_ptr, scale_ptr, first_view, oy, ox, out_w, pmask, 0,
                                   RESIZE, BLOCK_Q)
        for k0 in range(0, nk, BLOCK_K):
            probs = _class_block(probs_ptr, p_off, nq, 0, k0, nk, BLOCK_Q, BLOCK_K)
            scores = dot(m, probs, tl.zeros((BLOCK_P, BLOCK_K), tl.float32), PRECISION, EMULATE)
            best, best_idx = _update_argmax(scores, k0, nk, best, best_idx, BLOCK_K)
    else:
        for k0 in range(0, nk, BLOCK_K):
            acc = tl.zeros((BLOCK_P, BLOCK_K), tl.float32)
            # No software pipelining: it would buffer every gathered [P, Q] tile in shared memory.
            for v in tl.range(first_view, first_view + num_views, num_stages=1):
                nq = tl.load(view_ptr + v * 8 + 2)
                for q0 in tl.range(0, nq, BLOCK_Q, num_stages=1):
                    m, p_off, nq_v = _view_probs(x_ptr, ldq, view_ptr, scale_ptr, v, oy, ox, out_w, pmask, q0,
                                                 RESIZE, BLOCK_Q)
                    probs = _class_block(probs_ptr, p_off, nq_v, q0, k0, nk, BLOCK_Q, BLOCK_K)
                    acc = dot(m, probs, acc, PRECISION, EMULATE)
            best, best_idx = _update_argmax(acc, k0, nk, best, best_idx, BLOCK_K)
    tl.store(label_ptr + out_off + p, best_idx.to(tl.int64), mask=pmask)
    if WRITE_SCORE:
        tl.store(score_ptr + out_off + p, best, mask=pmask)


# One autotuner per (kind of launch, BLOCK_Q) with the configs that fit it: torch.compile
# supports triton.autotune with configs and keys only (no pruning hooks).
_SEMANTIC_KERNELS = {
    (kind, block_q): triton.autotune(
        configs=autotune_configs(
            gpu=[{"BLOCK_P": bp, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
                 for bp, bk, nw, ns in _fitting(kind, block_q)],
            interpreter={"BLOCK_P": 2048, "BLOCK_K": 256}),
        key=["nk", "PRECISION"])(_semantic_kernel)
    for kind in _GPU_CONFIGS
    for block_q in ((16, 32, 64, MAX_BLOCK_Q) if kind.startswith("hoisted") else (16, CHUNK_Q))
}


def _launch(x, ldq, probs, views, images, return_score: bool, precision: str):
    """Run ``_semantic_kernel``. x: the views' pixel-major fp32 logits [h_v*w_v, ldq] (every
    view at a multiple of 16 floats, ldq a multiple of 16), flat; probs [rows, K]
    fp32 contiguous; views: per view (x offset, probs row offset, nq, h, w, crop_h, crop_w,
    flipped, input_size); images: per image (view ids, (H, W)). Returns the images' labels
    int64 and scores fp32 (empty without return_score), flat [sum H*W] in image order."""
    device = probs.device
    nk = probs.shape[1]
    view_rows = [list(v[:7]) + [int(v[7])] for v in views]
    image_rows, scale_rows, out_off = [], [None] * len(views), 0
    for view_ids, (H, W) in images:
        image_rows.append([view_ids[0], len(view_ids), out_off, H, W])
        for v in view_ids:
            _, _, _, h, w, crop_h, crop_w, _, input_size = views[v]
            scale_rows[v] = [resize_scale(crop_h, H), resize_scale(crop_w, W), *upsample_scales((h, w), input_size)]
        out_off += H * W
    # One host->device copy for both integer tables.
    table = torch.tensor([c for r in view_rows + image_rows for c in r], dtype=torch.int64).to(device)
    view_t, image_t = table[: len(views) * VIEW_COLS], table[len(views) * VIEW_COLS:]
    scale_t = torch.tensor(scale_rows, dtype=torch.float32).to(device)
    labels = torch.empty(out_off, device=device, dtype=torch.int64)
    score = torch.empty(out_off, device=device, dtype=torch.float32) if return_score else labels
    max_q = max(v[2] for v in views)
    # Exact fp32 products are FMA loops that keep both operands of a tl.dot in registers, and
    # tf32x3 keeps two halves of each: their reduction (queries) is cut into CHUNK_Q chunks,
    # with m rebuilt per class block.
    hoist = (all(len(ids) == 1 for ids, _ in images) and precision in ("tf32", "bf16")
             and max_q <= MAX_BLOCK_Q)
    block_q = min(max(16, triton.next_power_of_2(max_q)), MAX_BLOCK_Q if hoist else CHUNK_Q)
    resize = any(tuple(views[v][5:7]) != tuple(size) for ids, size in images for v in ids)
    max_pixels = max(H * W for _, (H, W) in images)

    def grid(meta):
        return (triton.cdiv(max_pixels, meta["BLOCK_P"]), len(images))

    # Without return_score the score pointer is never written (WRITE_SCORE is a constexpr).
    launch(_SEMANTIC_KERNELS[_kind(hoist, resize), block_q], grid, x, ldq, probs, view_t, scale_t, image_t, labels, score, nk,
           PRECISION=precision, EMULATE=interpreter_enabled(), HOIST=hoist, RESIZE=resize,
           WRITE_SCORE=return_score, BLOCK_Q=block_q)
    return labels, (score if return_score else labels.new_empty(0, dtype=torch.float32))


@triton_operator("semantic_inference")
def semantic_inference(class_logits: torch.Tensor, mask_embed: torch.Tensor, pixel_embed: torch.Tensor,
                       image_sizes: list[int], output_sizes: list[int], input_size: list[int], return_score: bool,
                       precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """class_logits [B,Q,K+1], mask_embed [B,Q,C], pixel_embed [B,C,h,w]; image_sizes (h_i, w_i)
    unpadded and output_sizes (H_i, W_i), flattened [2B]; input_size the model input size.
    Returns the labels int64 and (with ``return_score``, else empty) the scores float32 of all
    images, flat [sum H_i W_i] in image order; one launch."""
    check_precision(precision, "semantic_inference", SEMANTIC_PRECISIONS)
    B, Q, _ = class_logits.shape
    h, w = pixel_embed.shape[-2:]
    probs = class_logits.float().softmax(-1)[..., :-1].reshape(B * Q, -1).contiguous()  # drop "no object"
    # The low-res logits only feed the argmax too: same precision (bf16 products: tf32).
    x = lowres_logits(mask_embed, pixel_embed, precision=LOGITS_PRECISION.get(precision, precision))  # [B, h*w, Q]
    ldq = x.stride(1)
    views = [(b * x.stride(0), b * Q, Q, h, w, image_sizes[2 * b], image_sizes[2 * b + 1], False, tuple(input_size))
             for b in range(B)]
    images = [([b], (output_sizes[2 * b], output_sizes[2 * b + 1])) for b in range(B)]
    return _launch(x, ldq, probs, views, images, return_score, precision)


@triton_operator("semantic_inference_tta")
def semantic_inference_tta(class_logits: list[torch.Tensor], mask_embed: list[torch.Tensor],
                           pixel_embed: list[torch.Tensor], image_sizes: list[int], input_sizes: list[int],
                           flipped: list[bool], output_size: list[int], precision: str) -> torch.Tensor:
    """Views v: class_logits [Q_v,K+1], mask_embed [Q_v,C], pixel_embed [C,h_v,w_v]; image_sizes
    and input_sizes (the view's unpadded and model input sizes) flattened [2V]; flipped [V].
    Returns int64 labels [H, W], the argmax of the views' summed class scores at
    ``output_size`` (the mean's argmax: dividing by the number of views does not move it), in
    one kernel over the union of the views' queries."""
    check_precision(precision, "semantic_inference_tta", SEMANTIC_PRECISIONS)
    # All views' low-res logits in one buffer, each [h_v*w_v, ldq] at a multiple of 16 floats.
    ldq = pixel_major_stride(max(e.shape[0] for e in mask_embed))
    sizes = [p.shape[-2] * p.shape[-1] * ldq for p in pixel_embed]
    x = torch.empty(sum(sizes), device=pixel_embed[0].device, dtype=torch.float32)
    probs, meta, x_off, p_off = [], [], 0, 0
    for v, size in enumerate(sizes):
        h, w = pixel_embed[v].shape[-2:]
        nq = mask_embed[v].shape[0]
        view_x = x[x_off:x_off + size].view(1, h * w, ldq)
        lowres_logits(mask_embed[v][None], pixel_embed[v][None], precision=LOGITS_PRECISION.get(precision, precision),
                      out=view_x)
        probs.append(class_logits[v].float().softmax(-1)[:, :-1])
        meta.append((x_off, p_off, nq, h, w, image_sizes[2 * v], image_sizes[2 * v + 1], flipped[v],
                     (input_sizes[2 * v], input_sizes[2 * v + 1])))
        x_off, p_off = x_off + size, p_off + nq
    labels, _ = _launch(x, ldq, torch.cat(probs).contiguous(), meta,
                        [(list(range(len(sizes))), tuple(output_size))], False, precision)
    return labels.view(*output_size)
