"""Fused semantic inference: marginalisation over queries + running argmax over classes (DESIGN 4).

The reference forms ``scores[k] = sum_q p[q, k] sigmoid(up(X_q))`` at the padded input size
(``K x Hp x Wp``), crops it and resizes it to the output size before the argmax. The crop-resize
is linear, so it moves inside the sum over queries: at an output pixel

    scores[k] = sum_q p[q, k] m_q,   m_q = sum_{j<4} w_j sigmoid(up(X_q)(tap_j)),

with tap_j the 4 bilinear taps of the output pixel on the cropped padded grid and up(X_q)(tap)
itself 4 bilinear taps of the low-res logits X [h*w, Q] (one matmul, ``mask_probs.lowres_logits``).
A program owns BLOCK_P output pixels: it builds m [BLOCK_P, Q] once from 16 gathered logit rows
per pixel, then streams the class probabilities in BLOCK_K columns, ``tl.dot(m, p[:, block])``,
keeping a running (max, argmax). Memory beyond the inputs: X, the probabilities and the
[H, W] outputs; nothing of size K x H x W or Q x H x W exists.

Multi-scale/flip TTA averages the views' scores at the output resolution: the same sum over the
union of all views' queries, each view with its own low-res logits, crop and resize (and a
mirrored x for flipped views). ``_semantic_views_kernel`` loops, per class block, over the views
and over query chunks of BLOCK_Q (m is recomputed per class block instead of being stored), so
it serves any number of queries; the single-view kernel is its fast path for Q <= 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mask_probs import autotune_configs, bilinear_logits, lowres_logits, resize_scale, source_taps

# Largest query count whose whole m tile [BLOCK_P, Q] is kept in registers.
MAX_HOISTED_QUERIES = 128
META_COLS = 8  # per view: x offset, probs row offset, nq, h, w, crop_h, crop_w, flipped


@triton.jit
def _mask_prob_tile(x_ptr, oy, ox, scale_y, scale_x, h, w, crop_h, crop_w, nq, q, mask):
    """m [P, Q]: the crop-resize (scale = crop / out) of the mask probabilities at the padded
    grid, sigmoid(bilinear x4 upsampling of the low-res logits x [h*w, nq]), at pixels (oy, ox)."""
    ty0, ty1, wy0, wy1 = source_taps(oy, scale_y, crop_h)
    tx0, tx1, wx0, wx1 = source_taps(ox, scale_x, crop_w)
    # Upsampling to the padded input: scale = h / (4h) = 0.25 exactly.
    s00 = tl.sigmoid(bilinear_logits(x_ptr, ty0, tx0, 0.25, 0.25, h, w, nq, q, mask))
    s01 = tl.sigmoid(bilinear_logits(x_ptr, ty0, tx1, 0.25, 0.25, h, w, nq, q, mask))
    s10 = tl.sigmoid(bilinear_logits(x_ptr, ty1, tx0, 0.25, 0.25, h, w, nq, q, mask))
    s11 = tl.sigmoid(bilinear_logits(x_ptr, ty1, tx1, 0.25, 0.25, h, w, nq, q, mask))
    m = (wy0[:, None] * (wx0[:, None] * s00 + wx1[:, None] * s01)
         + wy1[:, None] * (wx0[:, None] * s10 + wx1[:, None] * s11))
    # Masked entries loaded 0 logits, i.e. probability 0.5: zero them so that the class sum does
    # not rely on the class probabilities' zero padding.
    return tl.where(mask, m, 0.0)


@triton.jit
def _update_argmax(scores, k0, kmask, best, best_idx):
    """Fold a [P, BLOCK_K] score block into the running (max, argmax); strict > keeps the first
    index on exact ties, like torch.argmax."""
    scores = tl.where(kmask[None, :], scores, float("-inf"))
    block_max, block_idx = tl.max(scores, 1, return_indices=True, return_indices_tie_break_left=True)
    better = block_max > best
    return tl.where(better, block_max, best), tl.where(better, block_idx + k0, best_idx)


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_P": 64, "BLOCK_K": 64, "num_warps": 4},
             {"BLOCK_P": 64, "BLOCK_K": 128, "num_warps": 8},
             {"BLOCK_P": 128, "BLOCK_K": 64, "num_warps": 8},
             {"BLOCK_P": 128, "BLOCK_K": 128, "num_warps": 8}],
        interpreter={"BLOCK_P": 2048, "BLOCK_K": 256}),
    key=["nq", "nk"],
)
@triton.jit
def _semantic_kernel(x_ptr, probs_ptr, label_ptr, score_ptr, nq, nk, h, w, crop_h, crop_w,
                     out_h, out_w, scale_y, scale_x, PRECISION: tl.constexpr,
                     WRITE_SCORE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """One image, nq <= BLOCK_Q. x [h*w, nq] low-res logits, probs [nq, nk] -> label/score
    [out_h*out_w]. Grid: (cdiv(out_h*out_w, BLOCK_P),)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < out_h * out_w
    oy, ox = p // out_w, p % out_w
    q = tl.arange(0, BLOCK_Q)
    qmask = q < nq
    m = _mask_prob_tile(x_ptr, oy, ox, scale_y, scale_x, h, w, crop_h, crop_w, nq, q,
                        pmask[:, None] & qmask[None, :])  # [P, Q]
    best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_P,), tl.int32)
    for k0 in range(0, nk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < nk
        probs = tl.load(probs_ptr + q[:, None] * nk + k[None, :],
                        mask=qmask[:, None] & kmask[None, :], other=0.0)  # [Q, K]
        scores = tl.dot(m, probs, input_precision=PRECISION)  # [P, K]
        best, best_idx = _update_argmax(scores, k0, kmask, best, best_idx)
    tl.store(label_ptr + p, best_idx.to(tl.int64), mask=pmask)
    if WRITE_SCORE:
        tl.store(score_ptr + p, best, mask=pmask)


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_P": 64, "BLOCK_Q": 32, "BLOCK_K": 128, "num_warps": 4},
             {"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_K": 128, "num_warps": 8},
             {"BLOCK_P": 128, "BLOCK_Q": 32, "BLOCK_K": 128, "num_warps": 8},
             {"BLOCK_P": 64, "BLOCK_Q": 32, "BLOCK_K": 256, "num_warps": 8}],
        interpreter={"BLOCK_P": 2048, "BLOCK_Q": 128, "BLOCK_K": 256}),
    key=["nviews", "nk"],
)
@triton.jit
def _semantic_views_kernel(x_ptr, probs_ptr, meta_ptr, scale_ptr, label_ptr, score_ptr, nviews,
                           nk, out_h, out_w, META_COLS: tl.constexpr, PRECISION: tl.constexpr,
                           WRITE_SCORE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum over views v and their queries of p_v[q, k] m_{v,q}, then argmax over k.

    x: the views' low-res logits [h_v*w_v, nq_v], concatenated flat; probs [sum nq_v, nk];
    meta [nviews, META_COLS] int64 and scale [nviews, 2] float32 (crop / out per axis) describe
    the views. Grid: (cdiv(out_h*out_w, BLOCK_P),).
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < out_h * out_w
    oy, ox = p // out_w, p % out_w
    best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_P,), tl.int32)
    for k0 in range(0, nk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < nk
        acc = tl.zeros((BLOCK_P, BLOCK_K), tl.float32)
        for v in range(nviews):
            row = meta_ptr + v * META_COLS
            x_off, p_off, nq = tl.load(row), tl.load(row + 1), tl.load(row + 2)
            h, w, crop_h, crop_w = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
            flipped = tl.load(row + 7)
            scale_y, scale_x = tl.load(scale_ptr + v * 2), tl.load(scale_ptr + v * 2 + 1)
            # A flipped view's scores are mirrored back: output column ox reads its column W-1-ox.
            ox_v = tl.where(flipped != 0, out_w - 1 - ox, ox)
            for q0 in range(0, nq, BLOCK_Q):
                q = q0 + tl.arange(0, BLOCK_Q)
                qmask = q < nq
                m = _mask_prob_tile(x_ptr + x_off, oy, ox_v, scale_y, scale_x, h, w, crop_h, crop_w,
                                    nq, q, pmask[:, None] & qmask[None, :])
                probs = tl.load(probs_ptr + (p_off + q)[:, None] * nk + k[None, :],
                                mask=qmask[:, None] & kmask[None, :], other=0.0)
                acc = tl.dot(m, probs, acc, input_precision=PRECISION)
        best, best_idx = _update_argmax(acc, k0, kmask, best, best_idx)
    tl.store(label_ptr + p, best_idx.to(tl.int64), mask=pmask)
    if WRITE_SCORE:
        tl.store(score_ptr + p, best, mask=pmask)


def _launch_views(xs, probs, views_meta, output_size, return_score, precision):
    """Run ``_semantic_views_kernel``. xs: per-view pixel-major logits [h_v*w_v, nq_v]; probs:
    per-view [nq_v, K]; views_meta: per-view (h, w, crop_h, crop_w, flipped)."""
    device = probs[0].device
    H, W = output_size
    nk = probs[0].shape[1]
    meta, scales, x_off, p_off = [], [], 0, 0
    for x, pr, (h, w, crop_h, crop_w, flipped) in zip(xs, probs, views_meta):
        meta.append([x_off, p_off, pr.shape[0], h, w, crop_h, crop_w, int(flipped)])
        scales.append([resize_scale(crop_h, H), resize_scale(crop_w, W)])
        x_off, p_off = x_off + x.numel(), p_off + pr.shape[0]
    labels = torch.empty(H * W, device=device, dtype=torch.int64)
    score = torch.empty(H * W, device=device, dtype=torch.float32) if return_score else None
    meta_t = torch.tensor(meta, dtype=torch.int64).to(device)
    scale_t = torch.tensor(scales, dtype=torch.float32).to(device)
    x_all = torch.cat([x.reshape(-1) for x in xs])
    p_all = torch.cat(probs).contiguous()

    def grid(m):
        return (triton.cdiv(H * W, m["BLOCK_P"]),)

    # Without return_score the score pointer is never written (WRITE_SCORE is a constexpr).
    _semantic_views_kernel[grid](x_all, p_all, meta_t, scale_t, labels,
                                 score if return_score else labels, len(xs), nk, H, W,
                                 META_COLS=META_COLS, PRECISION=precision, WRITE_SCORE=return_score)
    return labels.view(H, W), (score.view(H, W) if return_score else None)


def semantic_inference(class_logits: torch.Tensor, mask_embed: torch.Tensor,
                       pixel_embed: torch.Tensor, image_sizes, output_sizes, return_score: bool,
                       precision: str = "ieee"):
    """class_logits [B,Q,K+1], mask_embed [B,Q,C], pixel_embed [B,C,h,w]; image_sizes (h_i, w_i)
    unpadded, output_sizes (H_i, W_i). Returns a list of int64 labels [H_i, W_i] (or tuples
    (labels, float32 score [H_i, W_i]) with ``return_score``). ``precision``: tl.dot's
    input_precision for the class sum ("ieee" = exact fp32 products)."""
    B, Q, _ = class_logits.shape
    h, w = pixel_embed.shape[-2:]
    probs = class_logits.float().softmax(-1)[..., :-1].contiguous()  # [B, Q, K]: drop "no object"
    nk = probs.shape[-1]
    x = lowres_logits(mask_embed, pixel_embed)  # [B, h*w, Q]
    results = []
    for b in range(B):
        (crop_h, crop_w), (H, W) = image_sizes[b], output_sizes[b]
        if Q > MAX_HOISTED_QUERIES:
            labels, score = _launch_views([x[b]], [probs[b]], [(h, w, crop_h, crop_w, False)],
                                          (H, W), return_score, precision)
        else:
            labels = torch.empty(H, W, device=x.device, dtype=torch.int64)
            score = torch.empty(H, W, device=x.device, dtype=torch.float32) if return_score else None

            def grid(m):
                return (triton.cdiv(H * W, m["BLOCK_P"]),)

            _semantic_kernel[grid](x[b], probs[b], labels, score if return_score else labels, Q, nk,
                                   h, w, crop_h, crop_w, H, W, resize_scale(crop_h, H),
                                   resize_scale(crop_w, W), PRECISION=precision,
                                   WRITE_SCORE=return_score,
                                   BLOCK_Q=max(16, triton.next_power_of_2(Q)))
        results.append((labels, score) if return_score else labels)
    return results


def semantic_inference_tta(views, output_size, precision: str = "ieee") -> torch.Tensor:
    """views: dicts with class_logits [Q_v,K+1], mask_embed [Q_v,C], pixel_embed [C,h_v,w_v],
    image_size (unpadded input of that view), flipped (bool). Returns int64 labels [H, W], the
    argmax of the views' summed class scores at ``output_size`` (the mean's argmax: dividing by
    the number of views does not move it), in one kernel over the union of the views' queries."""
    xs, probs, meta = [], [], []
    num_classes = {v["class_logits"].shape[-1] for v in views}
    if len(num_classes) != 1:
        raise ValueError(f"all TTA views need the same number of classes, got {sorted(num_classes)}")
    for v in views:
        pixel_embed = v["pixel_embed"]
        h, w = pixel_embed.shape[-2:]
        xs.append(lowres_logits(v["mask_embed"][None], pixel_embed[None])[0])
        probs.append(v["class_logits"].float().softmax(-1)[:, :-1])
        crop_h, crop_w = (int(s) for s in v["image_size"])
        meta.append((h, w, crop_h, crop_w, bool(v.get("flipped", False))))
    labels, _ = _launch_views(xs, probs, meta, tuple(output_size), False, precision)
    return labels
