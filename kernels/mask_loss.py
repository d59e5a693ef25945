"""Fused focal + dice loss of matched masks, all decoder layers at once, with the bilinear
upsampling inside (DESIGN 3, 1.1).

The matching arrives as a padded assignment ``[L, B, M]`` (the query of segment j of image b at
layer l, or -1), so every shape is static: the registered operators trace under
``torch.compile`` / ``torch.export`` without a host sync. A slot is one (layer, image, segment).

Split of the work:
1. Low-resolution logits of the matched queries of ALL layers, ``X = E_matched @ P_b``: one
   ``bmm`` over images, rows (layer, segment) padded to ``[B, L * M, h*w]`` fp32: the pixel
   embeddings are read once for the 6 layers, and the backward's ``grad P = E^T @ grad X`` is
   one product written once (not 6 accumulations of a [B, C, h, w] gradient). With per-layer
   pixel embeddings ``[L, B, C, h, w]`` (EoMT) the one bmm runs over the L*B (layer, image)
   pairs instead, X ``[L*B, M, h*w]``: every map is still read once, and the kernels below only
   see X through the per-slot row table (:func:`_slots`).
2. ``_mask_loss_fwd_kernel``: per (mask, split of full-res tiles) it gathers the 4 bilinear
   taps of every full-resolution pixel (align_corners=False, any scale, PyTorch's rule), forms
   ``s = sigmoid(v)``, the target bit ``segment_map[b] == seg_id`` and accumulates sum(focal),
   sum(s), sum(t), sum(s t). Partial sums go to ``[slots, SPLIT, 4]`` and are added by torch:
   deterministic, no atomics. Unmatched slots loop over nothing.
3. ``_mask_loss_bwd_kernel``: the adjoint of the upsampling with its 4 taps. Full-res pixels
   are grouped by *cell*: the low-res (row, column) of their first tap. All pixels of a cell
   share their 4 taps, so a program loads its cells' 4 corner values once, recomputes
   dLoss/dv for every full-res pixel of its cells (needs only the per-mask sums of step 2) and
   accumulates 4 weighted sums per cell: what the cell gives its own low-res pixel, the one
   below, the one to the right and the diagonal one. A low-res pixel's gradient is the sum of
   those of its cell and the 3 cells above / left, brought in by exact 0/1 shift products.
   Programs own CELL-1 x CELL-1 low-res pixels (one cell of halo); every element of
   ``grad_X`` is written by exactly one program: deterministic, no atomics.
Nothing of size ``M x H x W`` is allocated; the largest temporaries are X and its gradient
(O(L M h w)) and the int32 padded segment maps ``[B, H, W]``.

Precision: the kernels compute in fp32. The ``bmm`` of step 1 and its backward run in fp32 on
upcast inputs and follow ``torch.backends.cuda.matmul.allow_tf32`` like the reference, unless
``precision="tf32"`` (opt-in fast mode) forces TF32 tensor cores for them.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastmaskformer.shared import FOCAL_ALPHA, FOCAL_GAMMA

from .common import autotune_configs, launch, multiprocessor_count, source_taps, triton_operator

assert FOCAL_GAMMA == 2.0, "the kernels square (1-p_t) explicitly"

LOSS_PRECISIONS = ("ieee", "tf32")


@triton.jit
def slot_offsets(slot, row_ptr, img_ptr, sid_ptr, hw, HW):
    """Of matched-mask slot ``slot`` (the :func:`_slots` tables): the offset of its row of X
    (int64, row * h*w), of its image's segment map (int64, b * H*W), its segment id (-2:
    unmatched) and ``matched`` (1 or 0: loop bounds multiplied by it do no work when unmatched)."""
    row = tl.load(row_ptr + slot).to(tl.int64) * hw
    img = tl.load(img_ptr + slot).to(tl.int64) * HW
    sid = tl.load(sid_ptr + slot)
    return row, img, sid, (sid >= 0).to(tl.int32)


@triton.jit
def _upsampled_logits(x_row, ys, xs, h, w, scale_y, scale_x):
    """Logits at full-res pixels (ys [BY], xs [BX]) of one low-res map ``x_row [h, w]`` -> [BY, BX]."""
    y0, y1, ly0, ly1 = source_taps(ys, scale_y, h)
    x0, x1, lx0, lx1 = source_taps(xs, scale_x, w)
    top = x_row + y0[:, None] * w
    bot = x_row + y1[:, None] * w
    # The taps are clamped inside [0,h) x [0,w), even for rows/columns past H/W: no mask needed.
    # Same association as PyTorch's kernel: h0 (w0 a + w1 b) + h1 (w0 c + w1 d).
    return (ly0[:, None] * (lx0[None, :] * tl.load(top + x0[None, :]) + lx1[None, :] * tl.load(top + x1[None, :]))
            + ly1[:, None] * (lx0[None, :] * tl.load(bot + x0[None, :]) + lx1[None, :] * tl.load(bot + x1[None, :])))


@triton.jit
def _softplus_pair(v):
    """(softplus(v), softplus(-v)) = (BCE(v, 0), BCE(v, 1)), numerically stable."""
    log_term = tl.log(1.0 + tl.exp(-tl.abs(v)))
    return tl.maximum(v, 0.0) + log_term, tl.maximum(-v, 0.0) + log_term


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"BLOCK_Y": 8, "BLOCK_X": 128, "num_warps": 4}, {"BLOCK_Y": 16, "BLOCK_X": 64, "num_warps": 4},
             {"BLOCK_Y": 16, "BLOCK_X": 128, "num_warps": 8}, {"BLOCK_Y": 32, "BLOCK_X": 64, "num_warps": 8}],
        interpreter={"BLOCK_Y": 64, "BLOCK_X": 64}),
    key=["h", "w", "H", "W"])
@triton.jit
def _mask_loss_fwd_kernel(
    x_ptr,  # [R, h*w] fp32 contiguous low-res logits
    row_ptr, img_ptr, sid_ptr,  # [M] int32 per slot: row of X, image b, segment id (-2: unmatched)
    seg_ptr,  # [B, H, W] int32 contiguous segment maps padded with -1
    partial_ptr,  # [M, SPLIT, 4] fp32: sum focal, sum s, sum t, sum s t
    h, w, H, W, scale_y, scale_x, SPLIT,
    ALPHA: tl.constexpr, BCE: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    mask_id = pid // SPLIT
    split = pid % SPLIT
    row, img, sid, matched = slot_offsets(mask_id, row_ptr, img_ptr, sid_ptr, h * w, H * W)
    x_row = x_ptr + row
    seg_img = seg_ptr + img

    acc_focal = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    acc_st = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    tiles_x = tl.cdiv(W, BLOCK_X)
    for tile in range(split, tl.cdiv(H, BLOCK_Y) * tiles_x * matched, SPLIT):
        ys = (tile // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
        xs = (tile % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
        inside = (ys < H)[:, None] & (xs < W)[None, :]
        v = _upsampled_logits(x_row, ys, xs, h, w, scale_y, scale_x)
        ids = tl.load(seg_img + ys[:, None] * W + xs[None, :], mask=inside, other=-1)
        t = ids == sid  # target bit; ignore/padding (-1) is a negative for every mask
        s = tl.sigmoid(v)
        bce_neg, bce_pos = _softplus_pair(v)
        if BCE:  # sigmoid BCE (Mask2Former)
            focal = tl.where(t, bce_pos, bce_neg)
        else:  # alpha_t (1 - p_t)^2 BCE(v, t) with t binary (MaskFormer's focal)
            focal = tl.where(t, ALPHA * (1.0 - s) * (1.0 - s) * bce_pos, (1.0 - ALPHA) * s * s * bce_neg)
        tf = t.to(tl.float32)
        acc_focal += tl.where(inside, focal, 0.0)
        acc_s += tl.where(inside, s, 0.0)
        acc_t += tf
        acc_st += s * tf
    out = partial_ptr + (mask_id * SPLIT + split) * 4
    tl.store(out + 0, tl.sum(tl.sum(acc_focal, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(acc_s, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(acc_t, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(acc_st, axis=1), axis=0))


@triton.jit
def _cell_start(cell, inv_scale, MARGIN: tl.constexpr):
    """First full-res index to try for each cell. A pixel y belongs to cell floor(scale (y + 0.5)
    - 0.5) (-1 for the pixels whose source is clamped to 0); the first one is estimated by
    inverting that, exactly for power-of-two scales, else MARGIN earlier (the caller tries
    MARGIN more indices at the end and keeps those whose own cell matches)."""
    return tl.ceil((cell.to(tl.float32) + 0.5) * inv_scale - 0.5).to(tl.int32) - MARGIN


@triton.jit
def _tap_split(pos, cell, scale, n_low, n_full):
    """For full-res indices ``pos`` tried for cells ``cell``: (valid, weight to the cell's own
    low-res index, weight to the next one). valid: inside [0, n_full) and really in that cell.
    Equal to source_taps' weights: a clamped source (cell -1) gives everything to index 0, the
    last low-res index keeps both weights."""
    src = scale * (pos.to(tl.float32) + 0.5) - 0.5
    own = tl.floor(src).to(tl.int32)
    valid = (pos >= 0) & (pos < n_full) & (own == cell)
    frac = tl.minimum(src - tl.maximum(src, 0.0).to(tl.int32).to(tl.float32), 1.0)
    w_hi = tl.where(cell < 0, 1.0, tl.where(cell >= n_low - 1, 0.0, frac))
    w_lo = tl.where(cell < 0, 0.0, tl.where(cell >= n_low - 1, (1.0 - frac) + frac, 1.0 - frac))
    return valid, w_lo, w_hi


@triton.jit
def _shift_matrix(N: tl.constexpr, DOWN: tl.constexpr):
    """0/1 [N, N]: DOWN: (A @ S)[t] = S[t-1] (rows move down one); else (S @ A)[:, t] = S[:, t-1]."""
    i = tl.arange(0, N)
    if DOWN:
        return (i[None, :] == i[:, None] - 1).to(tl.float32)
    else:
        return (i[:, None] == i[None, :] - 1).to(tl.float32)


@triton.autotune(
    configs=autotune_configs(
        gpu=[{"CELL_Y": 16, "CELL_X": 16, "num_warps": 4}, {"CELL_Y": 16, "CELL_X": 32, "num_warps": 4},
             {"CELL_Y": 32, "CELL_X": 32, "num_warps": 8}],
        interpreter={"CELL_Y": 64, "CELL_X": 64}),
    key=["h", "w", "H", "W", "SUB_Y", "SUB_X"])
@triton.jit
def _mask_loss_bwd_kernel(
    x_ptr,  # [R, h*w] fp32 contiguous low-res logits
    grad_x_ptr,  # [R, h*w] fp32, zero-initialised; rows of matched masks are written here
    row_ptr, img_ptr, sid_ptr, layer_ptr,  # [M] int32 per slot (segment id -2: unmatched)
    seg_ptr,  # [B, H, W] int32 contiguous
    stats_ptr,  # [M, 4] fp32 from the forward: sum focal, sum s, sum t, sum s t
    grad_out_ptr,  # [L, 2] fp32: dLoss/dfocal_l, dLoss/ddice_l
    h, w, H, W, scale_y, scale_x, inv_scale_y, inv_scale_x, inv_num_masks, inv_pixels,
    SUB_Y, SUB_X, MARGIN_Y: tl.constexpr, MARGIN_X: tl.constexpr,
    ALPHA: tl.constexpr, BCE: tl.constexpr, CELL_Y: tl.constexpr, CELL_X: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_x = tl.cdiv(w, CELL_X - 1)
    tiles_per_mask = tl.cdiv(h, CELL_Y - 1) * tiles_x
    mask_id = pid // tiles_per_mask
    tile = pid % tiles_per_mask
    row, img, sid, matched = slot_offsets(mask_id, row_ptr, img_ptr, sid_ptr, h * w, H * W)
    x_row = x_ptr + row
    seg_img = seg_ptr + img
    layer = tl.load(layer_ptr + mask_id)

    # dice_m = 1 - I/U with I = 2 sum(s t) + 1, U = sum(s) + sum(t) + 1:
    # d dice_m / d s_p = (I - 2 t_p U) / U^2.
    dice_i = 2.0 * tl.load(stats_ptr + mask_id * 4 + 3) + 1.0
    dice_u = tl.load(stats_ptr + mask_id * 4 + 1) + tl.load(stats_ptr + mask_id * 4 + 2) + 1.0
    coef_focal = tl.load(grad_out_ptr + layer * 2) * inv_num_masks * inv_pixels  # focal: per-mask pixel mean
    coef_dice = tl.load(grad_out_ptr + layer * 2 + 1) * inv_num_masks / (dice_u * dice_u)

    # Cells (low-res index of the first tap) of this program: one of halo above / left of the
    # CELL-1 low-res rows / columns it writes.
    cy = (tile // tiles_x) * (CELL_Y - 1) - 1 + tl.arange(0, CELL_Y)
    cx = (tile % tiles_x) * (CELL_X - 1) - 1 + tl.arange(0, CELL_X)
    # The 4 taps of every pixel of a cell: low-res (cy or 0, cy + 1 clamped) x (same for cx).
    y_lo, y_hi = tl.maximum(cy, 0), tl.minimum(tl.maximum(cy + 1, 0), h - 1)
    x_lo, x_hi = tl.maximum(cx, 0), tl.minimum(tl.maximum(cx + 1, 0), w - 1)
    y_lo, y_hi = tl.minimum(y_lo, h - 1), tl.minimum(y_hi, h - 1)
    x_lo, x_hi = tl.minimum(x_lo, w - 1), tl.minimum(x_hi, w - 1)
    v00 = tl.load(x_row + y_lo[:, None] * w + x_lo[None, :])
    v01 = tl.load(x_row + y_lo[:, None] * w + x_hi[None, :])
    v10 = tl.load(x_row + y_hi[:, None] * w + x_lo[None, :])
    v11 = tl.load(x_row + y_hi[:, None] * w + x_hi[None, :])
    y_start = _cell_start(cy, inv_scale_y, MARGIN_Y)
    x_start = _cell_start(cx, inv_scale_x, MARGIN_X)

    # Per cell: sum of w_row w_col dLoss/dv over its pixels, for the 4 (row, column) targets:
    # own (lo, lo), right (lo, hi), below (hi, lo), diagonal (hi, hi).
    s_ll = tl.zeros((CELL_Y, CELL_X), dtype=tl.float32)
    s_lh = tl.zeros((CELL_Y, CELL_X), dtype=tl.float32)
    s_hl = tl.zeros((CELL_Y, CELL_X), dtype=tl.float32)
    s_hh = tl.zeros((CELL_Y, CELL_X), dtype=tl.float32)
    for u in range(SUB_Y * matched):
        ys = y_start + u
        y_ok, wy_lo, wy_hi = _tap_split(ys, cy, scale_y, h, H)
        for k in range(SUB_X):
            xs = x_start + k
            x_ok, wx_lo, wx_hi = _tap_split(xs, cx, scale_x, w, W)
            ok = y_ok[:, None] & x_ok[None, :]
            # Same association as the forward: v = ly0 (lx0 a + lx1 b) + ly1 (lx0 c + lx1 d).
            v = (wy_lo[:, None] * (wx_lo[None, :] * v00 + wx_hi[None, :] * v01)
                 + wy_hi[:, None] * (wx_lo[None, :] * v10 + wx_hi[None, :] * v11))
            ids = tl.load(seg_img + ys[:, None] * W + xs[None, :], mask=ok, other=-1)
            t = ids == sid
            s = tl.sigmoid(v)
            bce_neg, bce_pos = _softplus_pair(v)
            # d focal_elem / dv: t=1: -a (1-s)^2 ((1-s) + 2 s BCE(v,1));
            #                    t=0: (1-a) s^2 (s + 2 (1-s) BCE(v,0)).
            if BCE:  # d BCE(v, t) / dv = s - t
                d_focal = tl.where(t, s - 1.0, s)
            else:
                d_focal = tl.where(t, -ALPHA * (1.0 - s) * (1.0 - s) * ((1.0 - s) + 2.0 * s * bce_pos),
                                   (1.0 - ALPHA) * s * s * (s + 2.0 * (1.0 - s) * bce_neg))
            d_dice = (dice_i - 2.0 * t.to(tl.float32) * dice_u) * s * (1.0 - s)
            g = tl.where(ok, coef_focal * d_focal + coef_dice * d_dice, 0.0)
            g_lo = wy_lo[:, None] * g
            g_hi = wy_hi[:, None] * g
            s_ll += g_lo * wx_lo[None, :]
            s_lh += g_lo * wx_hi[None, :]
            s_hl += g_hi * wx_lo[None, :]
            s_hh += g_hi * wx_hi[None, :]
    # grad[i, j] = s_ll[i, j] + s_lh[i, j-1] + s_hl[i-1, j] + s_hh[i-1, j-1]; the shifts are
    # products with 0/1 matrices (exact in ieee fp32).
    right = _shift_matrix(CELL_X, False)
    down = _shift_matrix(CELL_Y, True)
    grad = s_ll + tl.dot(s_lh, right, input_precision="ieee")
    grad += tl.dot(down, s_hl + tl.dot(s_hh, right, input_precision="ieee"), input_precision="ieee")
    # Local row / column 0 is the halo: written by the neighbouring program.
    iy = cy[:, None]
    ix = cx[None, :]
    out_ok = (tl.arange(0, CELL_Y) >= 1)[:, None] & (tl.arange(0, CELL_X) >= 1)[None, :] & (iy < h) & (ix < w)
    tl.store(grad_x_ptr + row + iy * w + ix, grad, mask=out_ok)  # unmatched slots write zeros


def _cell_size(n_low: int, n_full: int) -> tuple[int, int]:
    """(full-res indices to try per cell, MARGIN) along one axis: the exact cell size for
    power-of-two upsampling factors (boundaries exact in fp32), else the bound plus margins."""
    factor = n_full // n_low
    if n_full % n_low == 0 and factor & (factor - 1) == 0:
        return factor, 0
    return -(-n_full // n_low) + 2, 1


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """TF32 tensor cores for the bmms when precision == "tf32"; PyTorch's settings otherwise."""
    if precision != "tf32":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _forward_split(device: torch.device, num_slots: int, pixels: int) -> int:
    """How many programs share one mask's full-res pixels: enough programs to fill the GPU
    (about 4 per SM), never fewer than ~16K pixels each."""
    wanted = triton.cdiv(4 * multiprocessor_count(device), max(num_slots, 1))
    return max(1, min(wanted, pixels // 16384))


def _slots(assignment: Tensor, per_layer: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per slot (layer l, image b, segment j), layer-major [L*B*M]: the row of X (see
    :func:`matched_logits`: ``b * L*M + l * M + j`` with shared pixel embeddings, the slot itself
    ``(l * B + b) * M + j`` with per-layer ones) holding its logits, its image, its segment id (-2
    for an unmatched slot: the kernels skip it) and its layer; int32."""
    num_layers, batch, m = assignment.shape
    slot = torch.arange(num_layers * batch * m, device=assignment.device, dtype=torch.int32)
    layer, image, seg = slot // (batch * m), (slot // max(m, 1)) % batch, slot % max(m, 1)
    rows = slot if per_layer else image * (num_layers * m) + layer * m + seg
    seg_ids = torch.where(assignment.reshape(-1) >= 0, seg, torch.full_like(seg, -2))
    return rows, image, seg_ids, layer


def _matched_embeddings(mask_embed: Tensor, assignment: Tensor, per_layer: bool) -> Tensor:
    """mask_embed [L,B,Q,C], assignment [L,B,M] -> fp32 embeddings matched to each (layer, segment)
    slot, zero rows for unmatched slots, in the row order of X: [B, L*M, C] (shared pixel
    embeddings) or [L*B, M, C] (per-layer ones)."""
    num_layers, batch, _, channels = mask_embed.shape
    m = assignment.shape[-1]
    query = assignment.clamp_min(0)[..., None].expand(num_layers, batch, m, channels)
    embed = mask_embed.float().gather(2, query) * (assignment >= 0)[..., None]  # [L, B, M, C]
    if per_layer:
        return embed.reshape(num_layers * batch, m, channels)
    return embed.permute(1, 0, 2, 3).reshape(batch, num_layers * m, channels)


def _flat_pixels(pixel_embed: Tensor) -> Tensor:
    """pixel_embed [B,C,h,w] or [L,B,C,h,w] -> fp32 [B or L*B, C, h*w] (a view when fp32)."""
    channels, h, w = pixel_embed.shape[-3:]
    return pixel_embed.float().reshape(-1, channels, h * w)


def matched_logits(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, precision: str) -> Tensor:
    """Low-res logits of the matched queries of all layers, ``X = E_matched @ P``: fp32 rows of
    h*w (zero rows for unmatched slots), one bmm that reads every pixel embedding once:
    - shared pixel_embed [B,C,h,w]: X [B, L*M, h*w], row l*M + j of image b = segment j at layer
      l (the bmm runs over images: one read of each map serves all layers);
    - per-layer pixel_embed [L,B,C,h,w] (EoMT): X [L*B, M, h*w], row j of problem l*B + b (the
      bmm runs over (layer, image) pairs, each reading its own map).
    Shared by the full-resolution mask loss and the point-sampled loss (kernels/point_loss.py)."""
    embed = _matched_embeddings(mask_embed, assignment, pixel_embed.dim() == 5)
    with _matmul_precision(precision):
        return torch.bmm(embed, _flat_pixels(pixel_embed))


def matched_logits_backward(grad_low: Tensor, mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor,
                            precision: str) -> tuple[Tensor, Tensor]:
    """The adjoint of :func:`matched_logits`: grad_low fp32 (X's layout) -> fp32 gradients shaped
    like mask_embed [L,B,Q,C] and pixel_embed ([L,]B,C,h,w) (``grad P = E^T @ grad X``: one
    product written once for all layers)."""
    num_layers, batch, num_queries, channels = mask_embed.shape
    m = assignment.shape[-1]
    per_layer = pixel_embed.dim() == 5
    embed = _matched_embeddings(mask_embed, assignment, per_layer)
    pixel = _flat_pixels(pixel_embed)
    with _matmul_precision(precision):
        grad_embed = torch.bmm(grad_low, pixel.transpose(1, 2))  # X's rows x C
        grad_pixel = torch.bmm(embed.transpose(1, 2), grad_low).view(pixel_embed.shape)
    # Back to [L,B,Q,C]: matched slots hold distinct queries; unmatched ones add exact zeros.
    if per_layer:
        grad_embed = grad_embed.view(num_layers, batch, m, channels)
    else:
        grad_embed = grad_embed.view(batch, num_layers, m, channels).permute(1, 0, 2, 3)
    grad_embed = grad_embed * (assignment >= 0)[..., None]
    query = assignment.clamp_min(0)[..., None].expand(num_layers, batch, m, channels)
    grad_mask_embed = torch.zeros(num_layers, batch, num_queries, channels, device=grad_low.device,
                                  dtype=torch.float32).scatter_add(2, query, grad_embed)
    return grad_mask_embed, grad_pixel


@triton_operator("mask_loss_forward")
def mask_loss_forward(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor,
                      num_masks: Tensor, precision: str, loss: str = "focal") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-layer focal and dice (fp32 [L]) of the matched masks, plus what the backward reads:
    the matched low-res logits X (:func:`matched_logits`) and the per-slot sums [L*B*M, 4].

    mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] shared by the layers or [L,B,C,h,w] per layer
    (any float dtype, any strides); assignment int64
    [L,B,M]: the query matched to segment j of image b at layer l, or -1; seg_maps int32 [B,H,W]
    padded with -1; num_masks: 0-d fp32, the normaliser; precision "ieee" | "tf32"; loss "focal"
    (MaskFormer) | "bce" (Mask2Former's sigmoid BCE in place of the focal term).
    """
    num_layers, batch = mask_embed.shape[:2]
    m = assignment.shape[-1]
    h, w = pixel_embed.shape[-2:]
    H, W = seg_maps.shape[-2:]
    low = matched_logits(mask_embed, pixel_embed, assignment, precision)  # [B, L*M, hw] or [L*B, M, hw]
    rows, images, seg_ids, _ = _slots(assignment, pixel_embed.dim() == 5)
    num_slots = rows.numel()
    split = _forward_split(low.device, num_slots, H * W)
    partial = torch.zeros(num_slots, split, 4, dtype=torch.float32, device=low.device)
    if num_slots and H * W:
        launch(_mask_loss_fwd_kernel, (num_slots * split,), low, rows, images, seg_ids, seg_maps, partial,
               h, w, H, W, h / H, w / W, split, ALPHA=FOCAL_ALPHA, BCE=loss == "bce")
    stats = partial.sum(1)  # [L*B*M, 4]
    focal = stats[:, 0] / (H * W)
    dice = 1 - (2 * stats[:, 3] + 1) / (stats[:, 1] + stats[:, 2] + 1)
    matched = (assignment >= 0).reshape(num_layers, batch * m).float()
    focal = (focal.view(num_layers, batch * m) * matched).sum(-1) / num_masks
    dice = (dice.view(num_layers, batch * m) * matched).sum(-1) / num_masks
    return focal, dice, low, stats


@triton_operator("mask_loss_backward")
def mask_loss_backward(grad_focal: Tensor, grad_dice: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                       assignment: Tensor, seg_maps: Tensor, num_masks: Tensor, low: Tensor, stats: Tensor,
                       precision: str, loss: str = "focal") -> tuple[Tensor, Tensor]:
    """Gradients (fp32, shaped like mask_embed [L,B,Q,C] and pixel_embed ([L,]B,C,h,w)) of
    ``sum_l grad_focal[l] focal[l] + grad_dice[l] dice[l]``; low, stats from the forward."""
    h, w = pixel_embed.shape[-2:]
    H, W = seg_maps.shape[-2:]
    rows, images, seg_ids, layers = _slots(assignment, pixel_embed.dim() == 5)
    grad_out = (torch.stack([grad_focal, grad_dice], 1).float() / num_masks).contiguous()  # [L, 2]
    # Rows of unmatched slots keep a zero gradient (the kernel writes zeros there).
    grad_low = torch.zeros_like(low)
    (sub_y, margin_y), (sub_x, margin_x) = _cell_size(h, H), _cell_size(w, W)
    num_slots = rows.numel()

    def grid(meta):
        return (num_slots * triton.cdiv(h, meta["CELL_Y"] - 1) * triton.cdiv(w, meta["CELL_X"] - 1),)

    if num_slots and H * W:
        launch(_mask_loss_bwd_kernel, grid, low, grad_low, rows, images, seg_ids, layers, seg_maps, stats, grad_out,
               h, w, H, W, h / H, w / W, H / h, W / w, 1.0, 1.0 / (H * W),
               sub_y, sub_x, MARGIN_Y=margin_y, MARGIN_X=margin_x, ALPHA=FOCAL_ALPHA, BCE=loss == "bce")
    return matched_logits_backward(grad_low, mask_embed, pixel_embed, assignment, precision)


def _setup_context(ctx, inputs, output):
    mask_embed, pixel_embed, assignment, seg_maps, num_masks, precision, loss = inputs
    ctx.save_for_backward(mask_embed, pixel_embed, assignment, seg_maps, num_masks, output[2], output[3])
    ctx.precision, ctx.loss = precision, loss
    ctx.dtypes = (mask_embed.dtype, pixel_embed.dtype)


def _backward(ctx, grad_focal, grad_dice, _grad_low, _grad_stats):
    mask_embed, pixel_embed, assignment, seg_maps, num_masks, low, stats = ctx.saved_tensors
    zeros = stats.new_zeros(mask_embed.shape[0])
    grad_focal = zeros if grad_focal is None else grad_focal
    grad_dice = zeros if grad_dice is None else grad_dice
    grad_embed, grad_pixel = mask_loss_backward(grad_focal, grad_dice, mask_embed, pixel_embed, assignment,
                                                seg_maps, num_masks, low, stats, ctx.precision, ctx.loss)
    return grad_embed.to(ctx.dtypes[0]), grad_pixel.to(ctx.dtypes[1]), None, None, None, None, None


mask_loss_forward.register_autograd(_backward, setup_context=_setup_context)


def mask_loss(mask_embed: Tensor, pixel_embed: Tensor, assignment: Tensor, seg_maps: Tensor, num_masks: Tensor,
              precision: str = "ieee", loss: str = "focal") -> tuple[Tensor, Tensor]:
    """Focal and dice loss (fp32 [L], differentiable) of the matched masks of all layers; see
    :func:`mask_loss_forward` for the arguments (validated by ``fastmaskformer.ops.mask_loss``)."""
    if precision not in LOSS_PRECISIONS:
        raise ValueError(f"mask_loss: precision must be one of {LOSS_PRECISIONS}, got {precision!r}")
    if loss not in ("focal", "bce"):
        raise ValueError(f"mask_loss: loss must be 'focal' or 'bce', got {loss!r}")
    focal, dice, _, _ = torch.ops.fastmaskformer.mask_loss_forward(mask_embed, pixel_embed, assignment, seg_maps,
                                                                   num_masks, precision, loss)
    return focal, dice
