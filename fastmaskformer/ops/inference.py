"""Semantic, panoptic and instance inference from the lazy outputs (DESIGN 4).

Resampling follows the official post-processing exactly: mask logits are bilinearly upsampled
(align_corners=False) to the model's input size (the padded batch tensor, ``input_size``; by
default (4h, 4w), which is exact when inputs are padded to a multiple of 32), the padding is
cropped to the image size, and the result is bilinearly resized to the original (output) size.
- semantic: the class scores ``sum_q softmax(cls)[q, :K] sigmoid(mask_q)`` are formed at the
  padded size, then cropped and resized (official order), then argmax over K.
- panoptic / instance: the mask logits themselves are cropped and resized before inference
  (official ``sem_seg_postprocess_before_inference`` for panoptic).
Inference reads the final prediction: ``class_logits [B,Q,K+1]``, ``mask_embed [B,Q,C]`` and
``pixel_embed [B,C,h,w]``, or per-prediction features ``[L,B,C,h,w]`` (EoMT), of which the
final ``pixel_embed[-1]`` is read (a view: nothing is copied).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import Size, check_embeddings, check_float, check_input_size, check_sizes, final_pixel_embed
from ._dispatch import load_kernel, resolve_impl
from ._library import reference_operator
from .mask_logits import mask_logits_reference, resampled_masks


# ---------------------------------------------------------------------------- helpers
def _check_inference_args(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                          image_sizes: Sequence[Size], output_sizes: Sequence[Size] | None,
                          input_size: Size | None):
    """Checked arguments: (the final prediction's pixel_embed [B,C,h,w], image_sizes,
    output_sizes, input_size)."""
    check_float("class_logits", class_logits, 3)
    pixel_embed = final_pixel_embed(pixel_embed)
    check_embeddings(mask_embed, pixel_embed)
    if mask_embed.dim() != 3 or class_logits.shape[:2] != mask_embed.shape[:2]:
        raise ValueError(
            f"class_logits {tuple(class_logits.shape)} must be [B,Q,K+1] and mask_embed "
            f"{tuple(mask_embed.shape)} [B,Q,C] with the same B and Q"
        )
    input_size = check_input_size(pixel_embed, input_size)
    image_sizes, output_sizes = check_sizes(image_sizes, output_sizes, class_logits.shape[0], input_size)
    return pixel_embed, image_sizes, output_sizes, input_size


def crop_and_resize(x: Tensor, image_size: Size, output_size: Size) -> Tensor:
    """x [N, Hp, Wp] at padded input size -> [N, H, W]: crop padding, bilinear resize."""
    x = x[:, : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) == tuple(output_size):
        return x
    return F.interpolate(x[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]


def resized_mask_logits_reference(mask_embed: Tensor, pixel_embed: Tensor, image_size: Size,
                                  output_size: Size, input_size: Size | None = None) -> Tensor:
    """One image: mask_embed [q,C], pixel_embed [C,h,w] -> logits [q, H, W] at output size
    (upsampled to ``input_size``, default (4h, 4w), cropped to ``image_size``, resized)."""
    input_size = check_input_size(pixel_embed, input_size)
    logits = mask_logits_reference(mask_embed[None], pixel_embed[None], input_size)[0]
    return crop_and_resize(logits, image_size, output_size)


# ---------------------------------------------------------------------------- semantic
def semantic_scores_reference(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                              image_size: Size, output_size: Size, input_size: Size | None = None) -> Tensor:
    """One image: class_logits [Q,K+1], mask_embed [Q,C], pixel_embed [C,h,w] -> scores [K,H,W]."""
    input_size = check_input_size(pixel_embed, input_size)
    masks = mask_logits_reference(mask_embed[None], pixel_embed[None], input_size)[0].sigmoid()  # [Q,Hin,Win]
    probs = class_logits.float().softmax(-1)[:, :-1]  # [Q, K]: drop "no object"
    scores = torch.einsum("qk,qhw->khw", probs, masks)
    return crop_and_resize(scores, image_size, output_size)


# ---------------------------------------------------------------------------- semantic, tiled (CPU)
# The torch path of ``semantic_inference`` computes the reference's labels a band of output rows
# at a time: output rows [o0, o1) read a bounded band of input-size rows (2 taps each), which
# read 2 low-res mask-logit rows each, so the scores alive are [K, band, W] instead of
# [K, H, W]. The band is computed with the same floating-point operations, in the same order,
# as the untiled reference's CPU kernels, so scores (and labels) are bit-identical:
# - bilinear resize: ATen's generic CPU kernel (used when out_h + out_w > 128 and the input is
#   not channels-last): lambdas from src = scale * (dst + 0.5) - 0.5 with the fp32 scale
#   in / out, t_row = a * w0 + b * w1 along the width, then t0 * h0 + t1 * h1; with the
#   multiply-adds fused (FMA) or not as this PyTorch build computes them (probed once); the
#   default 4x mask upsampling runs ATen's own kernel on a band (exact source coordinates);
# - sigmoid: ATen's vectorised kernel, whose scalar tail (the last elements of each thread's
#   chunk, here computed the scalar way) rounds differently;
# - the class sum: the same einsum, whose result per pixel does not depend on the pixel count
#   (checked with MKL for Q >= 16 queries, K >= 8 classes and bands of >= 4096 pixels; tiny
#   GEMMs can take other BLAS kernels).
# Where that cannot be guaranteed (small outputs resized by the channels-last kernel, an
# unknown vector width, a build matching neither model, fewer queries or classes) and where
# the whole [K, H, W] fits the tile budget, the untiled reference is used.
SEMANTIC_TILE_BYTES = 64 * 2**20  # default tile: about this many bytes of [K, band, W] scores
_GRAIN = 32768  # at::internal::GRAIN_SIZE: element-wise ops run single-threaded below it
# Elements per vectorised step of ATen's element-wise loops (2 x Vectorized<float>::size());
# DEFAULT's Vectorized<float> computes each lane with the scalar functions: no tail differs.
_VEC_STEP = {"AVX512": 32, "AVX2": 16, "DEFAULT": 16}
_MIN_BAND_PIXELS, _MIN_QUERIES, _MIN_CLASSES = 4096, 16, 8


def _fma(x: Tensor, y: Tensor, z: Tensor, fused: bool) -> Tensor:
    """fp32 ``x * y + z``, rounded once (fused) or after the product too."""
    if not fused:
        return x * y + z
    return (x.double() * y.double() + z.double()).float()


def _linear_taps(in_size: int, out_size: int, start: int, stop: int, fused: bool):
    """ATen's bilinear (align_corners=False) source taps of output indices [start, stop):
    (i0, i1, lambda0, lambda1), int64 and fp32."""
    dst = torch.arange(start, stop)
    if in_size == out_size:
        return dst, dst, torch.ones(len(dst)), torch.zeros(len(dst))
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    half = torch.tensor(0.5, dtype=torch.float32)
    src = _fma(scale.expand(len(dst)), dst.float() + half, -half, fused).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    lambda1 = (src - i0.float()).clamp(0, 1)
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, 1 - lambda1, lambda1


def _resize_rows(x: Tensor, row0: int, in_size: Size, out_size: Size, rows: tuple[int, int], cols: int,
                 fused: bool) -> Tensor:
    """Output rows ``rows`` and columns [0, cols) of the bilinear resize of an [N, *in_size] map
    to ``out_size``, from ``x`` [N, band, in_w] = its rows [row0, row0 + band). The width pass
    is ATen's 1-D linear kernel (the same ``a * w0 + b * w1`` per source row as its 2-D one),
    the row pass ``t0 * h0 + t1 * h1`` is written out."""
    i0, i1, h0, h1 = _linear_taps(in_size[0], out_size[0], *rows, fused)
    first, last = int(i0[0]), int(i1[-1]) + 1  # the source rows read (taps are non-decreasing)
    t = x[:, first - row0:last - row0]
    if in_size[1] != out_size[1]:
        t = F.interpolate(t, size=out_size[1], mode="linear", align_corners=False)
    t = t[..., :cols]
    a = t.index_select(1, i0 - first)
    if in_size[0] == out_size[0]:
        return a  # lambdas (1, 0): t0 * 1 + t1 * 0
    b = t.index_select(1, i1 - first).mul_(h1[:, None])
    if fused:  # t0 * h0 + (t1 * h1) rounded once: exact in float64, then rounded to float32
        return torch.addcmul(b.double(), a, h0[:, None].double()).float()
    return b.add_(a.mul_(h0[:, None]))


def _sigmoid_as_in(x: Tensor, start: int, shape: tuple[int, int, int], total: int, step: int) -> Tensor:
    """``x.sigmoid()`` for ``x`` [Q, band, cols] = rows [start, start + band), columns [0, cols)
    of a contiguous [Q, H, W] (``shape``) map, each element rounded as ATen's kernel rounds it
    there: the vectorised way, except in the scalar tail of each thread's chunk of the map's
    ``total`` elements."""
    flat = x.reshape(-1)
    n, out = flat.numel(), torch.empty(x.shape, dtype=x.dtype)
    out_flat, main = out.view(-1), n - n % step
    piece = _GRAIN // step * step  # below the grain: one thread; a multiple of the step: all vectorised
    for begin in range(0, main, piece):
        torch.sigmoid(flat[begin:min(main, begin + piece)], out=out_flat[begin:min(main, begin + piece)])
    if main < n:  # the last elements, padded to one vectorised step
        last = torch.zeros(step, dtype=x.dtype)
        last[:n - main] = flat[main:]
        out_flat[main:] = last.sigmoid()[:n - main]
    _, height, width = shape
    band, cols = x.shape[1], x.shape[2]
    threads = max(1, min(torch.get_num_threads(), -(-total // _GRAIN)))
    chunk = -(-total // threads)
    for begin in range(0, total, chunk):
        end = min(total, begin + chunk)
        tail = torch.arange(end - (end - begin) % step, end)  # ATen's scalar loop (< step elements)
        q, row, col = tail // (height * width), tail // width % height - start, tail % width
        inside = (row >= 0) & (row < band) & (col < cols)
        if bool(inside.any()):
            q, row, col = q[inside], row[inside], col[inside]
            out[q, row, col] = x[q, row, col].sigmoid()
    return out


def _upsample4_rows(logits: Tensor, rows: tuple[int, int], cols: int) -> Tensor | None:
    """Rows ``rows``, columns [0, cols) of ``logits`` [Q, h, w] upsampled 4x (the default
    input size), with ATen's own kernel on a band of low-res rows: at scale 1/4 every source
    coordinate is exact, so the band's coordinates are the full map's shifted by a whole row.
    The band's first two and last two output rows (clamped differently) are never used. None
    where the band would take ATen's channels-last kernel (out_h + out_w <= 128)."""
    (r0, r1), (h, w) = rows, logits.shape[-2:]
    s0, s1 = max(0, r0 // 4 - 1), min(h, (r1 - 1) // 4 + 2)
    if 4 * (s1 - s0) + 4 * w <= 128:
        return None
    band = logits[None, :, s0:s1].contiguous()
    up = F.interpolate(band, size=(4 * (s1 - s0), 4 * w), mode="bilinear", align_corners=False)[0]
    return up[:, r0 - 4 * s0:r1 - 4 * s0, :cols]


_FUSED_RESIZE: list = []


def _resize_model() -> bool | None:
    """Whether this build's bilinear CPU kernel fuses its multiply-adds (True / False), or None
    when neither model reproduces it; probed once on a random map."""
    if not _FUSED_RESIZE:
        g = torch.Generator().manual_seed(0)
        found = None
        for in_size, out_size in (((13, 17), (97, 131)), ((97, 131), (61, 200))):
            x = torch.randn(5, *in_size, generator=g) * 4  # 5 maps: 3 take the channels-last kernel on 1 thread
            ref = F.interpolate(x[None], size=out_size, mode="bilinear", align_corners=False)[0]
            ok = [f for f in (True, False)
                  if torch.equal(_resize_rows(x, 0, in_size, out_size, (0, out_size[0]), out_size[1], f), ref)]
            found = ok[0] if ok and found in (None, ok[0]) else None
            if found is None:
                break
        _FUSED_RESIZE.append(found)
    return _FUSED_RESIZE[0]


def _tileable(num_queries: int, num_classes: int, input_size: Size, logits_size: Size, image_size: Size,
              output_size: Size) -> bool | None:
    """The resize model (fused or not) when the tiled path reproduces the reference, else None."""
    if torch.backends.cpu.get_cpu_capability() not in _VEC_STEP:
        return None
    if num_queries < _MIN_QUERIES or num_classes < _MIN_CLASSES:  # tiny GEMMs: BLAS kernels vary with N
        return None
    for src, dst in ((logits_size, input_size), (image_size, output_size)):
        if tuple(src) != tuple(dst) and sum(dst) <= 128:  # ATen's channels-last kernel: not modelled
            return None
    return _resize_model()


@torch.no_grad()
def semantic_labels_tiled(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, image_size: Size,
                          output_size: Size, input_size: Size | None = None,
                          tile: int | None = None) -> tuple[Tensor, Tensor]:
    """One image on the CPU: ``semantic_scores_reference(...).max(0)`` -> (score, labels) [H, W],
    bit-identical, computed ``tile`` output rows at a time (default: about
    ``SEMANTIC_TILE_BYTES`` of [K, band, W] scores), so the scores alive are O(K x tile x W), not
    O(K x H x W). Falls back to the untiled reference where it cannot reproduce it exactly."""
    input_size = check_input_size(pixel_embed, input_size)
    logits_size = (int(pixel_embed.shape[-2]), int(pixel_embed.shape[-1]))
    (ih, iw), (oh, ow) = image_size, output_size
    num_classes = class_logits.shape[-1] - 1
    whole = 4 * num_classes * max(input_size[0] * input_size[1], oh * ow) <= SEMANTIC_TILE_BYTES
    fused = None
    if class_logits.device.type == "cpu" and not (tile is None and whole):
        fused = _tileable(mask_embed.shape[0], num_classes, input_size, logits_size, image_size, output_size)
    if fused is None:
        return semantic_scores_reference(class_logits, mask_embed, pixel_embed, image_size, output_size,
                                         input_size).max(0)
    if tile is None:
        rows = SEMANTIC_TILE_BYTES // (4 * max(num_classes, 1) * max(iw, ow))
        tile = max(1, (rows - 3) * oh // ih)
    probs = class_logits.float().softmax(-1)[:, :-1]  # [Q, K]
    logits = mask_logits_reference(mask_embed[None], pixel_embed[None])[0]  # [Q, h, w], small
    num_queries = logits.shape[0]
    total = num_queries * input_size[0] * input_size[1]  # the reference's sigmoid input
    step = _VEC_STEP[torch.backends.cpu.get_cpu_capability()]
    score = torch.empty(output_size, dtype=torch.float32)
    labels = torch.empty(output_size, dtype=torch.int64)
    for o0 in range(0, oh, tile):
        o1 = min(oh, o0 + tile)
        if (ih, iw) == (oh, ow):
            r0, r1 = o0, o1
        else:
            i0, i1, _, _ = _linear_taps(ih, oh, o0, o1, fused)
            r0, r1 = int(i0.min()), int(i1.max()) + 1  # input-size rows this tile reads
        # At least _MIN_BAND_PIXELS per class in the class sum: a GEMM over very few pixels may
        # take another BLAS kernel (another summation order) than the reference's.
        want = -(-_MIN_BAND_PIXELS // iw)
        if r1 - r0 < want:
            r1 = min(ih, r0 + want)
            r0 = max(0, r1 - want)
        up = None
        if logits_size == tuple(input_size):
            up = logits[:, r0:r1, :iw]
        elif tuple(input_size) == (4 * logits_size[0], 4 * logits_size[1]):
            up = _upsample4_rows(logits, (r0, r1), iw)
        if up is None:
            up = _resize_rows(logits, 0, logits_size, input_size, (r0, r1), iw, fused)  # [Q, band, iw]
        masks = _sigmoid_as_in(up, r0, (num_queries, *input_size), total, step)
        scores = torch.einsum("qk,qhw->khw", probs, masks)  # [K, band, iw]
        del up, masks
        if (ih, iw) != (oh, ow):
            scores = _resize_rows(scores, r0, (ih, iw), (oh, ow), (o0, o1), ow, fused)
        else:
            scores = scores[:, o0 - r0:o1 - r0]
        score[o0:o1], labels[o0:o1] = scores.max(0)
        del scores
    return score, labels


def semantic_inference(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                       image_sizes: Sequence[Size], output_sizes: Sequence[Size] | None = None,
                       return_score: bool = False, input_size: Size | None = None,
                       precision: str | None = None, impl: str = "auto"):
    """Per-pixel ``argmax_c sum_q p_q(c) sigmoid(m_q)`` at each image's output size.

    class_logits [B,Q,K+1], mask_embed [B,Q,C], pixel_embed [B,C,h,w] or [L,B,C,h,w] (module
    docstring: pixel_embed[-1] is read); image_sizes: unpadded
    input (h_i, w_i); output_sizes: original (H_i, W_i) (default: image_sizes); input_size: the
    model input (padded batch) size, default (4h, 4w). precision: the fused kernel's class-sum
    precision, "tf32" (default: the sum only feeds an argmax; labels can differ from exact fp32
    where the top two scores are within ~4e-3), "tf32x3" (~fp32), "ieee" (exact fp32 products)
    or "bf16" (fastest; within ~2e-2); the torch reference always computes in fp32.
    Returns a list of int64 [H_i, W_i] labels (with ``return_score``: (labels, float32 score)).
    """
    pixel_embed, image_sizes, output_sizes, input_size = _check_inference_args(
        class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, input_size)
    args = (class_logits, mask_embed, pixel_embed, [v for size in image_sizes for v in size],
            [v for size in output_sizes for v in size], list(input_size), return_score)
    if resolve_impl(impl, class_logits, mask_embed, pixel_embed, op="semantic_inference") == "triton":
        kernel = load_kernel("semantic", "semantic_inference")
        labels, score = torch.ops.fastmaskformer.semantic_inference(*args, precision or kernel.DEFAULT_PRECISION)
    else:
        labels, score = torch.ops.fastmaskformer.semantic_inference_reference(*args)
    return _split_images(labels, score if return_score else None, output_sizes)


@reference_operator("semantic_inference_reference")
def semantic_inference_reference(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                                 image_sizes: list[int], output_sizes: list[int], input_size: list[int],
                                 return_score: bool) -> tuple[Tensor, Tensor]:
    """The reference of the ``semantic_inference`` operator: per image, labels (and scores) tiled
    over output rows (no image's [K, H, W] scores are ever alive, none kept across images).
    Sizes flattened [2B]; returns int64 labels and fp32 scores (empty without ``return_score``),
    flat [sum H_i W_i] in image order."""
    labels, scores = [], []
    for b in range(class_logits.shape[0]):
        score, label = semantic_labels_tiled(class_logits[b], mask_embed[b], pixel_embed[b],
                                             image_sizes[2 * b:2 * b + 2], output_sizes[2 * b:2 * b + 2], input_size)
        labels.append(label.flatten())
        if return_score:
            scores.append(score.flatten())
        del score, label
    flat = torch.cat(labels) if labels else class_logits.new_empty(0, dtype=torch.int64)
    return flat, torch.cat(scores) if scores else class_logits.new_empty(0, dtype=torch.float32)


def semantic_inference_tta(views: Iterable[dict], output_size: Size, precision: str | None = None,
                           impl: str = "auto") -> Tensor:
    """Multi-scale / flip test-time augmentation: average of the views' class scores at the
    original resolution, then argmax (detectron2's SemanticSegmentorWithTTA).

    Each view is a dict with ``class_logits [Q,K+1]``, ``mask_embed [Q,C]``, ``pixel_embed
    [C,h,w]``, ``image_size`` (unpadded input size of that view), optionally ``input_size``
    (that view's model input size, default (4h, 4w)) and ``flipped`` (bool: the view's input
    was flipped horizontally). ``precision`` as in :func:`semantic_inference`. Returns int64
    labels [H, W].
    """
    views = [dict(v) for v in views]
    if not views:
        raise ValueError("semantic_inference_tta needs at least one view")
    for i, v in enumerate(views):
        missing = {"class_logits", "mask_embed", "pixel_embed", "image_size"} - set(v)
        if missing:
            raise ValueError(f"TTA view {i} lacks {sorted(missing)}")
        v["input_size"] = check_input_size(v["pixel_embed"], v.get("input_size"))
        check_sizes([v["image_size"]], [output_size], 1, v["input_size"])
    num_classes = {v["class_logits"].shape[-1] for v in views}
    if len(num_classes) != 1:
        raise ValueError(f"all TTA views need the same number of classes, got {sorted(num_classes)}")
    args = ([v["class_logits"] for v in views], [v["mask_embed"] for v in views], [v["pixel_embed"] for v in views],
            [int(x) for v in views for x in v["image_size"]], [int(x) for v in views for x in v["input_size"]],
            [bool(v.get("flipped", False)) for v in views], [int(x) for x in output_size])
    if resolve_impl(impl, *args[0], *args[1], *args[2], op="semantic_inference_tta") == "triton":
        kernel = load_kernel("semantic", "semantic_inference_tta")
        return torch.ops.fastmaskformer.semantic_inference_tta(*args, precision or kernel.DEFAULT_PRECISION)
    return torch.ops.fastmaskformer.semantic_inference_tta_reference(*args)


@reference_operator("semantic_inference_tta_reference")
def semantic_inference_tta_reference(class_logits: list[Tensor], mask_embed: list[Tensor], pixel_embed: list[Tensor],
                                     image_sizes: list[int], input_sizes: list[int], flipped: list[bool],
                                     output_size: list[int]) -> Tensor:
    """Views v: class_logits [Q_v,K+1], mask_embed [Q_v,C], pixel_embed [C,h_v,w_v]; image_sizes,
    input_sizes flattened [2V]; flipped [V] -> int64 labels [H,W]: argmax of the mean of the
    views' class scores at ``output_size`` (flipped views flipped back)."""
    total = None
    for v in range(len(class_logits)):
        scores = semantic_scores_reference(class_logits[v], mask_embed[v], pixel_embed[v], image_sizes[2 * v:2 * v + 2],
                                           output_size, input_sizes[2 * v:2 * v + 2])
        if flipped[v]:
            scores = scores.flip(-1)
        total = scores if total is None else total + scores
    return (total / len(class_logits)).argmax(0)


def _split_images(labels: Tensor, score: Tensor | None, output_sizes: Sequence[Size]) -> list:
    """Flat per-pixel results of all images [sum H_i W_i] -> per image [H_i, W_i] (with scores:
    (labels, score) pairs)."""
    out, start = [], 0
    for H, W in output_sizes:
        lab = labels[start:start + H * W].view(H, W)
        out.append(lab if score is None else (lab, score[start:start + H * W].view(H, W)))
        start += H * W
    return out


# ---------------------------------------------------------------------------- panoptic
@reference_operator("panoptic_assign_reference")
def panoptic_assign_reference(scores: Tensor, mask_embed: Tensor, pixel_embed: Tensor, image_size: list[int],
                              output_size: list[int], input_size: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The per-pixel part of panoptic inference for one image's k kept queries.

    scores [k] (class confidence), mask_embed [k,C], pixel_embed [C,h,w] ->
    ``ids`` int64 [H,W] = argmax_k scores_k sigmoid(mask_k) (first index on ties),
    ``assigned_area`` int64 [k] (pixels won), ``mask_area`` int64 [k] (pixels with sigmoid >= 0.5).
    """
    logits = resized_mask_logits_reference(mask_embed, pixel_embed, image_size, output_size, input_size)
    winners = _panoptic_winners_cpu if logits.device.type == "cpu" else _panoptic_winners_dense
    ids, mask_area = winners(scores.float(), logits)
    flat = ids.flatten()
    assigned_area = torch.zeros(scores.shape[0], dtype=torch.int64, device=ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    return ids, assigned_area, mask_area


def _panoptic_winners_dense(scores: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """scores float [k], mask logits [k,H,W] -> (argmax_k scores_k sigmoid(logits_k) int64 [H,W],
    pixels with sigmoid >= 0.5 int64 [k]) over whole [k,H,W] tensors (the GPU formulation)."""
    masks = logits.sigmoid()
    return (scores[:, None, None] * masks).argmax(0), (masks >= 0.5).flatten(1).sum(1)


def _panoptic_winners_cpu(scores: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """scores float [k], mask logits [k,H,W] -> (argmax_k scores_k sigmoid(logits_k) int64 [H,W],
    first index on ties; pixels with sigmoid >= 0.5 int64 [k]), one query at a time: a running
    maximum over [H,W] planes that stay in cache, instead of sigmoid, product, a dim-0 argmax and a
    bool -> int64 count over [k,H,W] (about 3x faster on the CPU at k = 100, 512 px). The same
    products and the same winners (a later query wins only when strictly greater), except on
    NaN probabilities, which argmax would pick."""
    k = logits.shape[0]
    mask_area = torch.empty(k, dtype=torch.int64)
    ids = torch.zeros(logits.shape[1:], dtype=torch.int64)
    best = None
    for i in range(k):
        prob = logits[i].sigmoid()
        mask_area[i] = torch.count_nonzero(prob >= 0.5)
        value = prob.to(torch.float32).mul_(scores[i])
        if best is None:
            best = value
        else:
            better = value > best
            ids.masked_fill_(better, i)
            best = torch.where(better, value, best)
    return ids, mask_area


def assemble_panoptic(classes: Sequence[int], scores: Sequence[float], assigned_area: Sequence[int],
                      mask_area: Sequence[int], overlap_threshold: float, thing_classes: set[int],
                      confident_area: Sequence[int] | None = None):
    """Turn per-query areas into segments (official general inference), O(k) python.

    Returns ``lut`` (int32 list: kept query -> segment id, 0 = void) and ``segments_info``.
    A query with no assigned pixels, no confident pixels, or whose assigned area is below
    ``overlap_threshold`` of its confident area is dropped; stuff queries of one class merge.
    ``confident_area`` (Mask2Former / EoMT): per query the pixels it wins where it is also
    confident; a query with none is dropped too.
    """
    lut = [0] * len(classes)
    segments_info: list[dict] = []
    stuff_ids: dict[int, int] = {}
    both = confident_area if confident_area is not None else [1] * len(classes)
    for k, (cls, score, area, full, won) in enumerate(zip(classes, scores, assigned_area, mask_area, both)):
        if area <= 0 or full <= 0 or won <= 0 or area / full < overlap_threshold:
            continue
        isthing = cls in thing_classes
        if not isthing and cls in stuff_ids:
            lut[k] = stuff_ids[cls]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_ids[cls] = segment_id
        lut[k] = segment_id
        segments_info.append({"id": segment_id, "category_id": int(cls), "isthing": bool(isthing),
                              "score": float(score)})
    return lut, segments_info


def panoptic_inference(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                       image_sizes: Sequence[Size], output_sizes: Sequence[Size] | None = None,
                       object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                       thing_classes: Iterable[int] = (), input_size: Size | None = None,
                       confident_pixels: bool = False, impl: str = "auto"):
    """General inference (DESIGN 4): list of (int32 id map [H_i,W_i], segments_info).

    Queries are kept when their argmax class is not "no object" and its probability exceeds
    ``object_mask_threshold``; ``thing_classes`` holds the contiguous ids of thing classes;
    ``input_size``: the model input (padded batch) size, default (4h, 4w).
    ``confident_pixels``: the official Mask2Former / EoMT rule, where a segment holds only the
    pixels its query wins *and* where that query's mask probability is >= 0.5 (the others are
    void) and a query needs at least one such pixel (MaskFormer's rule, the default, gives a
    query every pixel it wins). It resamples the kept queries' masks [k, H, W] once more to read
    each pixel's winner: the fused assignment does not return it.
    """
    pixel_embed, image_sizes, output_sizes, input_size = _check_inference_args(
        class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, input_size)
    if resolve_impl(impl, class_logits, mask_embed, pixel_embed, op="panoptic_inference") == "triton":
        load_kernel("panoptic", "panoptic_inference")
        assign = torch.ops.fastmaskformer.panoptic_assign
    else:
        assign = torch.ops.fastmaskformer.panoptic_assign_reference
    thing_classes = {int(c) for c in thing_classes}
    num_classes = class_logits.shape[-1] - 1
    results = []
    for b in range(class_logits.shape[0]):
        scores, labels = class_logits[b].float().softmax(-1).max(-1)
        keep = (labels != num_classes) & (scores > object_mask_threshold)
        id_map = torch.zeros(output_sizes[b], dtype=torch.int32, device=class_logits.device)
        if not bool(keep.any()):
            results.append((id_map, []))
            continue
        ids, assigned, full = assign(scores[keep], mask_embed[b][keep], pixel_embed[b],
                                     list(image_sizes[b]), list(output_sizes[b]), list(input_size))
        confident, confident_area = None, None
        if confident_pixels:
            probs = resampled_masks(mask_embed[b][keep][None], pixel_embed[b][None], image_sizes[b], output_sizes[b],
                                    input_size, True, torch.float32, impl)[0]  # [k, H, W]
            confident = probs.gather(0, ids.long()[None])[0] >= 0.5  # [H, W]: the winner is confident
            del probs
            confident_area = torch.bincount(ids.long()[confident], minlength=int(keep.sum())).tolist()
        lut, segments_info = assemble_panoptic(labels[keep].tolist(), scores[keep].tolist(),
                                               assigned.tolist(), full.tolist(), overlap_threshold,
                                               thing_classes, confident_area)
        lut = torch.tensor(lut, dtype=torch.int32, device=ids.device)
        id_map = lut[ids]
        results.append((id_map if confident is None else id_map * confident, segments_info))
    return results


# ---------------------------------------------------------------------------- instance
def instance_count(num_queries: int, num_classes: int, topk: int | None) -> int:
    """How many (query, class) pairs instance inference keeps: ``topk`` (default Q), at most Q*K."""
    return num_queries if topk is None else min(int(topk), num_queries * num_classes)


def instance_inference(class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                       image_sizes: Sequence[Size], output_sizes: Sequence[Size] | None = None,
                       topk: int | None = None, input_size: Size | None = None,
                       impl: str = "auto") -> list[dict]:
    """Mask2Former-style instance inference (not in the official MaskFormer release).

    The top ``topk`` (default Q) of the Q*K (query, class) probabilities; mask = logit > 0;
    score = class prob x mean mask probability inside the mask. Returns per image a dict with
    ``masks`` bool [N,H,W], ``scores`` float32 [N], ``labels`` int64 [N], sorted by the
    class probability (descending). ``input_size``: the model input size, default (4h, 4w).
    """
    pixel_embed, image_sizes, output_sizes, input_size = _check_inference_args(
        class_logits, mask_embed, pixel_embed, image_sizes, output_sizes, input_size)
    num_queries, num_classes = class_logits.shape[1], class_logits.shape[-1] - 1
    topk = instance_count(num_queries, num_classes, topk)
    results = []
    for b in range(class_logits.shape[0]):
        probs = class_logits[b].float().softmax(-1)[:, :-1]  # [Q, K]
        top_scores, flat = probs.flatten().topk(topk, sorted=True)
        query, label = flat // num_classes, flat % num_classes
        logits = resampled_masks(mask_embed[b][query][None], pixel_embed[b][None], image_sizes[b], output_sizes[b],
                                 input_size, False, torch.float32, impl)[0]  # [N,H,W]
        masks = logits > 0
        inside = masks.flatten(1).float()
        mask_score = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
        results.append({"masks": masks, "scores": top_scores * mask_score, "labels": label})
    return results
