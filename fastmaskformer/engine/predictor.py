"""Inference on images: batched model calls, DESIGN 4 post-processing, files on disk.

- :func:`load_image`: any PIL-readable file (RGB, RGBA, grayscale, 16-bit, palette, CMYK,
  EXIF-rotated) -> uint8 ``[3, H, W]`` RGB.
- :func:`infer`: a batch of (already resized) images -> per-image semantic labels, panoptic
  id map + segments_info and/or instance masks at each image's output (original) size.
- :func:`semantic_tta`: multi-scale + flip test-time augmentation (``cfg.test.aug_*``).
- :class:`Predictor`: paths or a folder -> files: ``<stem>_sem.png`` (label ids as the dataset's
  ground truth stores them, see :func:`semantic_id_table`; 16-bit when they pass 255), ``<stem>_overlay.png`` (class colours over the image), ``<stem>_panoptic.png``
  (COCO RGB-encoded ids) + ``panoptic.json`` (COCO panoptic annotations), ``<stem>_instances.npz``
  (masks, scores, labels).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from .. import ops
from ..data import transforms
from ..data.metadata import check_label_space
from ..data.loader import padded_size
from ..data.transforms import eomt_test_size, resized_test_size, shortest_edge_size
from ..modeling import num_classes_of
from ..modeling.eomt import EoMT
from ..ops.window_inference import semantic_windows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TASKS = ("semantic", "panoptic", "instance")
# predict_files reads this many batches of images at a time, so images of one padded test size
# can fill a batch together (mixed sizes never share one, see same_padding_groups)
GROUPING_WINDOW = 4


def load_image(path: str | Path) -> Tensor:
    """Read any PIL-readable image as uint8 ``[3, H, W]`` RGB.

    16-bit images are scaled to 8 bits (65535 -> 255), float images by their maximum, alpha is
    dropped, palette / grayscale / CMYK are converted to RGB.
    Raises ValueError naming the path when the file is not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        array = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            top = max(float(array.max()), 1.0)
        else:  # 16-bit data (PIL may also open 16-bit PNGs as 32-bit "I")
            top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
    else:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, h, w]`` on the CPU, with the resize of the training and
    evaluation transforms (:func:`fastmaskformer.data.transforms.resize_image`: PIL bilinear,
    antialiased when shrinking, as detectron2), so predict and eval see identical inputs."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise TypeError(f"images must be uint8 [3, H, W] (0-255), got {image.dtype} of shape {tuple(image.shape)}")
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = transforms.resize_image(image.permute(1, 2, 0).cpu().numpy(), tuple(size))
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def _float_outputs(outputs):
    return type(outputs)(*(t.float() for t in outputs.as_tuple()))


@torch.no_grad()
def run_model(model: nn.Module, images: Sequence[Tensor], amp: bool = False):
    """(float32 outputs, image_sizes, input_size) of ``model`` on images ``[3, h_i, w_i]``
    (0-255); ``input_size`` is the padded batch's (H, W), which the stride-4 outputs need not
    divide (``model.size_divisibility`` 0): inference upsamples to it, not to 4x the embedding."""
    batch, sizes = model.preprocess(list(images))
    device = batch.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(batch)
    return _float_outputs(outputs), sizes, (int(batch.shape[-2]), int(batch.shape[-1]))


def _per_pixel_semantic(outputs, image_sizes, output_sizes, input_size) -> list[Tensor]:
    """Per-pixel baseline outputs -> int64 labels at output sizes (logits upsampled to the
    model input size, cropped, resized)."""
    up = outputs.sem_seg_logits(input_size)
    return [ops.inference.crop_and_resize(up[b], image_sizes[b], output_sizes[b]).argmax(0)
            for b in range(up.shape[0])]


