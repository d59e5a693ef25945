"""Roofline model: what each fused kernel and its eager reference must move and compute at the
benchmark sizes (DESIGN 7), their lower-bound times on H100 / H200 / A100, and the predicted
speed-up of fused over eager.

    python benchmarks/roofline.py                 # writes benchmarks/results/roofline.{json,md}

Eager side: the reference ops are *traced* (a TorchDispatchMode over every aten op, on the
``meta`` device: shapes only, nothing is computed), so its numbers are those of the code the
benchmarks time: per op, bytes read + written, CUDA-core FLOPs (fp32 matmuls count here: the
benchmarks run eager with TF32 off), special-function ops (exp, log, reciprocal: the SFUs), and
one kernel launch per op. Fused side: the kernels' work written out from their algorithms
(kernels/*.py), counting HBM bytes with the L2 reuse the launch order is built for.

Lower bound of one kernel = max(bytes / HBM bandwidth, CUDA-core FLOPs / fp32 rate + tensor-core
FLOPs / their rate, SFU ops / SFU rate) + one launch (5 us). A sequence of kernels (eager) adds
its kernels' bounds. ``run_all.py`` puts the measured times beside these numbers.

Deformable attention has a second table: the same rows with the tap reads charged only by what
misses an SM's L1 cache (``deform_cache.py`` replays each kernel's block access streams - ours,
the official CUDA extension's, ``grid_sample``'s - on the benchmark inputs).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import pathlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import deform_cache  # noqa: E402
from common import RESULTS_DIR, markdown_table  # noqa: E402

# Peak rates (dense), from the vendors' data sheets; SFU: 16 ops / clock / SM at the boost clock.
# l2_gbps: L2 bandwidth for gathers that hit in cache and for L2 atomics (no data-sheet value:
# the order of published microbenchmarks, ~1.6x HBM on H100, ~2x on A100).
HARDWARE = {
    "H100": dict(name="H100 SXM", hbm_gbps=3350, fp32_tflops=67, tf32_tflops=495, bf16_tflops=989,
                 sfu_tops=16 * 132 * 1.98e9 / 1e12, l2_gbps=5500),
    "H200": dict(name="H200 SXM", hbm_gbps=4800, fp32_tflops=67, tf32_tflops=495, bf16_tflops=989,
                 sfu_tops=16 * 132 * 1.98e9 / 1e12, l2_gbps=5500),
    "A100": dict(name="A100 SXM", hbm_gbps=2039, fp32_tflops=19.5, tf32_tflops=156, bf16_tflops=312,
                 sfu_tops=16 * 108 * 1.41e9 / 1e12, l2_gbps=4000),
}
LAUNCH_US = 5.0
TC_RATE = {"tf32": "tf32_tflops", "bf16": "bf16_tflops"}


@dataclasses.dataclass
class Work:
    """What a kernel (or a sum of kernels) moves and computes."""
    bytes: float = 0.0
    fp32_flops: float = 0.0  # CUDA cores (fp32 FMA counts 2)
    tc_flops: dict = dataclasses.field(default_factory=dict)  # tensor cores, per input type
    sfu: float = 0.0  # exp / log / reciprocal
    kernels: int = 0
    l2_bytes: float = 0.0  # traffic served by L2 (cached gathers, atomics), beside the DRAM bytes

    def add(self, other: "Work") -> "Work":
        tc = dict(self.tc_flops)
        for k, v in other.tc_flops.items():
            tc[k] = tc.get(k, 0.0) + v
        return Work(self.bytes + other.bytes, self.fp32_flops + other.fp32_flops, tc, self.sfu + other.sfu,
                    self.kernels + other.kernels, self.l2_bytes + other.l2_bytes)

    def seconds(self, hw: dict) -> float:
        """Roofline lower bound of ONE kernel doing this work (plus its launches)."""
        compute = self.fp32_flops / (hw["fp32_tflops"] * 1e12) + sum(
            f / (hw[TC_RATE[k]] * 1e12) for k, f in self.tc_flops.items())
        return max(self.bytes / (hw["hbm_gbps"] * 1e9), self.l2_bytes / (hw["l2_gbps"] * 1e9), compute,
                   self.sfu / (hw["sfu_tops"] * 1e12)) + self.kernels * LAUNCH_US * 1e-6


def dot_work(flops: float, precision: str) -> Work:
    """A tl.dot / matmul of ``flops`` in ``precision`` (ieee: CUDA cores; tf32x3: 3 tf32 passes)."""
    if precision == "ieee":
        return Work(fp32_flops=flops)
    if precision == "tf32x3":
        return Work(tc_flops={"tf32": 3 * flops})
    return Work(tc_flops={precision: flops})


# ---------------------------------------------------------------------------- eager: traced
VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "select", "slice", "transpose", "t", "permute",
            "unsqueeze", "squeeze", "as_strided", "detach", "alias", "lift_fresh", "split", "unbind",
            "_reshape_alias", "split_with_sizes", "unflatten", "flatten", "view_as", "empty_like", "empty",
            "size", "stride", "numel", "is_same_size", "_to_copy_noop"}
SFU_PER_ELEMENT = {"exp": 1, "log": 1, "log1p": 1, "sigmoid": 2, "sigmoid_backward": 0, "softplus": 2,
                   "binary_cross_entropy_with_logits": 2, "div": 1, "reciprocal": 1, "_softmax": 1,
                   "tanh": 1, "rsqrt": 1, "sqrt": 1, "pow": 0, "log_sigmoid_forward": 2}


def _tensors(tree):
    out = []
    for x in (tree if isinstance(tree, (list, tuple)) else [tree]):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out += _tensors(x)
    return out


def _matmul_flops(name: str, args, out) -> float:
    if name in ("mm", "bmm"):
        a = args[0]
        return 2.0 * out.numel() * a.shape[-1]
    if name in ("addmm", "baddbmm"):
        a = args[1]
        return 2.0 * out.numel() * a.shape[-1]
    return 0.0


def _gather_bytes(name: str, args, outputs, gather_scale: float = 1.0) -> float:
    """L2 traffic of gathers the op's inputs + outputs do not show: bilinear ``grid_sample`` reads
    4 taps per output element, and its backward reads 4 taps and adds into 4 (float atomics).
    ``gather_scale``: the L2 bytes per tap byte of the reads (``deform_cache``; atomics in full)."""
    if name == "grid_sampler_2d" and outputs:
        return 4.0 * outputs[0].numel() * outputs[0].element_size() * gather_scale
    if name == "grid_sampler_2d_backward":
        return 4.0 * args[0].numel() * args[0].element_size() * (1.0 + gather_scale)
    return 0.0


class _Tracer(TorchDispatchMode):
    """Sums the Work of every aten op run inside it (one kernel per non-view op) and, per
    hardware, the ops' lower bounds (a sequence of kernels adds their bounds)."""

    def __init__(self, gather_scale: float = 1.0):
        super().__init__()
        self.gather_scale = gather_scale
        self.work = Work()
        self.seconds = {tag: 0.0 for tag in HARDWARE}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEW_OPS:
            return out
        inputs, outputs = _tensors(list(args) + list((kwargs or {}).values())), _tensors(out)
        nbytes = sum(t.numel() * t.element_size() for t in inputs + outputs)
        elements = max([t.numel() for t in outputs + inputs] or [0])
        flops = _matmul_flops(name, args, outputs[0]) if outputs else 0.0
        op = Work(bytes=nbytes, fp32_flops=flops or float(elements), sfu=SFU_PER_ELEMENT.get(name, 0) * elements,
                  kernels=1, l2_bytes=_gather_bytes(name, args, outputs, self.gather_scale))
        self.work = self.work.add(op)
        for tag, hw in HARDWARE.items():
            self.seconds[tag] += op.seconds(hw)
        return out


def trace(fn, gather_scale: float = 1.0) -> tuple[Work, dict]:
    """(total Work, {hardware: lower-bound seconds}) of the aten ops ``fn`` runs."""
    tracer = _Tracer(gather_scale)
    with tracer:
        fn()
    return tracer.work, tracer.seconds


