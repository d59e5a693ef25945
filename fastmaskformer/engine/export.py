"""Exported inference: one image -> semantic labels, a panoptic id map or instance masks, as a
self-contained file that runs without fastmaskformer (README "Deploy"). MaskFormer,
Mask2Former and EoMT (``EXPORTABLE``; EoMT with its official inference inside the program:
black padding to its square size, or the semantic windows, :meth:`InferenceProgram._eomt_semantic`).

- :class:`InferenceProgram`: the program that is exported. Inputs: the image already resized to
  the test size (uint8 ``[3, h, w]`` RGB) and the output size (int64 ``[2]``, the original
  ``H, W``). It normalises, pads to the model's size divisibility, runs the model and the
  post-processing of ``fastmaskformer predict`` (DESIGN 4) in plain torch (aten) ops, so the
  exported graph holds no fastmaskformer operator (on the CPU Mask2Former's deformable
  attention is recorded as the official ``grid_sample`` formulation: ``MSDeformAttn``). The
  post-processing restates the references of ``fastmaskformer.ops.inference``
  (``semantic_scores_reference``, ``crop_and_resize``, ``panoptic_assign_reference``,
  ``assemble_panoptic``, ``instance_inference``) without what export cannot trace:
  ``int()`` of sizes (specialises ``h, w``), the early return of ``crop_and_resize`` when the
  sizes match (a guard on data; the bilinear resize to the same size is the identity exactly),
  slicing the padding off (a guard on ``h == padded h``: a gather instead) and boolean
  indexing of the kept queries (masks over all Q instead). ``tests/test_export.py`` holds the
  eager program to the references. Outputs:

  - semantic: int64 labels ``[H, W]``;
  - panoptic: int32 id map ``[H, W]`` (0 = void) and four per-query tables of static size Q:
    ``segment_id`` int32 ``[Q]`` (the segment a query starts; 0: the query starts none),
    ``category_id`` int64 ``[Q]`` (contiguous class), ``isthing`` bool ``[Q]``, ``score``
    float32 ``[Q]``. The rows with ``segment_id > 0``, in query order, are ``segments_info``
    (ids 1, 2, ... in that order), exactly as ``ops.panoptic_inference`` lists them;
  - instance: the top N = min(``test.instance_topk``, Q*K) (query, class) pairs by class
    probability (the official Mask2Former rule): ``masks`` bool ``[N, H, W]`` (logit > 0),
    ``scores`` float32 ``[N]`` (class probability x mean mask probability inside the mask),
    ``classes`` int64 ``[N]``, ``keep`` bool ``[N]`` (the rows ``predict`` keeps: all of them,
    or with ``test.panoptic_on`` only the thing classes', as the official code).

- :func:`export_program`: checkpoint model -> ``.pt2`` (``torch.export`` + AOTInductor
  package) or ``.onnx`` (``torch.onnx.export(dynamo=True)``), dynamic ``h, w``, with the task,
  thresholds, test sizes and label-space metadata embedded as JSON (``fastmaskformer`` key).
- :class:`ExportedModel` / :class:`ExportedPredictor`: load such a file and write the files of
  ``fastmaskformer predict`` (``predict --model``).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.metadata import check_label_space
from ..modeling import num_classes_of
from ..modeling.eomt import EoMT
from ..ops import final_pixel_embed
from ..ops.inference import instance_count
from .predictor import Predictor, resize_image

FORMATS = ("pt2", "onnx")
EXPORTABLE = {"maskformer": "MaskFormer", "mask2former": "Mask2Former", "eomt": "EoMT"}  # meta_arch -> name
EXPORTABLE_NAMES = ", ".join(list(EXPORTABLE.values())[:-1]) + " and " + list(EXPORTABLE.values())[-1]
TASKS = ("semantic", "panoptic", "instance")
METADATA_KEY = "fastmaskformer"
ONNX_OPSET = 18
MIN_SIDE = 33  # smallest exported image side: res5 (stride 32) must be >= 2 pixels, or export specialises it


class ExportError(ValueError):
    """A bad export request (unknown task or format, unsupported model): one line for the CLI."""


# ----------------------------------------------------------------------------- the program
def _resize(x: Tensor, size) -> Tensor:
    """x [N, h, w] -> [N, *size], bilinear, align_corners=False. Always resamples: at the same
    size this is the identity exactly (weights 1 and 0), so no data-dependent branch."""
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def _crop(x: Tensor, h, w) -> Tensor:
    """x [N, Hp, Wp] -> x[:, :h, :w] as a gather: a slice would guard on h == Hp (a multiple
    of the size divisibility or not), which export must not specialise."""
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    return x.index_select(1, rows).index_select(2, cols)


class InferenceProgram(nn.Module):
    """uint8 image ``[3, h, w]`` (test size) + int64 ``[2]`` output size -> the task's outputs
    (module docstring). ``model``: a MaskFormer in eval mode; ``thing_classes``: contiguous
    thing ids (panoptic)."""

    def __init__(self, model: nn.Module, task: str, object_mask_threshold: float = 0.8,
                 overlap_threshold: float = 0.8, thing_classes: Iterable[int] = (), instance_topk: int | None = None,
                 instance_things_only: bool = False, max_windows: int = 1):
        super().__init__()
        if task not in TASKS:
            raise ExportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self.eomt = isinstance(model, EoMT)
        if not self.eomt and (not hasattr(model, "predictor") or getattr(model.predictor, "class_embed", None) is None):
            raise ExportError(f"{type(model).__name__} is not a mask-classification model with a class head; "
                              f"only {EXPORTABLE_NAMES} checkpoints can be exported")
        self.model = model.eval()
        self.task = task
        self.confident_pixels = bool(getattr(model, "panoptic_confident_pixels", False))  # the architecture's panoptic rule
        self.size_divisibility = int(model.size_divisibility)
        # EoMT (official inference): the square model size; semantic: windows run per image
        # (always max_windows, the most an image of the exported size range needs)
        self.window = int(model.inference_size) if self.eomt else 0
        self.max_windows = max(1, int(max_windows))
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        num_classes = num_classes_of(model)
        self.instance_topk = instance_topk
        self.instance_things_only = bool(instance_things_only)
        isthing = torch.zeros(num_classes + 1, dtype=torch.bool)  # index K ("no object"): never kept
        for c in thing_classes:
            isthing[int(c)] = True
        self.register_buffer("isthing_table", isthing, persistent=False)

    def forward(self, image: Tensor, output_size: Tensor):
        h, w = image.shape[-2], image.shape[-1]
        out_h = output_size[0].item()
        out_w = output_size[1].item()
        torch._check(out_h > 0)
        torch._check(out_w > 0)
        if self.eomt and self.task == "semantic":
            return self._eomt_semantic(image, (out_h, out_w))
        if self.eomt:  # official: the uint8 image padded with black to the square model size
            x = self._normalise(F.pad(image, (0, self.window - w, 0, self.window - h)))
        else:
            x = self._normalise(image)
        if self.size_divisibility > 1 and not self.eomt:  # zero padding after normalisation, bottom / right
            d = self.size_divisibility
            x = F.pad(x, (0, (d - w % d) % d, 0, (d - h % d) % d))
        input_size = (x.shape[-2], x.shape[-1])
        out = self.model(x[None])
        class_logits = out.class_logits[-1, 0].float()  # [Q, K+1]
        mask_embed = out.mask_embed[-1, 0].float()  # [Q, C]
        pixel_embed = final_pixel_embed(out.pixel_embed)[0].float()  # [C, h/4, w/4] of the final prediction
        if self.task == "instance":
            return self._instance(class_logits, mask_embed, pixel_embed, input_size, (h, w), (out_h, out_w))
        logits = torch.einsum("bqc,bchw->bqhw", mask_embed[None], pixel_embed[None])
        logits = F.interpolate(logits, size=input_size, mode="bilinear", align_corners=False)[0]  # [Q, Hp, Wp]
        if self.task == "semantic":
            # The class sum and the crop + resize are linear, so they commute: resizing the Q
            # mask probabilities before the sum gives the reference's scores up to rounding, with
            # Q maps resized instead of K, and the scores pixel-major ([H*W, K]: one GEMM, then an
            # argmax over contiguous classes; Inductor's fused resize + argmax over K planes was
            # the slow part of the program). A product, not an einsum: AOTInductor cannot lower
            # an einsum over the data-dependent output sides.
            probs = class_logits.softmax(-1)[:, :-1]  # [Q, K]
            masks = _resize(_crop(logits.sigmoid(), h, w), (out_h, out_w))  # [Q, H, W]
            return (masks.flatten(1).t() @ probs).argmax(-1).view(out_h, out_w)
        masks = _resize(_crop(logits, h, w), (out_h, out_w)).sigmoid()  # [Q, H, W]
        return self._panoptic(class_logits, masks)

    def _normalise(self, image: Tensor) -> Tensor:
        """uint8 [..., 3, h, w] -> float32, normalised with the model's pixel mean and std."""
        return (image.float() - self.model.pixel_mean) / self.model.pixel_std

    def _eomt_semantic(self, image: Tensor, output_size) -> Tensor:
        """``ops.window_semantic_inference`` of the official windows (``semantic_windows``) with
        static shapes: the image (shorter side = the window side S) always gives
        ``max_windows`` windows; window j starts at ``floor(j * (S - overlap / (n - 1)))``
        along the longer side (rows when h > w) and is masked out where j >= n, the count
        the image needs. Averaging is a gather per window (its scores placed by index, weight 0
        outside it) instead of the op's slice-add, which would guard on the window offsets."""
        size = self.window
        h, w = image.shape[-2], image.shape[-1]
        rows, cols = torch.arange(h, device=image.device), torch.arange(w, device=image.device)
        height = torch.zeros((), dtype=torch.float64, device=image.device) + h
        width = torch.zeros((), dtype=torch.float64, device=image.device) + w
        tall = height > width
        long = torch.maximum(height, width)
        count = torch.ceil(long / size)  # windows this image needs
        overlap = count * size - long
        shift = torch.where(overlap > 0, overlap / (count - 1).clamp(min=1), torch.zeros_like(overlap))
        side = torch.arange(size, device=image.device)
        crops, placements = [], []
        for j in range(self.max_windows):
            start = torch.floor(j * (size - shift)).long()
            top, left = torch.where(tall, start, 0), torch.where(tall, 0, start)
            crop = image.index_select(1, (top + side).clamp(max=h - 1))
            crops.append(crop.index_select(2, (left + side).clamp(max=w - 1)))
            placements.append((top, left, torch.tensor(j, dtype=torch.float64) < count))
        out = self.model(self._normalise(torch.stack(crops)))  # [n, 3, S, S]
        class_logits = out.class_logits[-1].float()  # [n, Q, K+1]
        logits = torch.einsum("nqc,nchw->nqhw", out.mask_embed[-1].float(), final_pixel_embed(out.pixel_embed).float())
        masks = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False).sigmoid()
        scores = torch.einsum("nqk,nqhw->nkhw", class_logits.softmax(-1)[..., :-1], masks)  # [n, K, S, S]
        total = counts = None
        for j, (top, left, used) in enumerate(placements):
            r, c = rows - top, cols - left
            inside = (((r >= 0) & (r < size))[:, None] & ((c >= 0) & (c < size))[None, :] & used).float()  # [h, w]
            placed = scores[j].index_select(1, r.clamp(0, size - 1)).index_select(2, c.clamp(0, size - 1)) * inside
            total = placed if total is None else total + placed
            counts = inside if counts is None else counts + inside
        mean = total / counts  # [K, h, w]
        return _resize(mean, output_size).argmax(0)

    def _instance(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, input_size, image_size,
                  output_size):
        """``ops.instance_inference`` (the official Mask2Former instance post-processing) with
        static shapes: the top N (query, class) pairs by class probability, their masks
        ``logit > 0`` at the output size, score = class prob x mean mask probability inside the
        mask. ``keep`` [N] marks the rows that are instances: all of them, or with
        ``instance_things_only`` (the official rule when panoptic inference is on) the thing
        classes' rows, which predict drops the others of."""
        num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
        probs = class_logits.softmax(-1)[:, :-1]  # [Q, K]
        count = instance_count(num_queries, num_classes, self.instance_topk)
        top_scores, flat = probs.flatten().topk(count, sorted=True)
        query, labels = flat // num_classes, flat % num_classes
        logits = torch.einsum("qc,chw->qhw", mask_embed[query], pixel_embed)  # [N, h, w]
        logits = F.interpolate(logits[None], size=input_size, mode="bilinear", align_corners=False)[0]
        logits = _resize(_crop(logits, *image_size), output_size)  # [N, H, W]
        masks = logits > 0
        inside = masks.flatten(1).float()
        mask_score = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
        keep = self.isthing_table[labels] if self.instance_things_only else labels >= 0  # all rows
        return masks, top_scores * mask_score, labels, keep

    def _panoptic(self, class_logits: Tensor, masks: Tensor):
        """``panoptic_assign_reference`` + ``assemble_panoptic`` over all Q queries with static
        shapes: dropped queries are masked, not removed."""
        q = class_logits.shape[0]
        num_classes = class_logits.shape[1] - 1
        scores, labels = class_logits.softmax(-1).max(-1)
        keep = (labels != num_classes) & (scores > self.object_mask_threshold)  # [Q]
        # products of kept queries are >= 0: -1 never wins; ties go to the first query
        weighted = torch.where(keep[:, None, None], scores[:, None, None] * masks, -1.0)
        ids = weighted.argmax(0)  # [H, W]
        query = torch.arange(q, device=ids.device)
        flat = ids.flatten()  # a histogram, not Q comparisons of the whole map (which Inductor
        # fuses with the argmax above and recomputes per query)
        assigned = torch.zeros(q, dtype=torch.int64, device=ids.device).scatter_add(0, flat, torch.ones_like(flat))
        full = (masks >= 0.5).flatten(1).sum(1)  # [Q] confident pixels
        ratio = assigned.double() / full.clamp(min=1).double()  # python's area / full
        valid = keep & (assigned > 0) & (full > 0) & (ratio >= self.overlap_threshold)
        confident = None
        if self.confident_pixels:  # official Mask2Former / EoMT: a segment keeps the won pixels where it is confident
            confident = masks.gather(0, ids[None])[0] >= 0.5  # [H, W]
            won = torch.zeros(q, dtype=torch.int64, device=ids.device).scatter_add(0, flat, confident.flatten().long())
            valid = valid & (won > 0)
        isthing = self.isthing_table[labels]
        stuff = valid & ~isthing
        same = labels[:, None] == labels[None, :]  # [q, p]
        owners = same & stuff[None, :]  # valid stuff queries p of q's class
        earlier = query[None, :] < query[:, None]  # p < q
        new = valid & (isthing | ~(owners & earlier).any(1))  # queries that start a segment
        segment_id = torch.cumsum(new.int(), 0) * new.int()  # ids 1, 2, ... in query order
        first_owner = owners.int().argmax(1)  # a stuff query joins the first of its class
        lut = torch.where(stuff, segment_id[first_owner], segment_id).int()  # [Q]: 0 = void
        id_map = lut[ids] if confident is None else torch.where(confident, lut[ids], 0)
        return id_map, segment_id.int(), labels, isthing & new, scores


