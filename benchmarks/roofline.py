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


def _gather_bytes(name: str, args, outputs) -> float:
    """L2 traffic of gathers the op's inputs + outputs do not show: bilinear ``grid_sample`` reads
    4 taps per output element, and its backward reads 4 taps and adds into 4 (float atomics)."""
    if name == "grid_sampler_2d" and outputs:
        return 4.0 * outputs[0].numel() * outputs[0].element_size()
    if name == "grid_sampler_2d_backward":
        return 8.0 * args[0].numel() * args[0].element_size()
    return 0.0


class _Tracer(TorchDispatchMode):
    """Sums the Work of every aten op run inside it (one kernel per non-view op) and, per
    hardware, the ops' lower bounds (a sequence of kernels adds their bounds)."""

    def __init__(self):
        super().__init__()
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
                  kernels=1, l2_bytes=_gather_bytes(name, args, outputs))
        self.work = self.work.add(op)
        for tag, hw in HARDWARE.items():
            self.seconds[tag] += op.seconds(hw)
        return out


def trace(fn) -> tuple[Work, dict]:
    """(total Work, {hardware: lower-bound seconds}) of the aten ops ``fn`` runs."""
    tracer = _Tracer()
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

    # bincount has no meta kernel: real CPU tensors (one image, 16 times the work).
    scores, mask_embed, pixel_embed = torch.rand(kept), torch.randn(kept, C), torch.randn(C, INPUT[0] // 4, INPUT[1] // 4)
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


def fused_panoptic(kept: int) -> Work:
    """kernels/panoptic.py per image (output = image size: 4 taps), plus its low-res matmul."""
    hw, pixels = INPUT[0] * INPUT[1] // 16, B * IMAGE[0] * IMAGE[1]
    kp = _pad(kept, 16)
    work = Work(bytes=4 * (B * C * hw + 2 * B * hw * kp) + 8 * pixels, fp32_flops=14.0 * kp * pixels,
                sfu=2.0 * kp * pixels, kernels=3 * B)
    return work.add(dot_work(2.0 * B * kept * C * hw, "ieee"))


# Mask2Former pixel decoder, one deformable-attention call: B=16, levels at strides 32/16/8.
DEFORM = dict(heads=8, dim=32, levels=3, points=4)


def _deform_sizes(size: int):
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    tokens = sum(a * b for a, b in shapes)
    return shapes, tokens, B * tokens * DEFORM["heads"] * DEFORM["levels"] * DEFORM["points"]


def eager_ms_deform_attn(size: int, phase: str):
    """The official formulation (grid_sample per level), traced on meta tensors, fp32."""
    from fastmaskformer.ops.ms_deform_attn import ms_deform_attn_grid_sample

    shapes, tokens, _ = _deform_sizes(size)
    hd, nl, npt = DEFORM["heads"], DEFORM["levels"], DEFORM["points"]
    grad = phase == "fwd+bwd"
    value = torch.empty(B, tokens, hd, DEFORM["dim"], device="meta", requires_grad=grad)
    loc = torch.empty(B, tokens, hd, nl, npt, 2, device="meta", requires_grad=grad)
    attn = torch.empty(B, tokens, hd, nl, npt, device="meta", requires_grad=grad)

    def run():
        out = ms_deform_attn_grid_sample(value, shapes, loc, attn)
        if grad:
            out.backward(torch.empty_like(out))
    return trace(run)


def fused_ms_deform_attn(size: int, phase: str, official: bool = False) -> Work:
    """kernels/ms_deform_attn.py (fp32). DRAM: every input and output once (the value maps,
    88 MB at 512x512, are gathered through L2). L2: the 4 taps x D of every sample, and in the
    backward the same count of 64-bit fixed-point atomics (``official``: the CUDA extension's
    32-bit float atomics, no fixed-point passes)."""
    _, tokens, samples = _deform_sizes(size)
    d = DEFORM["dim"]
    value = B * tokens * DEFORM["heads"] * d * 4
    loc_attn = samples * 3 * 4
    taps = samples * 4 * d
    fwd = Work(bytes=value + loc_attn + value, l2_bytes=taps * 4 + loc_attn + value,
               fp32_flops=samples * (10.0 * d + 40), kernels=1)
    if phase == "fwd":
        return fwd
    acc = 4 if official else 8
    # zero-init of the accumulator, the atomics' write-back, the float conversion pass
    bwd = Work(bytes=value + value + 2 * loc_attn + 2 * value * acc // 4 + (0 if official else value * 3),
               l2_bytes=taps * 4 + taps * acc + 2 * loc_attn + value,
               fp32_flops=samples * (14.0 * d + 60), kernels=2 if official else 8)
    return fwd.add(bwd)


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
    for size in (512, 1024):
        for phase in ("fwd", "fwd+bwd"):
            out.append(("ms_deform_attn", dict(batch=B, size=size, phase=phase), fused_ms_deform_attn(size, phase),
                        eager_ms_deform_attn(size, phase)))
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
            if part == "ms_deform_attn":  # the official CUDA extension, modelled the same way
                official = fused_ms_deform_attn(keys["size"], keys["phase"], official=True)
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
                    "speedup": row[f"speedup_{tag}"], "hardware": HARDWARE[tag]["name"]}
    return None


# kernel module -> (roofline part, keys of the row quoted for it in the readiness table)
READINESS_PART = {
    "matching_cost": ("matching_cost", dict(M=16, K=150, precision="tf32")),
    "mask_loss": ("mask_loss", dict(M=16, precision="ieee")),
    "point_matching_cost": ("point_matching_cost", dict(precision="tf32")),
    "point_loss": ("point_loss", dict(precision="ieee")),
    "semantic": ("semantic_inference", dict(K=847, precision="tf32")),
    "panoptic": ("panoptic_inference", dict()),
    "ms_deform_attn": ("ms_deform_attn", dict(size=512, phase="fwd+bwd")),
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


COLUMNS = ["part", "batch", "M", "K", "precision", "size", "phase", "fused_gb", "fused_gflop", "fused_gsfu",
           "fused_ms_H100", "fused_ms_A100", "eager_gb", "eager_gflop", "eager_kernels", "eager_ms_H100",
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
    table = markdown_table(table_rows, COLUMNS)
    payload = {"hardware": HARDWARE, "launch_us": LAUNCH_US, "sizes": dict(B=B, layers=LAYERS, Q=Q, C=C, crop=SIZE,
               image=IMAGE, input=INPUT, mask2former=M2F, eomt=EOMT_L640), "rows": table_rows, "table": table}
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