# ---------------------------------------------------------------------------- the benchmark problems
B, LAYERS, Q, C, SIZE = 16, 6, 100, 256, 512
h = w = SIZE // 4
IMAGE, INPUT = (512, 683), (512, 704)


def eager_matching_cost(segments: int, classes: int) -> Work:
    from fastmaskformer.ops.matching_cost import matching_cost_reference

    meta = dict(device="meta")
    return trace(lambda: matching_cost_reference(torch.empty(LAYERS * B, Q, classes + 1, **meta),
                                                 torch.empty(LAYERS * B, Q, C, **meta), torch.empty(B, C, h, w, **meta),
                                                 torch.empty(B, h, w, dtype=torch.int32, **meta),
                                                 torch.empty(B, segments, dtype=torch.int64, **meta),
                                                 torch.full((B,), segments, dtype=torch.int64, **meta),
                                                 [1.0, 20.0, 1.0]))


# Mask2Former per GPU (the official batch 16 over 8 GPUs): 10 predictions (9 decoder layers and the
# one before them), 2 images, M = 32 matched masks per image, 12544 points (3 x as candidates, 75%
# of the loss points importance-sampled), K = 150 (ADE20K); one pixel embedding [B, 256, 128, 128]
# shared by the predictions.
M2F = dict(batch=2, layers=10, segments=32, points=12544, oversample=3, importance=0.75, classes=150,
           queries=Q, channels=C, low=h, size=SIZE, per_prediction=False)
# EoMT ViT-L on COCO panoptic at 640 (tue-mps/eomt configs/dinov2/coco/panoptic/eomt_large_640.yaml;
# its README: 4 GPUs x 4 images): 5 predictions (4 query blocks + the final one) with the same
# criterion, Q = 200, K = 133, each prediction with its own pixel features [4, 1024, 160, 160].
EOMT_L640 = dict(batch=4, layers=5, segments=32, points=12544, oversample=3, importance=0.75, classes=133,
                 queries=200, channels=1024, low=160, size=640, per_prediction=True)


def _pixel_shape(sizes: dict) -> tuple[int, ...]:
    """The pixel features: [B, C, h, w] shared by the predictions, or [L, B, C, h, w]."""
    lead = (sizes["layers"],) if sizes["per_prediction"] else ()
    return (*lead, sizes["batch"], sizes["channels"], sizes["low"], sizes["low"])


def _pixel_maps(sizes: dict) -> int:
    """Pixel feature maps the fused kernels read: one per image, or one per (prediction, image)."""
    return sizes["batch"] * (sizes["layers"] if sizes["per_prediction"] else 1)


def eager_mask_loss(segments: int, batch: int = B, layers: int = LAYERS, loss: str = "focal",
                    sizes: dict | None = None) -> Work:
    """The official per-layer loss of ``layers`` layers, forward and backward (loss "focal":
    MaskFormer, 20 focal + dice; "bce": Mask2Former's ``mask_sampling: full``, 5 BCE + 5 dice);
    ``sizes`` (M2F / EOMT_L640 layout) overrides the MaskFormer benchmark sizes."""
    from fastmaskformer.ops.mask_loss import mask_loss_reference

    sizes = sizes or dict(batch=batch, layers=layers, queries=Q, channels=C, low=h, size=SIZE, per_prediction=False)
    batch, layers = sizes["batch"], sizes["layers"]
    mask_embed = torch.empty(layers, batch, sizes["queries"], sizes["channels"], device="meta", requires_grad=True)
    pixel_embed = torch.empty(_pixel_shape(sizes), device="meta", requires_grad=True)
    assignment = torch.empty(1, batch, segments, dtype=torch.int64, device="meta")
    seg_maps = torch.empty(batch, sizes["size"], sizes["size"], dtype=torch.int32, device="meta")
    num_masks = torch.empty((), device="meta")
    first_weight = 20 if loss == "focal" else 5

    def step():
        total = 0
        for layer in range(layers):  # the official loop: one layer at a time
            pixels = pixel_embed[layer] if sizes["per_prediction"] else pixel_embed
            first, dice = mask_loss_reference(mask_embed[layer:layer + 1], pixels, assignment, seg_maps, num_masks,
                                              loss)
            dice = dice.sum() if loss == "focal" else 5 * dice.sum()  # MaskFormer's dice weight is 1
            total = total + first_weight * first.sum() + dice
        total.backward()
    return trace(step)


def eager_point_matching_cost(sizes: dict = M2F) -> Work:
    """``ops.point_loss.point_matching_cost(impl="torch")``: per layer the [B, Q, h, w] logit
    maps of every query, sampled at the shared points, and the BCE / dice cost products."""
    from fastmaskformer.ops.point_loss import point_matching_cost

    b, n, m, p, q = sizes["batch"], sizes["layers"], sizes["segments"], sizes["points"], sizes["queries"]
    meta = dict(device="meta")
    return trace(lambda: point_matching_cost(
        torch.empty(n, b, q, sizes["classes"] + 1, **meta), torch.empty(n, b, q, sizes["channels"], **meta),
        torch.empty(_pixel_shape(sizes), **meta),
        torch.empty(b, sizes["size"], sizes["size"], dtype=torch.int32, **meta),
        torch.empty(b, m, dtype=torch.int64, **meta), torch.empty(n, b, p, 2, **meta), impl="torch"))


def eager_point_loss(sizes: dict = M2F) -> Work:
    """``ops.point_loss.point_mask_loss_reference``, forward and backward, 5 BCE + 5 dice: per layer
    the [B, M, h, w] logit maps of the matched queries, the uncertainty at the candidates, top-k,
    the logits and targets at the points (the official loss's work, with the targets sampled from
    the segment maps instead of [M, H, W] float masks: fewer bytes than the official code)."""
    from fastmaskformer.ops.point_loss import point_mask_loss_reference

    b, n, m, p = sizes["batch"], sizes["layers"], sizes["segments"], sizes["points"]
    uncertain = int(sizes["importance"] * p)
    meta = dict(device="meta")
    mask_embed = torch.empty(n, b, sizes["queries"], sizes["channels"], requires_grad=True, **meta)
    pixel_embed = torch.empty(_pixel_shape(sizes), requires_grad=True, **meta)

    def step():
        bce, dice = point_mask_loss_reference(
            mask_embed, pixel_embed, torch.empty(n, b, m, dtype=torch.int64, **meta),
            torch.empty(b, sizes["size"], sizes["size"], dtype=torch.int32, **meta), torch.empty((), **meta),
            torch.empty(n, b, m, sizes["oversample"] * p, 2, **meta), torch.empty(n, b, m, p - uncertain, 2, **meta),
            uncertain)
        (5 * bce.sum() + 5 * dice.sum()).backward()
    return trace(step)


