"""Fused per-pixel part of panoptic inference (DESIGN 4, official general inference).

For one image's k kept queries, the reference resamples the mask logits (upsample to the padded
input, crop, resize to the output size: ``Q x H x W``), applies the sigmoid, takes
``argmax_q score_q sigmoid(mask_q)`` per pixel and counts, per query, the pixels it wins and the
pixels where ``sigmoid(mask_q) >= 0.5``. Here one program owns BLOCK_P output pixels and walks the
queries in chunks of BLOCK_Q: each logit is 16 gathered low-res values (``common.resampled``;
4 when the output size equals the image size), the running (max, argmax) is kept per pixel, and
both counts are reduced over the tile and added with one integer atomic per query and tile
(integer sums: deterministic). Memory beyond the inputs: the low-res logits [h*w, k], ids
[H, W] and the two [k] counts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, launch, resampled, resize_scale, triton_operator, upsample_scales
from .mask_probs import lowres_logits


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_P": 128, "BLOCK_Q": 16, "num_warps": 4},
             {"BLOCK_P": 64, "BLOCK_Q": 32, "num_warps": 4},
             {"BLOCK_P": 256, "BLOCK_Q": 16, "num_warps": 8}],
        interpreter={"BLOCK_P": 4096, "BLOCK_Q": 128}),
    key=["nq", "RESIZE"],
    # The counts are accumulated with atomics: zero them before each autotuning trial.
    reset_to_zero=["assigned_ptr", "full_ptr"],
)
@triton.jit
def _panoptic_assign_kernel(x_ptr, scores_ptr, ids_ptr, assigned_ptr, full_ptr, nq, ldq, h, w,
                            crop_h, crop_w, out_h, out_w, scale_y, scale_x, up_y, up_x,
                            RESIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """x [h*w, ldq] low-res logits, scores [nq] -> ids int64 [out_h*out_w], assigned/full int32
    [nq] (must be zeroed). Grid: (cdiv(out_h*out_w, BLOCK_P),)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < out_h * out_w
    oy, ox = p // out_w, p % out_w
    best = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_P,), tl.int32)
    # No software pipelining: it would buffer every gathered [P, Q] tile in shared memory.
    for q0 in tl.range(0, nq, BLOCK_Q, num_stages=1):
        q = q0 + tl.arange(0, BLOCK_Q)
        qmask = q < nq
        mask = pmask[:, None] & qmask[None, :]
        prob = tl.sigmoid(resampled(x_ptr, oy, ox, scale_y, scale_x, up_y, up_x, h, w, crop_h, crop_w,
                                    ldq, q, mask, RESIZE, False))  # [P, Q]
        confident = tl.sum((mask & (prob >= 0.5)).to(tl.int32), 0)
        tl.atomic_add(full_ptr + q, confident, mask=qmask)
        score = tl.load(scores_ptr + q, mask=qmask, other=0.0)
        weighted = tl.where(qmask[None, :], score[None, :] * prob, float("-inf"))
        chunk_max, chunk_idx = tl.max(weighted, 1, return_indices=True,
                                      return_indices_tie_break_left=True)
        # Strict > keeps the earlier query on exact ties, like torch.argmax.
        better = chunk_max > best
        best = tl.where(better, chunk_max, best)
        best_idx = tl.where(better, chunk_idx + q0, best_idx)
    tl.store(ids_ptr + p, best_idx.to(tl.int64), mask=pmask)
    for q0 in range(0, nq, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        won = (best_idx[:, None] == q[None, :]) & pmask[:, None]
        tl.atomic_add(assigned_ptr + q, tl.sum(won.to(tl.int32), 0), mask=q < nq)


@triton_operator("panoptic_assign")
def panoptic_assign(scores: torch.Tensor, mask_embed: torch.Tensor, pixel_embed: torch.Tensor,
                    image_size: list[int], output_size: list[int],
                    input_size: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [k], mask_embed [k,C], pixel_embed [C,h,w] of one image's kept queries ->
    (ids int64 [H,W] = argmax_k scores_k sigmoid(resized mask logits_k), assigned_area int64 [k]
    (pixels won), mask_area int64 [k] (pixels with sigmoid >= 0.5))."""
    nq = scores.shape[0]
    h, w = pixel_embed.shape[-2:]
    (crop_h, crop_w), (H, W) = image_size, output_size
    device = scores.device
    x = lowres_logits(mask_embed[None], pixel_embed[None])[0]  # [h*w, k]
    ids = torch.empty(H, W, device=device, dtype=torch.int64)
    counts = torch.zeros(2, nq, device=device, dtype=torch.int32)  # assigned, confident
    if H * W > 0 and nq > 0:
        def grid(m):
            return (triton.cdiv(H * W, m["BLOCK_P"]),)

        launch(_panoptic_assign_kernel, grid, x, scores.float().contiguous(), ids, counts[0], counts[1], nq,
               x.stride(0), h, w, crop_h, crop_w, H, W, resize_scale(crop_h, H), resize_scale(crop_w, W),
               *upsample_scales((h, w), input_size), RESIZE=(crop_h, crop_w) != (H, W))
    return ids, counts[0].long(), counts[1].long()  # new tensors: an operator's outputs never alias
