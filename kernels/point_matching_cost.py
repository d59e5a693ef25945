"""Fused point-sampled matching cost (Mask2Former's matcher): per (layer, image) problem, the
sums the BCE and dice costs need, from the pixel embedding sampled at the points inside the
kernel: no ``[B, Q, h, w]`` logit map and no ``[Q, P]`` logits in memory.

For problem n = (layer, image b), queries q, segments m and points p with logits
``x_qp = <E_nq, bilinear(P_b, point_p)>`` (P_b: the image's pixel embedding, that layer's own
with per-layer features ``[L, B, C, h, w]``) (4 taps, ``align_corners=False``, zeros outside) and
sampled targets ``t_mp`` (computed by torch: ``B x M x P`` values):

    xt[n, q, m] = sum_p x_qp t_mp        st[n, q, m] = sum_p sigmoid(x_qp) t_mp
    sp[n, q]    = sum_p softplus(x_qp)   ss[n, q]    = sum_p sigmoid(x_qp)

so that ``BCE cost = (sp - xt) / P`` (``BCE(x, 1) - BCE(x, 0) = -x``) and ``dice cost =
1 - (2 st + 1) / (ss + sum_p t + 1)``. One program per (problem, query block, segment block,
split of the points): it loops over its point blocks, gathers the taps of ``BLOCK_C`` channels at a time into a
``[BLOCK_C, BLOCK_P]`` tile, forms the logits with ``tl.dot`` and reduces them against the
target tile. Exact fp32 products (``"ieee"``) by default; ``"tf32"`` is the matching cost's
usual fast mode (the costs only feed the assignment).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmaskformer.shared import interpreter_enabled

from .common import autotune_configs, dot, launch, multiprocessor_count, point_taps, triton_operator


@triton.autotune(
    configs=autotune_configs(
        [{"BLOCK_Q": 32, "BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_C": 32, "num_warps": 4},
         {"BLOCK_Q": 64, "BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_C": 32, "num_warps": 4},
         # Wide ViT features (C = 1024, Q = 200: EoMT): every query tile gathers the 4 taps x C
         # channels of its points again, so fewer, taller tiles halve that L2 traffic.
         {"BLOCK_Q": 128, "BLOCK_M": 32, "BLOCK_P": 32, "BLOCK_C": 32, "num_warps": 8}],
        interpreter={"BLOCK_Q": 16, "BLOCK_M": 16, "BLOCK_P": 64, "BLOCK_C": 16}),
    key=["Q", "M", "C", "P", "SPLIT"])
@triton.jit
def _point_cost_kernel(
    emb_ptr,  # [N, Q, C] fp32 contiguous mask embeddings, problem n = layer * B + b
    pix_ptr,  # [B or L*B, C, h*w] contiguous pixel embeddings (shared, or per layer), fp32 / bf16 / fp16
    pts_ptr,  # [N, P, 2] fp32 contiguous points (x, y) in [0, 1]
    tgt_ptr,  # [N, M, P] fp32 contiguous sampled targets
    xt_ptr, st_ptr,  # [SPLIT, N, Q, M] fp32 partial sums
    sp_ptr, ss_ptr,  # [SPLIT, N, Q] fp32 partial sums
    B, Q, M, C, P, h, w, SPLIT, stride_pl,
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    q0 = tl.program_id(1) * BLOCK_Q
    m_block = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    m0 = m_block * BLOCK_M
    b = n % B
    qs = q0 + tl.arange(0, BLOCK_Q)
    ms = m0 + tl.arange(0, BLOCK_M)
    q_ok = qs < Q
    m_ok = ms < M
    emb = emb_ptr + n.to(tl.int64) * Q * C
    pix = pix_ptr + (n // B).to(tl.int64) * stride_pl + b.to(tl.int64) * C * h * w  # stride_pl 0: shared
    acc_xt = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
    acc_st = tl.zeros((BLOCK_Q, BLOCK_M), dtype=tl.float32)
    acc_sp = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc_ss = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for p0 in range(split * BLOCK_P, P, SPLIT * BLOCK_P):  # this program's share of the point blocks
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < P
        i00, i01, i10, i11, w00, w01, w10, w11 = point_taps(pts_ptr + n.to(tl.int64) * P * 2, ps, p_ok, h, w)
        x = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < C
            e = tl.load(emb + qs[:, None] * C + cs[None, :], mask=q_ok[:, None] & c_ok[None, :], other=0.0)
            rows = pix + cs[:, None].to(tl.int64) * h * w
            cm = c_ok[:, None]
            # Same association as the reference: ((w00 v00 + w01 v01) + w10 v10) + w11 v11.
            s = w00[None, :] * tl.load(rows + i00[None, :], mask=cm, other=0.0)
            s += w01[None, :] * tl.load(rows + i01[None, :], mask=cm, other=0.0)
            s += w10[None, :] * tl.load(rows + i10[None, :], mask=cm, other=0.0)
            s += w11[None, :] * tl.load(rows + i11[None, :], mask=cm, other=0.0)
            x = dot(e, s, x, PRECISION, EMULATE)
        sig = tl.sigmoid(x)
        softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        valid = q_ok[:, None] & p_ok[None, :]
        acc_sp += tl.sum(tl.where(valid, softplus, 0.0), axis=1)
        acc_ss += tl.sum(tl.where(valid, sig, 0.0), axis=1)
        t = tl.load(tgt_ptr + (n.to(tl.int64) * M + ms[:, None]) * P + ps[None, :],
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_P]
        tt = tl.trans(t)
        acc_xt = dot(tl.where(valid, x, 0.0), tt, acc_xt, PRECISION, EMULATE)
        acc_st = dot(tl.where(valid, sig, 0.0), tt, acc_st, PRECISION, EMULATE)
    problems = tl.num_programs(0).to(tl.int64)
    row = split * problems + n  # [SPLIT, N, ...] partial sums, added by torch (no atomics)
    out = (row * Q + qs[:, None]) * M + ms[None, :]
    ok = q_ok[:, None] & m_ok[None, :]
    tl.store(xt_ptr + out, acc_xt, mask=ok)
    tl.store(st_ptr + out, acc_st, mask=ok)
    if m_block == 0:
        tl.store(sp_ptr + row * Q + qs, acc_sp, mask=q_ok)
        tl.store(ss_ptr + row * Q + qs, acc_ss, mask=q_ok)


@triton_operator("point_matching_sums")
def point_matching_sums(mask_embed: torch.Tensor, pixel_embed: torch.Tensor, coords: torch.Tensor,
                        targets: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] (shared) or [L,B,C,h,w] (per layer), coords
    [L,B,P,2], targets [L,B,M,P] (sampled target masks) -> (xt, st) fp32 [L*B, Q, M] and (sp, ss)
    fp32 [L*B, Q]; see the module doc. One launch for all layers: a problem reads its layer's
    map through a layer stride (0 when shared)."""
    num_layers, batch, q, c = mask_embed.shape
    h, w = pixel_embed.shape[-2:]
    p, m = coords.shape[2], targets.shape[2]
    n = num_layers * batch
    emb = mask_embed.float().reshape(n, q, c).contiguous()
    # The features are read in their own dtype (bf16 under autocast: half the bytes, no fp32 copy
    # of the [L, B, C, h, w] map) and upcast per tap in the kernel.
    pix = pixel_embed if pixel_embed.dtype in (torch.float32, torch.bfloat16, torch.float16) else pixel_embed.float()
    pix = pix.reshape(-1, c, h * w).contiguous()
    stride_pl = batch * c * h * w if pixel_embed.dim() == 5 else 0
    pts = coords.float().reshape(n, p, 2).contiguous()
    tgt = targets.float().reshape(n, m, p).contiguous()
    # Split the points over programs until the grid fills the GPU about 4 times (few problems:
    # 10 layers x 2 images per GPU); the partial sums are added here, deterministically.
    tiles = n * triton.cdiv(q, 32) * max(triton.cdiv(m, 32), 1)
    split = max(1, min(triton.cdiv(p, 32), triton.cdiv(4 * multiprocessor_count(emb.device), max(tiles, 1))))
    xt = torch.zeros(split, n, q, m, dtype=torch.float32, device=emb.device)
    st = torch.zeros_like(xt)
    sp = torch.zeros(split, n, q, dtype=torch.float32, device=emb.device)
    ss = torch.zeros_like(sp)

    def grid(meta):
        return (n, triton.cdiv(q, meta["BLOCK_Q"]), max(triton.cdiv(m, meta["BLOCK_M"]), 1) * split)

    if n and q and p:
        launch(_point_cost_kernel, grid, emb, pix, pts, tgt, xt, st, sp, ss, batch, q, m, c, p, h, w, split, stride_pl,
               PRECISION=precision, EMULATE=interpreter_enabled())
    return xt.sum(0), st.sum(0), sp.sum(0), ss.sum(0)