def same_padding_groups(sizes: Sequence[tuple[int, int]], size_divisibility: int) -> list[list[int]]:
    """Indices of images of ``sizes`` [(h, w)] grouped by the size each one pads to on its own
    (``size_divisibility``; 0: its own size), groups in order of first appearance. A batch of one
    group pads no image beyond what it gets alone, so its predictions do not depend on its batch
    mates (a batch padded to a larger mate shifts the model's border context and the resize)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(padded_size([size], size_divisibility), []).append(i)
    return list(groups.values())


@torch.no_grad()
def infer(model: nn.Module, images: Sequence[Tensor], output_sizes: Sequence[tuple[int, int]], test_cfg,
          tasks: Iterable[str] = ("semantic",), thing_classes: Iterable[int] = (), amp: bool = False) -> list[dict]:
    """images: list of ``[3, h_i, w_i]`` (test-resized, 0-255); output_sizes: original (H_i, W_i).

    Returns one dict per image with the requested ``tasks``: ``"semantic"`` int64 [H, W];
    ``"panoptic"`` (int32 id map [H, W], segments_info with contiguous category ids);
    ``"instance"`` {"masks" bool [N, H, W], "scores" [N], "labels" [N]}.
    Images that pad to different sizes run as separate batches (:func:`same_padding_groups`), so
    each image's result is the one it gets alone (up to float summation order).
    """
    tasks = set(tasks)
    thing_classes = list(thing_classes)  # read twice (panoptic, instance)
    unknown = tasks - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
    if isinstance(model, EoMT):
        return _eomt_infer(model, images, output_sizes, test_cfg, tasks, thing_classes, amp)
    groups = same_padding_groups([tuple(im.shape[-2:]) for im in images], int(getattr(model, "size_divisibility", 0)))
    if len(groups) > 1:
        results: list[dict] = [{} for _ in images]
        for group in groups:
            batch = infer(model, [images[i] for i in group], [output_sizes[i] for i in group], test_cfg, tasks,
                          thing_classes, amp)
            for i, result in zip(group, batch):
                results[i] = result
        return results
    outputs, sizes, input_size = run_model(model, images, amp)
    if not hasattr(outputs, "class_logits"):  # per-pixel baselines: semantic only
        if tasks - {"semantic"}:
            raise ValueError(f"{type(model).__name__} predicts semantic segmentation only, not {sorted(tasks - {'semantic'})}")
        return [{"semantic": labels} for labels in _per_pixel_semantic(outputs, sizes, output_sizes, input_size)]
    return _mask_classification_results(outputs, sizes, output_sizes, input_size, test_cfg, tasks, thing_classes,
                                        confident_pixels=getattr(model, "panoptic_confident_pixels", False))


def _mask_classification_results(outputs, sizes, output_sizes, input_size, test_cfg, tasks: set,
                                 thing_classes: list, confident_pixels: bool = False) -> list[dict]:
    """The fused post-processing (``ops``) of the final prediction of ``outputs`` (lazy
    ``MaskFormerOutput`` of a batch whose input was ``input_size``; ``sizes``: each image's size
    inside it; ``output_sizes``: the original sizes) for ``tasks``: one dict per image.
    ``confident_pixels``: the panoptic segment rule of ``ops.panoptic_inference``."""
    results: list[dict] = [{} for _ in sizes]
    args = (outputs.class_logits[-1], outputs.mask_embed[-1], outputs.pixel_embed, sizes, output_sizes)
    if "semantic" in tasks:
        for r, labels in zip(results, ops.semantic_inference(*args, input_size=input_size)):
            r["semantic"] = labels
    if "panoptic" in tasks:
        pan = ops.panoptic_inference(*args, object_mask_threshold=test_cfg.object_mask_threshold,
                                     overlap_threshold=test_cfg.overlap_threshold, thing_classes=thing_classes,
                                     input_size=input_size, confident_pixels=confident_pixels)
        for r, p in zip(results, pan):
            r["panoptic"] = p
    if "instance" in tasks:
        # Official Mask2Former: the top 100 (query, class) pairs per image (TEST.DETECTIONS_PER_IMAGE).
        topk = getattr(test_cfg, "instance_topk", None)
        things = torch.tensor(sorted(set(int(c) for c in thing_classes)), dtype=torch.int64)
        for r, inst in zip(results, ops.instance_inference(*args, topk=topk, input_size=input_size)):
            if getattr(test_cfg, "panoptic_on", False) and things.numel():
                # Official Mask2Former: with panoptic on, instances are thing classes only.
                keep = torch.isin(inst["labels"].cpu(), things)
                inst = {k: v[keep.to(v.device)] for k, v in inst.items()}
            r["instance"] = inst
    return results


def _eomt_images(images: Sequence[Tensor], output_sizes: Sequence[tuple[int, int]], size: int,
                 task: str) -> list[Tensor]:
    """Each image at its official EoMT test size (:func:`eomt_test_size` of its original size
    ``output_sizes[i]``), resized with :func:`resize_image` unless it already has that size (a
    dataset or ``Predictor`` resized it)."""
    resized = []
    for image, original in zip(images, output_sizes):
        target = eomt_test_size(*original, size, task)
        same = tuple(image.shape[-2:]) == target
        resized.append(image if same else resize_image(image.cpu(), target).to(image.device))
    return resized


def _eomt_infer(model: nn.Module, images: Sequence[Tensor], output_sizes: Sequence[tuple[int, int]], test_cfg,
                tasks: set, thing_classes: list, amp: bool) -> list[dict]:
    """:func:`infer` for EoMT as the official code runs it (tue-mps/eomt ``training/``), at the
    model's square size S (``model.inference_size``):

    - semantic: the shorter side resized to S, overlapping S x S windows run as one batch, their
      class scores averaged and resized back (``ops.window_inference``);
    - panoptic / instance: the longer side resized to S, zero-padded (black pixels, before
      normalisation, as the official ``pad`` of the uint8 image) to S x S at the bottom / right;
      then the fused post-processing crops the padding off the logits and resizes them to the
      original size; panoptic segments keep only their query's confident pixels, as the
      official ``to_per_pixel_preds_panoptic`` (``confident_pixels``).
    Images come at any size (originals, or already at their test size); ``output_sizes`` are
    the originals."""
    size = int(model.inference_size)
    results: list[dict] = [{} for _ in images]
    if "semantic" in tasks:
        resized = _eomt_images(images, output_sizes, size, "semantic")
        crops, windows = [], []
        for i, image in enumerate(resized):
            for top, left in semantic_windows(tuple(image.shape[-2:]), size):
                crops.append(image[:, top:top + size, left:left + size])
                windows.append((i, top, left))
        outputs, _, _ = run_model(model, crops, amp)
        labels = ops.window_semantic_inference(outputs.class_logits[-1], outputs.mask_embed[-1], outputs.pixel_embed,
                                               windows, [tuple(im.shape[-2:]) for im in resized], output_sizes, size)
        for r, label in zip(results, labels):
            r["semantic"] = label
    if tasks - {"semantic"}:
        resized = _eomt_images(images, output_sizes, size, "panoptic")
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in resized]
        padded = [F.pad(im, (0, size - w, 0, size - h)) for im, (h, w) in zip(resized, sizes)]
        outputs, _, input_size = run_model(model, padded, amp)
        other = _mask_classification_results(outputs, sizes, output_sizes, input_size, test_cfg,
                                             tasks - {"semantic"}, thing_classes,
                                             confident_pixels=getattr(model, "panoptic_confident_pixels", False))
        for r, o in zip(results, other):
            r.update(o)
    return results


@torch.no_grad()
def semantic_tta(model: nn.Module, image: Tensor, output_size: tuple[int, int], test_cfg, amp: bool = False) -> Tensor:
    """Multi-scale (+ flip) semantic prediction of one test-resized image (uint8 ``[3, h, w]``)
    as detectron2's ``DatasetMapperTTA``: each view resizes the shortest edge of ``image`` to a
    scale of ``test_cfg.aug_scales`` (longest <= ``aug_max_size``; no scales: ``image`` as is)
    with :func:`resize_image`; scores are averaged at the original size ``output_size``.
    Returns int64 labels [H, W]."""
    if isinstance(model, EoMT):
        raise ValueError("test-time augmentation is not defined for EoMT (its official inference averages "
                         "windows at one scale): unset test.aug_scales and test.aug_flip")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    scales = tuple(test_cfg.aug_scales) or (min(height, width),)
    flips = (False, True) if test_cfg.aug_flip else (False,)
    views = []
    for scale in scales:
        size = shortest_edge_size(height, width, int(scale), int(test_cfg.aug_max_size))
        resized = resize_image(image, size)
        for flip in flips:
            view = resized.flip(-1) if flip else resized
            outputs, sizes, input_size = run_model(model, [view], amp)
            if not hasattr(outputs, "class_logits"):
                raise ValueError("test-time augmentation needs a MaskFormer model")
            views.append({"class_logits": outputs.class_logits[-1, 0], "mask_embed": outputs.mask_embed[-1, 0],
                          "pixel_embed": ops.final_pixel_embed(outputs.pixel_embed)[0], "image_size": sizes[0],
                          "input_size": input_size, "flipped": flip})
    return ops.semantic_inference_tta(views, tuple(output_size))


# ----------------------------------------------------------------------------- files
def colorize(labels: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """int labels [H, W] -> uint8 [H, W, 3] class colours (labels outside the palette: black)."""
    palette = np.zeros((max(len(colors), 1) + 1, 3), np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8).reshape(-1, 3)
    index = np.where((labels >= 0) & (labels < len(colors)), labels, len(colors))
    return palette[index]


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5, mask: np.ndarray | None = None) -> np.ndarray:
    """Blend ``colour`` [H, W, 3] over ``image`` [H, W, 3] (uint8), where ``mask`` (default all)."""
    out = image.astype(np.float32)
    blended = (1 - alpha) * out + alpha * colour.astype(np.float32)
    if mask is not None:
        blended = np.where(mask[..., None], blended, out)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Panoptic ids [H, W] -> uint8 [H, W, 3] (COCO: id = R + 256 G + 256^2 B)."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def _segment_colours(segments_info: list, colors, seed: int = 0) -> dict:
    """Segment id -> colour: the class colour, jittered for things so instances differ."""
    rng = np.random.default_rng(seed)
    out = {}
    for seg in segments_info:
        base = np.asarray(colors[seg["category_id"]], np.int64) if seg["category_id"] < len(colors) else np.full(3, 128)
        if seg.get("isthing"):
            base = np.clip(base + rng.integers(-60, 61, 3), 0, 255)
        out[seg["id"]] = base.astype(np.uint8)
    return out


# datasets whose ground truth counts classes from 1 with 0 = "other" (ADE20K's annotations/*.png)
ONE_BASED = ("ade20k-150", "ade20k-panoptic", "synthetic-semantic")
SEM_IDS = ("dataset", "contiguous", "cityscapes-ids")


def semantic_id_table(dataset: str, num_classes: int, mode: str = "dataset") -> np.ndarray | None:
    """Contiguous class k -> the id written to ``<stem>_sem.png`` (None: k itself).

    mode "dataset": the ids of the dataset's ground truth: ADE20K (150 classes, panoptic and the
    synthetic ADE layout) k + 1, so 0 stays "other" as in ``annotations/*.png``; every other
    dataset its training label ids (Cityscapes train ids as ``*_labelTrainIds.png``, ADE20K-Full
    and COCO-Stuff as the prepared annotations). "contiguous": k. "cityscapes-ids": Cityscapes
    label ids (7 = road, ... 33 = bicycle, as ``*_labelIds.png``).
    """
    if mode not in SEM_IDS:
        raise ValueError(f"unknown semantic id mode {mode!r}; choose one of {', '.join(SEM_IDS)}")
    if mode == "cityscapes-ids":
        from ..data.prepare.cityscapes import LABELS

        if not dataset.startswith("cityscapes"):
            raise ValueError(f"cityscapes-ids needs a Cityscapes model, not one for {dataset}")
        by_train = {train: label for label, train in LABELS.values() if 0 <= train < 255}
        return np.asarray([by_train[k] for k in range(num_classes)], np.int64)
    if mode == "dataset" and dataset in ONE_BASED:
        return np.arange(1, num_classes + 1, dtype=np.int64)
    return None


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files and folders (non-recursive, image suffixes only) -> sorted unique image paths."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item} not found")
    if not paths:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return list(dict.fromkeys(paths))


class Predictor:
    """model + config + metadata -> predictions for image files, written under ``out_dir``.

    Images are resized as the evaluation dataset resizes them (``cfg.data.test_resize``:
    shortest edge ``cfg.data.min_size_test``, longest <= ``max_size_test``, :func:`resize_image`;
    EoMT: per task inside :func:`infer`, as its official inference), test-time augmentation
    starts from that image as in evaluation, and batches of ``batch_size`` run on ``device``;
    every output is at the original image size.
    """

    def __init__(self, model: nn.Module, cfg, metadata, device: str | torch.device = "cpu",
                 batch_size: int = 4, amp: bool = False, sem_ids: str = "dataset"):
        check_label_space(num_classes_of(model), metadata, "the model", getattr(cfg.data, "dataset", None))
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.metadata = metadata
        self.batch_size = max(1, int(batch_size))
        self.amp = amp
        self.sem_table = semantic_id_table(cfg.data.dataset, metadata.num_classes, sem_ids)
        top = metadata.num_classes - 1 if self.sem_table is None else int(self.sem_table.max(initial=0))
        self.sem_dtype = np.uint8 if top <= 255 else np.uint16
        self.failures: list[tuple[Path, str]] = []  # (image, reason) of the last predict_files

    def _test_size(self, h: int, w: int) -> tuple[int, int]:
        return resized_test_size(self.cfg.data, h, w)

    def predict(self, images: Sequence[Tensor], tasks: Iterable[str] = ("semantic",)) -> list[dict]:
        """uint8 ``[3, H_i, W_i]`` images -> :func:`infer` results at the original sizes, in order.
        Batches hold images of one padded test size (:func:`same_padding_groups`), so a result
        does not depend on the other images or on ``batch_size``."""
        tasks = tuple(tasks)
        results: list[dict] = [{} for _ in images]
        use_tta = "semantic" in tasks and (self.cfg.test.aug_scales or self.cfg.test.aug_flip)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        # EoMT resizes inside infer, from the original, as each task's official inference does
        test_sizes = sizes if isinstance(self.model, EoMT) else [self._test_size(*s) for s in sizes]
        divisibility = int(getattr(self.model, "size_divisibility", 0))
        order = [i for group in same_padding_groups(test_sizes, divisibility) for i in group]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            resized = [resize_image(images[i], test_sizes[i]) for i in chunk]
            out_sizes = [sizes[i] for i in chunk]
            other = tuple(t for t in tasks if t != "semantic") if use_tta else tasks
            batch = infer(self.model, resized, out_sizes, self.cfg.test, other, self.metadata.thing_classes,
                          self.amp) if other else [{} for _ in chunk]
            if use_tta:
                for r, im, s in zip(batch, resized, out_sizes):
                    r["semantic"] = semantic_tta(self.model, im, s, self.cfg.test, self.amp)
            for i, result in zip(chunk, batch):
                results[i] = result
        return results

    def predict_files(self, inputs: Iterable[str | Path], out_dir: str | Path,
                      tasks: Iterable[str] = ("semantic",)) -> list[Path]:
        """Predict every image of ``inputs`` (files / folders) and write the files listed in the
        module docstring into ``out_dir``. Returns the paths written.

        An image that cannot be read is skipped with one warning line on stderr naming it and the
        reason, and recorded in ``self.failures``; the others are predicted. ``out_dir`` is
        created only when there is something to write into it.
        """
        tasks = tuple(tasks)
        out_dir = Path(out_dir)
        paths = find_images(inputs)
        written: list[Path] = []
        annotations = []
        self.failures = []
        window = self.batch_size * GROUPING_WINDOW
        for start in range(0, len(paths), window):
            chunk, images = [], []
            for path in paths[start: start + window]:
                try:
                    images.append(load_image(path))
                    chunk.append(path)
                except ValueError as exc:
                    reason = str(exc).removeprefix(f"cannot read image {path}: ")
                    print(f"warning: skipping {path}: {reason}", file=sys.stderr)
                    self.failures.append((path, reason))
            if not images:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            for path, image, result in zip(chunk, images, self.predict(images, tasks)):
                rgb = image.permute(1, 2, 0).numpy()
                written += self._write(path, rgb, result, out_dir, annotations)
        if "panoptic" in tasks and written:
            categories = [{"id": int(i), "name": n, "isthing": int(t), "color": list(c)} for i, n, t, c in zip(
                self.metadata.dataset_ids, self.metadata.class_names, self.metadata.isthing, self.metadata.colors)]
            json_path = out_dir / "panoptic.json"
            json_path.write_text(json.dumps({"annotations": annotations, "categories": categories}, indent=1))
            written.append(json_path)
        return written

    def _write(self, path: Path, rgb: np.ndarray, result: dict, out_dir: Path, annotations: list) -> list[Path]:
        stem = path.stem
        written = []
        colors = self.metadata.colors
        if "semantic" in result:
            labels = result["semantic"].cpu().numpy()
            ids = labels if self.sem_table is None else self.sem_table[labels]
            written.append(out_dir / f"{stem}_sem.png")
            Image.fromarray(ids.astype(self.sem_dtype)).save(written[-1])
            written.append(out_dir / f"{stem}_overlay.png")
            Image.fromarray(overlay(rgb, colorize(labels, colors))).save(written[-1])
        if "panoptic" in result:
            ids, segments = result["panoptic"]
            ids = ids.cpu().numpy()
            written.append(out_dir / f"{stem}_panoptic.png")
            Image.fromarray(ids_to_rgb(ids)).save(written[-1])
            seg_colours = _segment_colours(segments, colors)
            vis = np.zeros_like(rgb)
            for seg_id, colour in seg_colours.items():
                vis[ids == seg_id] = colour
            written.append(out_dir / f"{stem}_panoptic_overlay.png")
            Image.fromarray(overlay(rgb, vis, mask=ids > 0)).save(written[-1])
            annotations.append({"image_id": stem, "file_name": f"{stem}_panoptic.png", "segments_info": [
                _coco_segment(s, ids, self.metadata.dataset_ids) for s in segments]})
        if "instance" in result:
            inst = result["instance"]
            written.append(out_dir / f"{stem}_instances.npz")
            np.savez_compressed(written[-1], masks=inst["masks"].cpu().numpy(), scores=inst["scores"].cpu().numpy(),
                                labels=inst["labels"].cpu().numpy())
        return written


def _coco_segment(seg: dict, ids: np.ndarray, dataset_ids: Sequence[int]) -> dict:
    """segments_info entry with the dataset's category id, area and bbox [x, y, w, h]."""
    ys, xs = np.nonzero(ids == seg["id"])
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] if ys.size else [0, 0, 0, 0]
    return {"id": int(seg["id"]), "category_id": int(dataset_ids[seg["category_id"]]), "isthing": int(seg["isthing"]),
            "score": float(seg["score"]), "area": int(ys.size), "bbox": bbox}