# ----------------------------------------------------------------------------- export
def dynamic_range(cfg, task: str | None = None) -> tuple[int, int]:
    """(min, max) of the exported image sides: any test-resized image of the preset (longest
    side <= ``max_size_test``, shortest = ``min_size_test`` unless the longest cap shrinks it).
    EoMT (square model size S = ``min_size_test``): semantic images have their shorter side at
    S, the longer up to ``max_size_test``, so sides in [S, max]; panoptic / instance images fit
    in S x S (sides in [2, S])."""
    top = max(int(cfg.data.max_size_test), int(cfg.data.min_size_test))
    if cfg.model.meta_arch == "eomt":
        size = int(cfg.model.backbone.img_size)
        return (size, max(top, size)) if task == "semantic" else (2, size)
    return MIN_SIDE, top


def eomt_max_windows(cfg) -> int:
    """The most windows EoMT's semantic inference cuts from an image of the exported range."""
    return -(-dynamic_range(cfg, "semantic")[1] // int(cfg.model.backbone.img_size))


def export_metadata(cfg, metadata, task: str, fmt: str, device: str = "cpu") -> dict:
    """What ``predict --model`` needs besides the program: task, test sizes, label space."""
    return {"format": fmt, "task": task, "device": device, "preset": cfg.name, "dataset": cfg.data.dataset,
            "min_size_test": int(cfg.data.min_size_test), "max_size_test": int(cfg.data.max_size_test),
            "test_resize": getattr(cfg.data, "test_resize", "shortest-edge"),
            "size_range": list(dynamic_range(cfg, task)), "num_queries": int(cfg.model.num_queries),
            "object_mask_threshold": float(cfg.test.object_mask_threshold),
            "overlap_threshold": float(cfg.test.overlap_threshold),
            "instance_topk": int(cfg.test.instance_topk), "architecture": cfg.model.meta_arch,
            "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
            "metadata": metadata.to_dict()}


def build_program(model: nn.Module, cfg, metadata, task: str) -> InferenceProgram:
    """The program of ``task`` with the thresholds and instance rules ``predict`` applies."""
    if isinstance(model, EoMT) and int(model.inference_size) != int(cfg.data.min_size_test):
        raise ExportError(f"EoMT runs at its square size {model.inference_size}, but data.min_size_test is "
                          f"{cfg.data.min_size_test}: set them equal (the eomt presets do)")
    return InferenceProgram(model, task, cfg.test.object_mask_threshold, cfg.test.overlap_threshold,
                            metadata.thing_classes, cfg.test.instance_topk,
                            bool(cfg.test.panoptic_on) and bool(len(metadata.thing_classes)),
                            eomt_max_windows(cfg) if isinstance(model, EoMT) else 1)


def example_inputs(cfg, device: str = "cpu", task: str | None = None) -> tuple[Tensor, Tensor]:
    """A test-size image (not square, not a multiple of 32) and its output size, for tracing."""
    lo, hi = dynamic_range(cfg, task)
    if cfg.model.meta_arch == "eomt":  # inside the range, neither side at its ends
        h, w = lo + 1 + (hi - lo - 2) // 3, hi - 1
    else:
        h = max(lo + 1, min(hi - 1, int(cfg.data.min_size_test) + 1))
        w = max(lo + 1, min(hi - 1, h * 4 // 3 + 3))
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    return image.to(device), torch.tensor([2 * h + 1, 2 * w - 1], dtype=torch.int64, device=device)


def _dynamic_shapes(cfg, task: str | None = None):
    lo, hi = dynamic_range(cfg, task)
    dim = torch.export.Dim
    return ({1: dim("h", min=lo, max=hi), 2: dim("w", min=lo, max=hi)}, None)


def export_program(model: nn.Module, cfg, metadata, task: str, fmt: str, output: str | Path,
                   device: str = "cpu") -> Path:
    """Export ``model`` (eval mode) for ``task`` as ``fmt`` ("pt2" | "onnx") to ``output``. ``device``:
    what a pt2 is compiled for ("cuda": its inputs and outputs live on the GPU; the Triton
    operators the model calls there, e.g. the deformable attention, are compiled into the
    package); ONNX is traced on the CPU."""
    if fmt not in FORMATS:
        raise ExportError(f"unsupported format {fmt!r}; choose one of {', '.join(FORMATS)}")
    device = str(torch.device(device))
    if fmt == "onnx" and device != "cpu":
        raise ExportError(f"ONNX files are traced on the CPU (device-independent), not on {device}")
    check_label_space(num_classes_of(model), metadata, "the model", cfg.data.dataset)
    program = build_program(model.to(device).eval(), cfg, metadata, task).eval()
    info = json.dumps(export_metadata(cfg, metadata, task, fmt, torch.device(device).type))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(cfg, device, task)
    with torch.no_grad():
        if fmt == "pt2":
            ep = torch.export.export(program, args, dynamic_shapes=_dynamic_shapes(cfg, task), strict=False)
            from torch._inductor import aoti_compile_and_package

            # no per-load bounds checks on the resampling gathers (their indices are clamped)
            configs = {"aot_inductor.metadata": {METADATA_KEY: info}, "assert_indirect_indexing": False}
            aoti_compile_and_package(ep, package_path=str(output), inductor_configs=configs)
        else:
            import logging

            import onnx

            # the optimiser warns once per Split it leaves unfolded (harmless): keep the CLI quiet
            logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)
            onnx_program = torch.onnx.export(program, args, dynamo=True, dynamic_shapes=_dynamic_shapes(cfg, task),
                                             input_names=["image", "output_size"],
                                             output_names=_output_names(task), opset_version=ONNX_OPSET,
                                             verbose=False)
            proto = onnx_program.model_proto
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, info
            onnx.save(proto, str(output))
            onnx.checker.check_model(str(output), full_check=True)
    return output


def _output_names(task: str) -> list[str]:
    if task == "semantic":
        return ["labels"]
    if task == "instance":
        return ["masks", "scores", "classes", "keep"]
    return ["id_map", "segment_id", "category_id", "isthing", "score"]


# ----------------------------------------------------------------------------- running a file
class ExportedModel:
    """A ``.pt2`` or ``.onnx`` file from :func:`export_program`: ``model(image, (H, W))`` returns
    the program's outputs as torch tensors; ``info`` holds the embedded metadata."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"exported model {self.path} not found")
        suffix = self.path.suffix.lower()
        if suffix == ".pt2":
            self.format = "pt2"
            try:
                self._runner = torch._inductor.aoti_load_package(str(self.path))
                raw = self._runner.get_metadata().get(METADATA_KEY)
            except Exception as exc:  # noqa: BLE001 - any load failure is a bad file
                raise ExportError(f"{self.path} is not a loadable AOTInductor package ({exc})") from exc
        elif suffix == ".onnx":
            self.format = "onnx"
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise ExportError("running .onnx files needs onnxruntime: pip install 'fastmaskformer[export]'") from exc
            try:
                self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
                raw = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"{self.path} is not a loadable ONNX model ({exc})") from exc
        else:
            raise ExportError(f"exported model {self.path}: unknown suffix {suffix!r} (expected .pt2 or .onnx)")
        if raw is None:
            raise ExportError(f"{self.path} carries no fastmaskformer metadata (not written by fastmaskformer export)")
        self.info = json.loads(raw)
        self.task = self.info["task"]
        self.device = self.info.get("device", "cpu")  # where a pt2's inputs must live
        if self.device != "cpu" and not torch.cuda.is_available():
            raise ExportError(f"{self.path} was compiled for {self.device}, which this machine lacks")

    def __call__(self, image: Tensor, output_size: Sequence[int]) -> tuple[Tensor, ...]:
        lo, hi = self.info.get("size_range", (1, float("inf")))
        if not all(lo <= int(side) <= hi for side in image.shape[-2:]):
            raise ExportError(f"{self.path} takes image sides in [{lo}, {hi}], got {tuple(image.shape[-2:])} "
                              "(re-export with a larger data.max_size_test for longer images)")
        size = torch.tensor([int(output_size[0]), int(output_size[1])], dtype=torch.int64)
        image = image.contiguous()
        if self.format == "pt2":
            out = self._runner(image.to(self.device), size.to(self.device))
            out = tuple(out) if isinstance(out, (list, tuple)) else (out,)
            return tuple(t.cpu() for t in out)
        outs = self._session.run(None, {"image": image.numpy(), "output_size": size.numpy()})
        return tuple(torch.from_numpy(o) for o in outs)

    def predict(self, image: Tensor, output_size: Sequence[int]) -> dict:
        """The :func:`fastmaskformer.engine.predictor.infer` result of this file's task."""
        outs = self(image, output_size)
        if self.task == "semantic":
            return {"semantic": outs[0].long()}
        if self.task == "instance":
            masks, scores, classes, keep = outs
            keep = keep.bool()
            return {"instance": {"masks": masks.bool()[keep], "scores": scores[keep].float(),
                                 "labels": classes[keep].long()}}
        id_map, segment_id, category_id, isthing, score = outs
        segments = [{"id": int(s), "category_id": int(c), "isthing": bool(t), "score": float(p)}
                    for s, c, t, p in zip(segment_id.tolist(), category_id.tolist(), isthing.tolist(),
                                          score.tolist()) if s > 0]
        return {"panoptic": (id_map.int(), segments)}


def load_metadata(info: dict):
    from ..data.metadata import Metadata

    return Metadata.from_dict(info["metadata"], source="exported model")


class ExportedPredictor(Predictor):
    """:class:`~fastmaskformer.engine.predictor.Predictor` with an exported file as the model:
    the same test resize and output files, one image at a time (the program takes one image)."""

    def __init__(self, exported: ExportedModel, sem_ids: str = "dataset"):
        info = exported.info
        self.exported = exported
        cfg = SimpleNamespace(data=SimpleNamespace(min_size_test=info["min_size_test"],
                                                   max_size_test=info["max_size_test"],
                                                   test_resize=info.get("test_resize", "shortest-edge"),
                                                   task=info["task"], dataset=info.get("dataset", "")))
        super().__init__(nn.Identity(), cfg, load_metadata(info), batch_size=1, sem_ids=sem_ids)

    def predict(self, images: Sequence[Tensor], tasks: Iterable[str] = ("semantic",)) -> list[dict]:
        tasks = tuple(tasks)
        if set(tasks) != {self.exported.task}:
            raise ExportError(f"{self.exported.path} was exported for --task {self.exported.task}, "
                              f"not {' '.join(tasks)}")
        results = []
        for image in images:
            size = (int(image.shape[-2]), int(image.shape[-1]))
            results.append(self.exported.predict(resize_image(image, self._test_size(*size)), size))
        return results