def eager_semantic(classes: int) -> Work:
    from fastmaskformer.ops.inference import semantic_scores_reference

    def run():
        for _ in range(B):
            semantic_scores_reference(torch.empty(Q, classes + 1, device="meta"), torch.empty(Q, C, device="meta"),
                                      torch.empty(C, INPUT[0] // 4, INPUT[1] // 4, device="meta"), IMAGE,
                                      IMAGE).max(0)
    return trace(run)


def eager_panoptic(kept: int) -> Work:
    from fastmaskformer.ops.inference import panoptic_assign_reference

    # one image on meta tensors (the reference's dense formulation, as on a GPU), 16 times the work
    meta = dict(device="meta")
    scores, mask_embed = torch.empty(kept, **meta), torch.empty(kept, C, **meta)
    pixel_embed = torch.empty(C, INPUT[0] // 4, INPUT[1] // 4, **meta)
    work, seconds = trace(lambda: panoptic_assign_reference(scores, mask_embed, pixel_embed, IMAGE, IMAGE))
    total = Work()
    for _ in range(B):
        total = total.add(work)
    return total, {tag: B * s for tag, s in seconds.items()}


# ---------------------------------------------------------------------------- fused: modelled
def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def fused_matching_cost(segments: int, classes: int, precision: str) -> Work:
    """kernels/matching_cost.py: per problem, query tiles of 64/128 rows (Q padded to 128), one
    segment tile (M padded to >= 16); P streamed once per image through L2 for its 6 layers."""
    n, qp, mp, hw = LAYERS * B, _pad(Q, 64), max(16, 1 << (segments - 1).bit_length()), h * w
    work = Work(bytes=4 * (B * C * hw + n * Q * C + B * hw + n * Q * (classes + 1) + n * Q * segments),
                fp32_flops=22.0 * n * qp * hw, sfu=3.0 * n * qp * hw, kernels=10)
    work = work.add(dot_work(2.0 * n * qp * C * hw, precision))  # logits
    return work.add(dot_work(4.0 * n * qp * hw * mp, precision))  # the two one-hot products


def fused_mask_loss(segments: int, precision: str, batch: int = B, layers: int = LAYERS,
                    sizes: dict | None = None) -> Work:
    """kernels/mask_loss.py, forward + backward of all layers: one bmm (and its two backward
    bmms), the forward sums and the 4-tap adjoint over every (mask, full-res pixel). The BCE
    variant (``loss="bce"``) is the same kernels with a constexpr switch: the same model. With
    per-prediction features the bmms read (and the backward writes) one map per (layer, image)."""
    sizes = sizes or dict(batch=batch, layers=layers, queries=Q, channels=C, low=h, size=SIZE, per_prediction=False)
    batch, layers, channels = sizes["batch"], sizes["layers"], sizes["channels"]
    rows, masks, hw, pixels = layers * segments, layers * batch * segments, sizes["low"] ** 2, sizes["size"] ** 2
    bmm = 2.0 * batch * rows * channels * hw
    work = Work(bytes=4 * (3 * _pixel_maps(sizes) * channels * hw + 3 * batch * rows * channels
                           + 5 * batch * rows * hw + 2 * batch * pixels),
                fp32_flops=(35.0 + 55.0) * masks * pixels, sfu=(4.0 + 4.0) * masks * pixels, kernels=12)
    return work.add(dot_work(3 * bmm, "tf32" if precision == "tf32" else "ieee"))


def fused_point_matching_cost(precision: str, sizes: dict = M2F) -> Work:
    """kernels/point_matching_cost.py, plus the torch around it (traced: class probabilities, the
    targets sampled per layer from the segment maps, the cost sums). Kernel: per (problem, query
    tile of 64) the 4 taps x C channels of every point gathered through L2 (Q padded to 128), the
    logits and the two target products as dots; every pixel map read once from DRAM (one per
    image, or one per (prediction, image) with per-prediction features)."""
    from fastmaskformer.ops.point_loss import sample_shared_point_targets

    b, n, m, p, q, c = (sizes[k] for k in ("batch", "layers", "segments", "points", "queries", "channels"))
    problems, qp, mp = n * b, _pad(q, 64), max(16, 1 << (m - 1).bit_length())
    meta = dict(device="meta")

    def torch_side():
        prob = torch.empty(n, b, q, sizes["classes"] + 1, **meta).softmax(-1).reshape(problems, q, -1)
        labels = torch.empty(b, m, dtype=torch.int64, **meta)
        cost_class = -torch.gather(prob, 2, labels.repeat(n, 1)[:, None, :].expand(-1, q, m))
        seg = torch.empty(b, sizes["size"], sizes["size"], dtype=torch.int32, **meta)
        coords = torch.empty(n, b, p, 2, **meta)
        target = sample_shared_point_targets(seg, m, coords)
        xt, st, sp, ss = (torch.empty(problems, q, m, **meta), torch.empty(problems, q, m, **meta),
                          torch.empty(problems, q, **meta), torch.empty(problems, q, **meta))
        cost_mask = (sp[:, :, None] - xt) / p
        cost_dice = 1 - (2 * st + 1) / (ss[:, :, None] + target.sum(-1).reshape(problems, 1, m) + 1)
        return 2 * cost_class + 5 * cost_mask + 5 * cost_dice

    work, _ = trace(torch_side)
    tiles = problems * (qp // 64)
    kernel = Work(bytes=4 * (_pixel_maps(sizes) * c * sizes["low"] ** 2 + problems * (q * c + 2 * p + m * p)
                             + 4 * problems * q * m),
                  l2_bytes=4.0 * tiles * p * (4 * c + m), fp32_flops=tiles * p * (8.0 * c + 64 * 12),
                  sfu=4.0 * problems * qp * p, kernels=1)
    kernel = kernel.add(dot_work(2.0 * problems * qp * p * (c + 2 * mp), precision))
    return work.add(kernel)


def fused_point_loss(precision: str, sizes: dict = M2F) -> Work:
    """kernels/point_loss.py, forward + backward of all layers: the matched logits X (one bmm) and
    its two backward bmms (one pixel map per image, or per (prediction, image)), the uncertainty
    kernel over the candidates, the torch top-k / gather / concatenation (traced), the forward
    sums and the backward's fixed-point scatter (4 int64 atomics per point through L2, the
    accumulator zeroed, converted and read by the bmms)."""
    b, n, m, p, q, c = (sizes[k] for k in ("batch", "layers", "segments", "points", "queries", "channels"))
    s, uncertain = sizes["oversample"] * p, int(sizes["importance"] * p)
    slots, rows, hw, pixels = n * b * m, n * m, sizes["low"] ** 2, sizes["size"] ** 2
    meta = dict(device="meta")

    def topk_side():
        uncertainty = torch.empty(slots, s, **meta)
        cand, extra = torch.empty(slots, s, 2, **meta), torch.empty(slots, p - uncertain, 2, **meta)
        top = uncertainty.topk(uncertain, dim=-1).indices
        chosen = torch.gather(cand, 1, top[..., None].expand(slots, uncertain, 2))
        return torch.cat([chosen, extra], 1).contiguous()

    work, _ = trace(topk_side)
    x_bytes = 4.0 * b * rows * hw
    bmm = 2.0 * b * rows * c * hw
    matmuls = Work(bytes=4.0 * 3 * _pixel_maps(sizes) * c * hw + 3 * x_bytes + 4.0 * 3 * b * rows * c
                   + 4.0 * n * b * q * c * 2, kernels=6)
    matmuls = matmuls.add(dot_work(3 * bmm, "tf32" if precision == "tf32" else "ieee"))
    uncertainty = Work(bytes=slots * s * (8.0 + 4.0), l2_bytes=slots * s * 16.0, fp32_flops=slots * s * 30.0,
                       kernels=1)
    # forward and backward kernels: points (8 B) read, 4 X taps + 4 segment-map taps from L2
    per_point = Work(bytes=2 * slots * p * 8.0 + 4.0 * b * pixels, l2_bytes=2 * slots * p * 32.0,
                     fp32_flops=slots * p * (70.0 + 90.0), sfu=slots * p * (4.0 + 3.0), kernels=2)
    scatter = Work(bytes=3 * 2 * x_bytes + x_bytes, l2_bytes=slots * p * 4 * 8.0, kernels=3)
    return work.add(matmuls).add(uncertainty).add(per_point).add(scatter)


def fused_semantic(classes: int, precision: str) -> Work:
    """kernels/semantic.py (output = image size: 4 taps) + the low-res logits matmul."""
    qp, kp, hw = max(16, 1 << (Q - 1).bit_length()), _pad(classes, 64), INPUT[0] * INPUT[1] // 16
    pixels = B * IMAGE[0] * IMAGE[1]
    work = Work(bytes=4 * (B * C * hw + 2 * B * hw * _pad(Q, 16) + B * Q * classes) + 8 * pixels,
                fp32_flops=10.0 * qp * pixels, sfu=2.0 * qp * pixels, kernels=4)
    work = work.add(dot_work(2.0 * B * Q * C * hw, "tf32" if precision == "bf16" else precision))  # logits
    return work.add(dot_work(2.0 * qp * kp * pixels, precision))


def fused_panoptic(kept: int, batch: int = B, channels: int = C, input_hw: tuple = INPUT,
                   image_hw: tuple = IMAGE) -> Work:
    """kernels/panoptic.py per image (output = image size: 4 taps), plus its low-res matmul;
    the defaults: the benchmark sizes (EoMT: ``eomt_inference``)."""
    hw, pixels = input_hw[0] * input_hw[1] // 16, batch * image_hw[0] * image_hw[1]
    kp = _pad(kept, 16)
    work = Work(bytes=4 * (batch * channels * hw + 2 * batch * hw * kp) + 8 * pixels, fp32_flops=14.0 * kp * pixels,
                sfu=2.0 * kp * pixels, kernels=3 * batch)
    return work.add(dot_work(2.0 * batch * kept * channels * hw, "ieee"))


# Mask2Former pixel decoder, one deformable-attention call (encoder self-attention: Lq = S), levels at
# strides 32/16/8 of the input; B = 2 (one GPU of the official 16-image batch) and 16.
DEFORM = dict(heads=8, dim=32, levels=3, points=4)
# deterministic: 32-bit fixed point (the default); float-atomics: deterministic=False;
# deterministic-per-tap: the default with the backward's per-tap scatter configs only (MERGE=False); the
# official CUDA extension (fp32 only: its pixel decoder runs with autocast disabled) is modelled
# beside them with the same rules.
DEFORM_VARIANTS = ("deterministic", "float-atomics", "deterministic-per-tap")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
SECTOR = 32  # bytes an isolated 4-byte access moves between L2 and the SMs


def _deform_sizes(size: int, batch: int = B):
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    tokens = sum(a * b for a, b in shapes)
    return shapes, tokens, batch * tokens * DEFORM["heads"] * DEFORM["levels"] * DEFORM["points"]


def _deform_volumes(size: int, batch: int, value_dtype: str) -> tuple[int, int, int, int]:
    """(samples, value bytes, location + weight bytes, tap elements) of one call."""
    _, tokens, samples = _deform_sizes(size, batch)
    value = batch * tokens * DEFORM["heads"] * DEFORM["dim"] * DTYPE_BYTES[value_dtype]
    return samples, value, samples * 3 * 4, samples * 4 * DEFORM["dim"]


def _deform_meta_inputs(size: int, batch: int, dtype: str, grad: bool = False):
    """value [B,S,H,D] in ``dtype``, int64 shapes, fp32 locations / weights (as autocast gives)."""
    shapes, tokens, _ = _deform_sizes(size, batch)
    hd, nl, npt = DEFORM["heads"], DEFORM["levels"], DEFORM["points"]
    meta = dict(device="meta", requires_grad=grad)
    return (torch.empty(batch, tokens, hd, DEFORM["dim"], dtype=getattr(torch, dtype), **meta), shapes,
            torch.empty(batch, tokens, hd, nl, npt, 2, **meta), torch.empty(batch, tokens, hd, nl, npt, **meta))


def eager_ms_deform_attn(size: int, phase: str, batch: int = B, dtype: str = "float32", l1: bool = False):
    """The official formulation (grid_sample per level), traced on meta tensors in ``dtype`` (as
    ``bench_ms_deform_attn.py``'s eager provider runs it: locations and weights cast to it).
    ``l1``: grid_sample's reads charged by the sectors that miss L1 (``deform_cache``)."""
    from fastmaskformer.ops.ms_deform_attn import ms_deform_attn_grid_sample

    gather_scale = deform_cache.grid_sample_miss_ratio(size, DTYPE_BYTES[dtype]) if l1 else 1.0
    grad = phase == "fwd+bwd"
    value, shapes, loc, attn = _deform_meta_inputs(size, batch, dtype, grad)

    def run():
        out = ms_deform_attn_grid_sample(value, shapes, loc.to(value.dtype), attn.to(value.dtype))
        if grad:
            out.backward(torch.empty_like(out))
    return trace(run, gather_scale)


def _deform_backward_torch_side(size: int, batch: int, dtype: str, deterministic: bool) -> Work:
    """The torch ops around the backward kernels, traced from the launcher itself
    (``kernels.ms_deform_attn._launch_backward`` on meta tensors, its Triton launches skipped):
    the zeroed accumulator (and mass, box maxima), max|grad_out| and sum|a| per (image, head),
    the float-atomic variant's cast to a 16-bit value dtype."""
    from unittest import mock

    from fastmaskformer.kernels import ms_deform_attn as kernel

    value, shapes, loc, attn = _deform_meta_inputs(size, batch, dtype)
    spatial_shapes = torch.empty(len(shapes), 2, dtype=torch.int64, device="meta")
    grad = torch.empty(batch, loc.shape[1], DEFORM["heads"] * DEFORM["dim"], dtype=value.dtype, device="meta")
    with mock.patch.object(kernel, "launch", lambda *args, **kwargs: None):
        work, _ = trace(lambda: kernel._launch_backward(grad, value, spatial_shapes, loc, attn, deterministic))
    return work


def deform_forward_l1_miss(size: int, dtype: str, official: bool = False) -> float:
    """Forward value-row bytes that miss L1 per tap byte (``deform_cache``): ours at the autotuned
    config that misses least (BLOCK_Q / warps), or the official extension's blocks."""
    from fastmaskformer.kernels.ms_deform_attn import FORWARD_CONFIG

    vb = DTYPE_BYTES[dtype]
    if official:
        return deform_cache.row_kernel_miss_ratio(size, vb, "official-fwd")
    return min(deform_cache.row_kernel_miss_ratio(size, vb, "ours-fwd", block_q=c["BLOCK_Q"], warps=c["num_warps"])
               for c in FORWARD_CONFIG["gpu"])


def deform_backward_configs(size: int, dtype: str, l1: bool) -> list[dict]:
    """Per GPU config of the backward kernel (``BACKWARD_CONFIG``): ``miss`` (its tap-read bytes
    that miss L1 per tap byte, ``deform_cache``; 1 without ``l1``), ``atomics`` (value-gradient
    atomics per tap: the distinct rows per query block and level with MERGE, else 1) and
    ``merge_flop_per_sample`` (MERGE's sort and run sums: a bitonic network of
    log2(T) (log2(T) + 1) / 2 stages of 5 operations per key over T = BLOCK_Q * P * 4 taps, and
    9 operations per tap element for the fixed-point contribution, the prefix sum, its gather and
    the difference; its reload of the block's grad_out rows hits L1 and is not charged)."""
    from fastmaskformer.kernels.ms_deform_attn import BACKWARD_CONFIG

    vb, d, npt = DTYPE_BYTES[dtype], DEFORM["dim"], DEFORM["points"]
    out = []
    for c in BACKWARD_CONFIG["gpu"]:
        block_q = c["TILE"] // d
        miss = deform_cache.row_kernel_miss_ratio(size, vb, "ours-bwd", block_q=block_q, qblocks=c["QBLOCKS"],
                                                  warps=c["num_warps"]) if l1 else 1.0
        taps = block_q * npt * 4
        stages = math.log2(taps) * (math.log2(taps) + 1) / 2
        merge_flop = (5 * taps * stages + 9 * taps * d) / (block_q * npt) if c["MERGE"] else 0.0
        out.append(dict(config=c, miss=miss, merge_flop_per_sample=merge_flop,
                        atomics=deform_cache.merged_atomic_ratio(size, block_q) if c["MERGE"] else 1.0))
    return out


def _deform_backward_work(size: int, batch: int, value_dtype: str, miss: float, atomics: float,
                          merge_flop_per_sample: float) -> Work:
    """The backward kernel: grad_out and value read, location / weight gradients written, the
    accumulator written back; in L2 the tap reads that miss L1 (``miss``), ``atomics`` 4-byte
    atomics per tap element, the locations, weights and gradients."""
    samples, value, loc_attn, taps = _deform_volumes(size, batch, value_dtype)
    vb = DTYPE_BYTES[value_dtype]
    return Work(bytes=2 * value + 2 * loc_attn + value // vb * 4,
                l2_bytes=taps * vb * miss + taps * 4 * atomics + 2 * loc_attn + 2 * value,
                fp32_flops=samples * (14.0 * DEFORM["dim"] + 60 + merge_flop_per_sample), kernels=1)


def best_deform_backward(size: int, batch: int, dtype: str, l1: bool, merge: bool | None = None) -> tuple[dict, Work]:
    """The backward config (``deform_backward_configs``; only those with ``MERGE == merge`` unless
    None) with the least H100 time, as the autotuner would pick, and its work."""
    works = [(c, _deform_backward_work(size, batch, dtype, c["miss"], c["atomics"], c["merge_flop_per_sample"]))
             for c in deform_backward_configs(size, dtype, l1) if merge is None or c["config"]["MERGE"] == merge]
    return min(works, key=lambda cw: cw[1].seconds(HARDWARE["H100"]))


def fused_ms_deform_attn(size: int, phase: str, batch: int = B, dtype: str = "float32",
                         variant: str = "deterministic", official: bool = False, l1: bool = False) -> Work:
    """kernels/ms_deform_attn.py. DRAM: every input and output once (the value maps, 44 MB in
    bf16 / 88 MB in fp32 at B=16 512x512, are gathered through L2). L2: the 4 taps x D of every
    sample in the value's dtype; in the backward the same taps again and 4-byte atomics (int32
    fixed point or float32: the same bytes), one per tap element, or per distinct row of a query
    block's level with MERGE (``best_deform_backward``). The deterministic variant adds the
    mass kernel (locations and weights read again, one scalar int32 atomic per sample: a 32-byte
    sector), the box-maximum pass over the [B, S, H] mass and the fixed-point to float pass; the
    torch ops around the kernels are traced. ``official``: the CUDA extension (fp32, float
    atomics per tap into a zeroed accumulator, 2 launches). ``l1``: the tap reads charged by the
    bytes that miss L1 (``deform_cache``); atomics never cached."""
    value_dtype = "float32" if official else dtype
    d, vb = DEFORM["dim"], DTYPE_BYTES[value_dtype]
    samples, value, loc_attn, taps = _deform_volumes(size, batch, value_dtype)
    acc = value // vb * 4
    mass = acc // d
    miss_fwd = deform_forward_l1_miss(size, value_dtype, official) if l1 else 1.0
    fwd = Work(bytes=value + loc_attn + value, l2_bytes=taps * vb * miss_fwd + loc_attn + value,
               fp32_flops=samples * (10.0 * d + 40), kernels=1)
    if phase == "fwd":
        return fwd
    if official:
        miss = deform_cache.row_kernel_miss_ratio(size, vb, "official-bwd") if l1 else 1.0
        bwd = _deform_backward_work(size, batch, value_dtype, miss, 1.0, 0.0)
        return fwd.add(bwd).add(Work(bytes=acc, kernels=1))  # the zeroed float accumulator
    _, bwd = best_deform_backward(size, batch, dtype, l1, merge=False if variant == "deterministic-per-tap" else None)
    deterministic = variant.startswith("deterministic")
    if deterministic:
        bwd = bwd.add(Work(bytes=loc_attn + mass, l2_bytes=loc_attn + samples * SECTOR, fp32_flops=samples * 20.0,
                           kernels=1))  # mass
        bwd = bwd.add(Work(bytes=mass, l2_bytes=4 * mass, kernels=1))  # box maxima: 4 mass reads per row
        bwd = bwd.add(Work(bytes=acc + value, kernels=1))  # fixed point -> float
    return fwd.add(bwd).add(_deform_backward_torch_side(size, batch, dtype, deterministic))


# ---------------------------------------------------------------------------- Mask2Former training step
# One GPU of the official ADE20K semantic run (maskformer2_R50_bs16_160k: 16 images over 8 GPUs,
# 512x512 crops, AMP). MFU: the fraction of the tensor-core peak the dense convolutions and matmuls
# reach, and fp32_mfu that of the fp32 CUDA-core peak for fp32 matmuls (SGEMM runs closer to its
# peak) - assumptions, stated, not measured.
M2F_STEP = dict(preset="mask2former-ade20k-150-r50", batch=2, size=512, mfu=0.4, fp32_mfu=0.7)
DENSE_PARTS = ("backbone", "pixel_decoder", "predictor")


class _DeformStandIn(torch.autograd.Function):
    """The deformable-attention core inside the traced model: saves what the op saves, computes
    nothing (its own roofline rows model it)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, loc, weights):
        ctx.save_for_backward(value, loc, weights)
        return value.new_empty(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])

    @staticmethod
    def backward(ctx, grad):
        value, loc, weights = ctx.saved_tensors
        return torch.empty_like(value), None, torch.empty_like(loc), torch.empty_like(weights)


def dense_profile(preset: str, batch: int, size: int, parts: tuple = DENSE_PARTS, train: bool = True) -> dict:
    """Our model of ``preset`` (``fmf.build_model``) forward (+ backward when ``train``) on fake
    tensors (nothing computed): per top-level part (``""``: the whole model) the forward FLOPs by op
    (``FlopCounterMode``: convolution / addmm / mm / bmm) and the bytes saved for backward in fp32
    (``saved_tensors_hooks``), and the parameter count. Mask2Former's deformable attention core is a
    stand-in (its rows model it). EoMT in training masks its attention (annealing probability 1, the
    first phase); with ``train=False`` it runs as a trained model (no masks)."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import fastmaskformer as fmf
    import fastmaskformer.ops

    cfg = fmf.get_config(preset)
    model = fmf.build_model(cfg.model).train(train)
    if not train and hasattr(model, "mask_annealing"):
        model.mask_annealing.probs = [0.0] * len(model.mask_annealing.probs)
    saved = {part: 0 for part in parts}
    current = []
    for part in parts:
        module = getattr(model, part) if part else model
        module.register_forward_pre_hook(lambda *_, part=part: current.append(part))
        module.register_forward_hook(lambda *_: [current.pop()] and None)  # a hook's result replaces the output

    def pack(t):
        if current:
            saved[current[-1]] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    stand_in = lambda value, shapes, loc, weights, **_: _DeformStandIn.apply(value, shapes, loc, weights)  # noqa: E731
    with mock.patch.object(fastmaskformer.ops, "ms_deform_attn", stand_in), FakeTensorMode(allow_non_fake_inputs=True):
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(train):
            out = model(torch.empty(batch, 3, size, size))  # (the forward only)
        if train:
            (out.class_logits.sum() + out.mask_embed.sum() + out.pixel_embed.sum()).backward()
    counts = counter.get_flop_counts()
    flops = {part: {str(op).split(".")[1]: f for op, f in counts.get(
        f"{type(model).__name__}.{part}" if part else "Global", {}).items()} for part in parts}
    layers = sum(type(m).__name__ == "MSDeformAttn" for m in model.modules())
    return dict(flops=flops, saved_bytes=saved, params=sum(p.numel() for p in model.parameters()), deform_layers=layers)


def mask2former_step(hw: dict, profile: dict, official: bool, mfu: float = M2F_STEP["mfu"],
                     fp32_mfu: float = M2F_STEP["fp32_mfu"]) -> dict:
    """Predicted step time (ms), images/s and memory (GB) of one Mask2Former training step.
    Dense parts: 3x their forward FLOPs (backward = 2x forward) at ``mfu`` of the tensor-core rate
    of their precision (``fp32_mfu`` of the fp32 rate) - ours all under bf16 autocast; the
    official code disables autocast in its pixel decoder (``@autocast(enabled=False)`` on ``forward_features``), so there its convolutions run
    in TF32 (cuDNN's default) and its linear layers in fp32 on the CUDA cores (PyTorch's default
    ``allow_tf32=False`` for matmuls). Deformable attention: 6 encoder layers of its roofline row
    (ours: bf16 values, deterministic; official: the CUDA extension, fp32). Criterion: the
    point-sampled loss and matching cost rows (ours: the fused kernels; official: the eager
    formulation; the official host-side scipy matching is not counted). AdamW: one pass over
    parameters, gradients and both moments (fp32). Memory: parameters, gradients, AdamW moments
    (16 B / parameter) and the saved activations (bf16 where autocast runs: half the fp32 trace;
    the official pixel decoder's in fp32); the criterion's and the kernels' workspaces are left out."""
    batch, size = M2F_STEP["batch"], M2F_STEP["size"]
    rates = {"bf16": hw["bf16_tflops"], "tf32": hw["tf32_tflops"], "fp32": hw["fp32_tflops"]}
    parts, memory = {}, 16.0 * profile["params"]
    for part in DENSE_PARTS:
        flops = profile["flops"][part]
        if official and part == "pixel_decoder":
            convs = sum(f for op, f in flops.items() if op.startswith("convolution"))
            ms = 3 * (convs / rates["tf32"] / mfu + (sum(flops.values()) - convs) / rates["fp32"] / fp32_mfu) / 1e9
            memory += profile["saved_bytes"][part]
        else:
            ms = 3 * sum(flops.values()) / rates["bf16"] / mfu / 1e9
            memory += profile["saved_bytes"][part] / 2
        parts[part] = ms
    deform = fused_ms_deform_attn(size, "fwd+bwd", batch, "bfloat16", "deterministic", official=official)
    parts["ms_deform_attn x6"] = profile["deform_layers"] * deform.seconds(hw) * 1e3
    if official:
        criterion = eager_point_loss()[1][hw["tag"]] + eager_point_matching_cost()[1][hw["tag"]]
    else:
        criterion = fused_point_loss("ieee").seconds(hw) + fused_point_matching_cost("tf32").seconds(hw)
    parts["criterion (point loss + matching cost)"] = criterion * 1e3
    parts["AdamW"] = Work(bytes=28.0 * profile["params"], kernels=1).seconds(hw) * 1e3
    total = sum(parts.values())
    return dict(step_ms=total, images_per_s=batch / total * 1e3, memory_gb=memory / 1e9, parts_ms=parts)


def mask2former_step_rows() -> list[dict]:
    profile = dense_profile(M2F_STEP["preset"], M2F_STEP["batch"], M2F_STEP["size"])
    rows = []
    for tag, hw in HARDWARE.items():
        for official in (False, True):
            step = mask2former_step(dict(hw, tag=tag), profile, official)
            rows.append({"hardware": tag, "code": "official" if official else "ours", "batch": M2F_STEP["batch"],
                         "size": M2F_STEP["size"], "mfu": M2F_STEP["mfu"], "fp32_mfu": M2F_STEP["fp32_mfu"],
                         "step_ms": step["step_ms"],
                         "images_per_s": step["images_per_s"], "memory_gb": step["memory_gb"],
                         **{f"{k}_ms": v for k, v in step["parts_ms"].items()}})
    return rows


# EoMT ViT-L 640 COCO panoptic (eomt-coco-panoptic-dinov2-l-640): one GPU's training step (the
# official 4 images per GPU) and batch-1 inference as the paper times it (128 FPS on an H100,
# post-processing left out). mfu: as M2F_STEP's, an assumption; paper_fps gives the MFU the
# paper's figure implies at these FLOPs. kept: queries the panoptic post-processing keeps.
EOMT_STEP = dict(preset="eomt-coco-panoptic-dinov2-l-640", batch=4, size=640, mfu=0.4, paper_fps=128.0, kept=50)


def _vit_shape(model_cfg, size: int) -> dict:
    """EoMT's ViT at ``size``: depth, width, query blocks, tokens without and with the queries."""
    import fastmaskformer as fmf

    vit = fmf.build_model(model_cfg).backbone
    plain = vit.num_prefix_tokens + (size // model_cfg.patch_size) ** 2
    return dict(depth=len(vit.blocks), width=vit.embed_dim, query_blocks=model_cfg.num_blocks, tokens=plain,
                tokens_with_queries=plain + model_cfg.num_queries)


def _attention_flops(vit: dict, batch: int) -> float:
    """QK^T and AV of every ViT block (4 N^2 C per image; N = prefix + patches, + queries in the
    query blocks): scaled_dot_product_attention has no FlopCounterMode formula on the CPU."""
    return 4.0 * batch * vit["width"] * ((vit["depth"] - vit["query_blocks"]) * vit["tokens"] ** 2
                                         + vit["query_blocks"] * vit["tokens_with_queries"] ** 2)


def eomt_profiles() -> dict:
    """The training (masked, B = EOMT_STEP batch) and inference (unmasked, B = 1) dense profiles of
    EoMT-L 640 with the attention FLOPs added (``sdpa``) and the ViT's shape (``vit``)."""
    import fastmaskformer as fmf

    vit = _vit_shape(fmf.get_config(EOMT_STEP["preset"]).model, EOMT_STEP["size"])
    out = {}
    for phase, batch, train in (("train", EOMT_STEP["batch"], True), ("inference", 1, False)):
        profile = dense_profile(EOMT_STEP["preset"], batch, EOMT_STEP["size"], parts=("",), train=train)
        profile["flops"][""]["sdpa"] = _attention_flops(vit, batch)
        out[phase] = dict(profile, vit=vit)
    return out


def eomt_step(hw: dict, profile: dict, code: str, mfu: float = EOMT_STEP["mfu"]) -> dict:
    """Predicted EoMT-L 640 training step (ms, images/s, GB) for ``code``: "official" (tue-mps/eomt:
    the ViT under mixed precision, the criterion eager - its host-side scipy matching not counted),
    "ours" (bf16 autocast, the fused criterion kernels) or "ours+checkpointing" (activation
    checkpointing per ViT block: one more forward, only the blocks' inputs saved). ViT + heads: 3x
    (4x with checkpointing) the forward FLOPs at ``mfu`` of the bf16 tensor-core rate. Memory:
    parameters, gradients, AdamW moments (16 B / parameter) and the saved activations in 16 bit
    (half the fp32 trace); the official code also keeps each prediction's [B, Q, H/4, W/4] mask
    logits (16 bit) for the point sampling's backward, ours forms none; workspaces left out."""
    sizes, batch = EOMT_L640, EOMT_STEP["batch"]
    forward = sum(profile["flops"][""].values())
    passes = 4 if code == "ours+checkpointing" else 3
    parts = {"ViT + heads": passes * forward / hw["bf16_tflops"] / mfu / 1e9}
    if code == "official":
        criterion = eager_point_loss(sizes)[1][hw["tag"]] + eager_point_matching_cost(sizes)[1][hw["tag"]]
    else:
        criterion = fused_point_loss("ieee", sizes).seconds(hw) + fused_point_matching_cost("tf32", sizes).seconds(hw)
    parts["criterion (point loss + matching cost)"] = criterion * 1e3
    parts["AdamW"] = Work(bytes=28.0 * profile["params"], kernels=1).seconds(hw) * 1e3
    activations = profile["saved_bytes"][""] / 2
    if code == "ours+checkpointing":  # block inputs [B, N, C] in 16 bit, plus one block's activations
        vit = profile["vit"]
        activations = vit["depth"] * batch * vit["tokens_with_queries"] * vit["width"] * 2 + activations / vit["depth"]
    memory = 16.0 * profile["params"] + activations
    if code == "official":
        memory += 2.0 * sizes["layers"] * batch * sizes["queries"] * sizes["low"] ** 2
    total = sum(parts.values())
    return dict(step_ms=total, images_per_s=batch / total * 1e3, memory_gb=memory / 1e9, parts_ms=parts)


def eomt_inference(hw: dict, profile: dict, mfu: float) -> dict:
    """Batch-1 EoMT-L 640 panoptic inference: the unmasked forward at ``mfu`` of the bf16 rate plus
    our fused panoptic post-processing (EOMT_STEP kept queries, 640 x 640 output)."""
    forward = sum(profile["flops"][""].values())
    model_ms = forward / hw["bf16_tflops"] / mfu / 1e9
    size = EOMT_STEP["size"]
    post_ms = fused_panoptic(EOMT_STEP["kept"], 1, EOMT_L640["channels"], (size, size), (size, size)).seconds(hw) * 1e3
    return dict(model_ms=model_ms, post_ms=post_ms, fps=1e3 / (model_ms + post_ms), fps_model_only=1e3 / model_ms)


def eomt_rows() -> tuple[list[dict], list[dict]]:
    """(training-step rows, inference rows) per hardware; the inference at EOMT_STEP's mfu and at
    the MFU the paper's 128 FPS implies on an H100 (model only)."""
    profiles = eomt_profiles()
    forward = sum(profiles["inference"]["flops"][""].values())
    paper_mfu = forward * EOMT_STEP["paper_fps"] / (HARDWARE["H100"]["bf16_tflops"] * 1e12)
    step_rows, inference_rows = [], []
    for tag, hw in HARDWARE.items():
        hw = dict(hw, tag=tag)
        for code in ("official", "ours", "ours+checkpointing"):
            step = eomt_step(hw, profiles["train"], code)
            step_rows.append({"hardware": tag, "code": code, "batch": EOMT_STEP["batch"], "size": EOMT_STEP["size"],
                              "mfu": EOMT_STEP["mfu"], "step_ms": step["step_ms"],
                              "images_per_s": step["images_per_s"], "memory_gb": step["memory_gb"],
                              **{f"{k}_ms": v for k, v in step["parts_ms"].items()}})
        for label, mfu in (("stated", EOMT_STEP["mfu"]), ("paper-implied", paper_mfu)):
            inference_rows.append({"hardware": tag, "mfu_basis": label, "mfu": mfu,
                                   "forward_tflop": forward / 1e12, **eomt_inference(hw, profiles["inference"], mfu)})
    return step_rows, inference_rows


def eomt_problems():
    """EoMT ViT-L 640 COCO panoptic, one GPU's step of the criterion (EOMT_L640): the point matcher,
    the point-sampled loss, both together (one criterion step), and ``mask_sampling: full``."""
    out, sizes, keys = [], EOMT_L640, dict(batch=EOMT_L640["batch"], M=EOMT_L640["segments"], K=EOMT_L640["classes"])
    eager_match, eager_loss = eager_point_matching_cost(sizes), eager_point_loss(sizes)
    for precision in ("tf32", "ieee"):
        out.append(("eomt_point_matching_cost", dict(keys, precision=precision),
                    fused_point_matching_cost(precision, sizes), eager_match))
    for precision in ("ieee", "tf32"):
        out.append(("eomt_point_loss", dict(keys, precision=precision, phase="fwd+bwd"),
                    fused_point_loss(precision, sizes), eager_loss))
    # One criterion step: the matcher (tf32, its default), then the loss (ieee, its default).
    eager_step = (eager_match[0].add(eager_loss[0]), {t: eager_match[1][t] + eager_loss[1][t] for t in HARDWARE})
    out.append(("eomt_criterion", dict(keys, precision="tf32+ieee", phase="fwd+bwd"),
                [fused_point_matching_cost("tf32", sizes), fused_point_loss("ieee", sizes)], eager_step))
    eager = eager_mask_loss(sizes["segments"], loss="bce", sizes=sizes)
    for precision in ("ieee", "tf32"):
        out.append(("eomt_mask_loss_bce", dict(keys, precision=precision, phase="fwd+bwd"),
                    fused_mask_loss(sizes["segments"], precision, sizes=sizes), eager))
    return out


def problems():
    """(part, keys, fused Work (or a list of Works run one after another), (eager Work, eager
    seconds)); keys match the benchmarks' row fields."""
    out = []
    for classes in (150, 847):
        for segments in (8, 16, 32):
            eager = eager_matching_cost(segments, classes)
            for precision in ("tf32", "tf32x3", "ieee"):
                out.append(("matching_cost", dict(batch=B, M=segments, K=classes, precision=precision),
                            fused_matching_cost(segments, classes, precision), eager))
    for segments in (8, 16, 32):
        eager = eager_mask_loss(segments)
        for precision in ("ieee", "tf32"):
            out.append(("mask_loss", dict(batch=B, M=segments, precision=precision, phase="fwd+bwd"),
                        fused_mask_loss(segments, precision), eager))
    eager = eager_mask_loss(M2F["segments"], M2F["batch"], M2F["layers"], "bce")
    for precision in ("ieee", "tf32"):
        out.append(("mask_loss_bce", dict(batch=M2F["batch"], M=M2F["segments"], precision=precision,
                                          phase="fwd+bwd"),
                    fused_mask_loss(M2F["segments"], precision, M2F["batch"], M2F["layers"]), eager))
    eager = eager_point_matching_cost()
    for precision in ("tf32", "tf32x3", "ieee"):
        out.append(("point_matching_cost", dict(batch=M2F["batch"], M=M2F["segments"], K=M2F["classes"],
                                                precision=precision), fused_point_matching_cost(precision), eager))
    eager = eager_point_loss()
    for precision in ("ieee", "tf32"):
        out.append(("point_loss", dict(batch=M2F["batch"], M=M2F["segments"], precision=precision, phase="fwd+bwd"),
                    fused_point_loss(precision), eager))
    out += eomt_problems()
    for classes in (150, 847):
        eager = eager_semantic(classes)
        for precision in ("tf32", "tf32x3", "ieee", "bf16"):
            out.append(("semantic_inference", dict(batch=B, K=classes, precision=precision),
                        fused_semantic(classes, precision), eager))
    out.append(("panoptic_inference", dict(batch=B, kept=50), fused_panoptic(50), eager_panoptic(50)))
    for batch in (16, 2):
        for size in (512, 1024):
            for phase in ("fwd", "fwd+bwd"):
                for dtype in DTYPE_BYTES:
                    eager = eager_ms_deform_attn(size, phase, batch, dtype)
                    for variant in DEFORM_VARIANTS[:1] if phase == "fwd" else DEFORM_VARIANTS:
                        keys = dict(batch=batch, size=size, phase=phase, dtype=dtype, variant=variant)
                        out.append(("ms_deform_attn", keys,
                                    fused_ms_deform_attn(size, phase, batch, dtype, variant), eager))
    return out


def ms_deform_attn_l1_rows() -> list[dict]:
    """Deformable attention forward + backward with the tap reads charged by what misses L1
    (``deform_cache``: the benchmark's inputs through each kernel's blocks; atomics never cached):
    ours (with the backward config charged: QBLOCKS, MERGE, atomics per tap), the official CUDA
    extension (fp32) and the eager formulation (in the row's dtype and in fp32, the official pixel
    decoder's), H100."""
    hw, out = HARDWARE["H100"], []
    for batch in (16, 2):
        for size in (512, 1024):
            official = fused_ms_deform_attn(size, "fwd+bwd", batch, official=True, l1=True).seconds(hw) * 1e3
            eager32 = eager_ms_deform_attn(size, "fwd+bwd", batch, "float32", l1=True)[1]["H100"] * 1e3
            for dtype in DTYPE_BYTES:
                eager = eager_ms_deform_attn(size, "fwd+bwd", batch, dtype, l1=True)[1]["H100"] * 1e3
                miss_fwd = deform_forward_l1_miss(size, dtype)
                for variant in DEFORM_VARIANTS:
                    chosen, _ = best_deform_backward(size, batch, dtype, l1=True,
                                                     merge=False if variant == "deterministic-per-tap" else None)
                    fused = fused_ms_deform_attn(size, "fwd+bwd", batch, dtype, variant, l1=True).seconds(hw) * 1e3
                    out.append(dict(batch=batch, size=size, dtype=dtype, variant=variant, fused_ms_H100=fused,
                                    official_cuda_ms_H100=official, eager_ms_H100=eager, eager_fp32_ms_H100=eager32,
                                    vs_official_H100=official / fused, speedup_H100=eager / fused,
                                    speedup_vs_fp32_eager_H100=eager32 / fused, l1_miss_fwd=miss_fwd,
                                    l1_miss_bwd=chosen["miss"], bwd_qblocks=chosen["config"]["QBLOCKS"],
                                    bwd_merge=int(chosen["config"]["MERGE"]), atomics_per_tap=chosen["atomics"]))
    return out


def rows() -> list[dict]:
    result = []
    for part, keys, fused, (eager, eager_seconds) in problems():
        steps = fused if isinstance(fused, list) else [fused]  # a list: kernel groups run one after another
        fused = steps[0]
        for step in steps[1:]:
            fused = fused.add(step)
        row = {"part": part, **keys, "fused_gb": fused.bytes / 1e9, "fused_gflop": (fused.fp32_flops + sum(
            fused.tc_flops.values())) / 1e9, "fused_gsfu": fused.sfu / 1e9, "eager_gb": eager.bytes / 1e9,
            "eager_gflop": eager.fp32_flops / 1e9, "eager_gsfu": eager.sfu / 1e9, "eager_kernels": eager.kernels}
        for tag, hw in HARDWARE.items():
            row[f"fused_ms_{tag}"] = sum(step.seconds(hw) for step in steps) * 1e3
            row[f"eager_ms_{tag}"] = eager_seconds[tag] * 1e3
            row[f"speedup_{tag}"] = row[f"eager_ms_{tag}"] / row[f"fused_ms_{tag}"]
            if part == "ms_deform_attn":  # the official CUDA extension (fp32), modelled the same way
                official = fused_ms_deform_attn(keys["size"], keys["phase"], keys["batch"], official=True)
                row[f"official_cuda_ms_{tag}"] = official.seconds(hw) * 1e3
                row[f"vs_official_{tag}"] = row[f"official_cuda_ms_{tag}"] / row[f"fused_ms_{tag}"]
        result.append(row)
    return result


def predicted(part: str, device_name: str, **keys) -> dict | None:
    """The committed prediction for a benchmark row (None if the part/keys/device is not modelled)."""
    path = RESULTS_DIR / "roofline.json"
    tag = next((t for t in HARDWARE if t in device_name.upper()), None)
    if tag is None or not path.exists():
        return None
    for row in json.loads(path.read_text())["rows"]:
        if row["part"] == part and all(row.get(k) == v for k, v in keys.items() if k in row):
            return {"fused_ms": row[f"fused_ms_{tag}"], "eager_ms": row[f"eager_ms_{tag}"],
                    "speedup": row[f"speedup_{tag}"], "hardware": HARDWARE[tag]["name"],
                    "official_cuda_ms": row.get(f"official_cuda_ms_{tag}")}
    return None


# kernel module -> (roofline part, keys of the row quoted for it in the readiness table)
READINESS_PART = {
    "matching_cost": ("matching_cost", dict(M=16, K=150, precision="tf32")),
    "mask_loss": ("mask_loss", dict(M=16, precision="ieee")),
    "point_matching_cost": ("point_matching_cost", dict(precision="tf32")),
    "point_loss": ("point_loss", dict(precision="ieee")),
    "semantic": ("semantic_inference", dict(K=847, precision="tf32")),
    "panoptic": ("panoptic_inference", dict()),
    "ms_deform_attn": ("ms_deform_attn", dict(batch=16, size=512, phase="fwd+bwd", dtype="float32")),
}


def readiness_table(aot_rows: list[dict], model_rows: list[dict]) -> str:
    """Per kernel, over the compiled configs of the AOT check (benchmarks/aot.py --json): registers,
    worst spill, largest shared memory, dot lowering on sm_90 / sm_80, and the predicted speed-up
    over eager on an H100 of the op the kernel belongs to."""
    lines = ["| kernel | configs | regs (sm_90) | spill B/thread (max) | smem KiB (max) | tl.dot on sm_90 / sm_80 |"
             " predicted x eager (H100) |", "|---|---|---|---|---|---|---|"]
    for kernel in sorted({r["kernel"] for r in aot_rows}):
        rows = [r for r in aot_rows if r["kernel"] == kernel and r.get("regs") is not None]
        if not rows:
            continue
        sm90 = [r for r in rows if r["arch"] == 90] or rows
        dots = " / ".join(", ".join(sorted({r["dot"].split(": ", 1)[-1] for r in rows if r["arch"] == arch} - {"-"}))
                          or "-" for arch in (90, 80))
        part, keys = READINESS_PART.get(kernel.split(".")[0], (None, {}))
        model = next((m for m in model_rows if m["part"] == part and all(m.get(k) == v for k, v in keys.items())), None)
        speedup = f"{model['speedup_H100']:.0f}x ({part}{''.join(f' {k}={v}' for k, v in keys.items())})" \
            if model else "-"
        lines.append(f"| {kernel} | {len({r['config'] for r in rows})} | {min(r['regs'] for r in sm90)}-"
                     f"{max(r['regs'] for r in sm90)} | {max(r['spill_store'] for r in rows)} | "
                     f"{max(r['smem'] for r in rows) / 1024:.0f} | {dots} | {speedup} |")
    return "\n".join(lines)


COLUMNS = ["part", "batch", "M", "K", "precision", "size", "phase", "dtype", "variant", "fused_gb", "fused_gflop",
           "fused_gsfu", "fused_ms_H100", "fused_ms_A100", "eager_gb", "eager_gflop", "eager_kernels", "eager_ms_H100",
           "eager_ms_A100", "speedup_H100", "speedup_A100", "official_cuda_ms_H100", "vs_official_H100"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS_DIR / "roofline.json"))
    parser.add_argument("--aot", default=None,
                        help="JSON of python benchmarks/aot.py --json: print the README's GPU "
                             "readiness table from it and the committed model, then exit")
    args = parser.parse_args(argv)
    if args.aot:
        model = json.loads((RESULTS_DIR / "roofline.json").read_text())["rows"]
        print(readiness_table(json.loads(pathlib.Path(args.aot).read_text())["rows"], model))
        return 0
    table_rows = rows()
    step_rows = mask2former_step_rows()
    eomt_step_rows, eomt_inference_rows = eomt_rows()
    deform_l1_rows = ms_deform_attn_l1_rows()
    table = markdown_table(table_rows, COLUMNS) + "\n\nms_deform_attn forward + backward, tap reads charged by " + \
        f"what misses an L1 of {deform_cache.L1_BYTES // 1024} KB per SM (benchmarks/deform_cache.py):\n\n" + \
        markdown_table(deform_l1_rows, list(deform_l1_rows[0])) + "\n\nMask2Former training step (one GPU, " + \
        f"{M2F_STEP['preset']}, B={M2F_STEP['batch']}, {M2F_STEP['size']}x{M2F_STEP['size']}):\n\n" + \
        markdown_table(step_rows, list(step_rows[0])) + "\n\nEoMT training step (one GPU, " + \
        f"{EOMT_STEP['preset']}, B={EOMT_STEP['batch']}, masked attention):\n\n" + \
        markdown_table(eomt_step_rows, list(eomt_step_rows[0])) + "\n\nEoMT panoptic inference (B=1, " + \
        f"{EOMT_STEP['size']}x{EOMT_STEP['size']}, our fused post-processing, {EOMT_STEP['kept']} kept queries):\n\n" + \
        markdown_table(eomt_inference_rows, list(eomt_inference_rows[0]))
    payload = {"hardware": HARDWARE, "launch_us": LAUNCH_US, "sizes": dict(B=B, layers=LAYERS, Q=Q, C=C, crop=SIZE,
               image=IMAGE, input=INPUT, mask2former=M2F, eomt=EOMT_L640), "rows": table_rows,
               "ms_deform_attn_l1": deform_l1_rows, "mask2former_step": step_rows, "eomt_step": eomt_step_rows,
               "eomt_inference": eomt_inference_rows, "eomt_step_config": EOMT_STEP, "table": table}
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
