"""Augmentation: the official MaskFormer training pipelines and the test-time resize.

Every transform is a callable ``t(image, seg, rng) -> (image, seg)`` on numpy arrays:

- ``image``: uint8 ``[H, W, 3]`` RGB (0-255, before normalisation),
- ``seg``: integer ``[H, W]`` map that must move with the image: a semantic label map (with its
  ignore label) or a panoptic segment-id map (0 = void),
- ``rng``: a ``numpy.random.Generator``; all randomness comes from it (never the global RNGs),
  so a pipeline is deterministic given the generator's seed.

Geometric transforms apply the same geometry to both arrays: bilinear (PIL, as detectron2) for
the image, nearest for ``seg``, both with the pixel-centre convention.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
from PIL import Image


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, seg, rng):
        for t in self.transforms:
            image, seg = t(image, seg, rng)
        return image, seg

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class OneOf:
    """Apply one of ``options`` (each a transform), chosen uniformly."""

    def __init__(self, options: Sequence):
        self.options = list(options)

    def __call__(self, image, seg, rng):
        return self.options[int(rng.integers(len(self.options)))](image, seg, rng)


# ----------------------------------------------------------------------------- geometry
def resize(image: np.ndarray, seg: np.ndarray, size: tuple) -> tuple:
    """Resize to ``size = (h, w)``: image with :func:`resize_image`, seg nearest."""
    if image.shape[:2] == tuple(size):
        return image, seg
    return resize_image(image, size), resize_nearest(seg, size)


def resize_image(image: np.ndarray, size: tuple) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[h, w, 3]``, PIL bilinear (antialiased when shrinking), as
    detectron2's ``ResizeTransform``. The one image resize of training, evaluation, prediction
    and test-time augmentation."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_nearest(seg: np.ndarray, size: tuple) -> np.ndarray:
    """Nearest-neighbour resize of an integer map ``[H, W]`` to ``size = (h, w)`` (any dtype;
    source pixel = floor((dst + 0.5) * H / h), the pixel-centre rule PIL uses)."""
    h, w = size
    src_h, src_w = seg.shape
    ys = np.minimum(((np.arange(h) + 0.5) * (src_h / h)).astype(np.int64), src_h - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * (src_w / w)).astype(np.int64), src_w - 1)
    return seg[ys[:, None], xs[None, :]]


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple:
    """Output (h, w) when resizing the shortest edge to ``short`` with the longest edge capped
    at ``max_size`` (detectron2's ``ResizeShortestEdge.get_output_shape``)."""
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def eomt_test_size(h: int, w: int, size: int, task: str) -> tuple:
    """Output (h, w) of the official EoMT test resize to the square model size ``size``
    (``scale_img_size_semantic`` / ``scale_img_size_instance_panoptic``): "semantic" scales the
    shorter side to ``size`` (the image is then cut into windows), "panoptic" / "instance" the
    longer side (the image is then padded); sides rounded as Python's ``round``, as there."""
    pick = max if task == "semantic" else min
    factor = pick(size / h, size / w)
    return round(h * factor), round(w * factor)


TEST_RESIZES = ("shortest-edge", "eomt")


def resized_test_size(data_cfg, h: int, w: int, task: str | None = None) -> tuple:
    """The test-resized (h, w) of an (h, w) image under ``data_cfg.test_resize``: "shortest-edge"
    (detectron2: shortest edge ``min_size_test``, longest <= ``max_size_test``) or "eomt"
    (:func:`eomt_test_size` at ``min_size_test`` for ``task``, default ``data_cfg.task``)."""
    mode = getattr(data_cfg, "test_resize", "shortest-edge")
    if mode == "eomt":
        return eomt_test_size(h, w, int(data_cfg.min_size_test), task or data_cfg.task)
    if mode != "shortest-edge":
        raise ValueError(f"data.test_resize must be one of {', '.join(TEST_RESIZES)}, got {mode!r}")
    return shortest_edge_size(h, w, int(data_cfg.min_size_test), int(data_cfg.max_size_test))


class ResizeForTest:
    """The test-time resize of :func:`resized_test_size` (``data_cfg``: a ``DataConfig``)."""

    def __init__(self, data_cfg):
        resized_test_size(data_cfg, 1, 1)  # a bad mode fails here, at build time
        self.data_cfg = data_cfg

    def __call__(self, image, seg, rng):
        return resize(image, seg, resized_test_size(self.data_cfg, *image.shape[:2]))

    def __repr__(self):
        d = self.data_cfg
        return f"ResizeForTest({getattr(d, 'test_resize', 'shortest-edge')}, {d.min_size_test}, {d.max_size_test})"


class ResizeShortestEdge:
    """Resize the shortest edge to a random choice of ``short_edges``, longest <= max_size."""

    def __init__(self, short_edges, max_size: int):
        self.short_edges = tuple(int(s) for s in np.atleast_1d(short_edges))
        self.max_size = int(max_size)

    def __call__(self, image, seg, rng):
        short = self.short_edges[int(rng.integers(len(self.short_edges)))] if len(self.short_edges) > 1 \
            else self.short_edges[0]
        h, w = image.shape[:2]
        return resize(image, seg, shortest_edge_size(h, w, short, self.max_size))

    def __repr__(self):
        return f"ResizeShortestEdge({list(self.short_edges)}, max_size={self.max_size})"


def _crop(image, seg, y0, x0, ch, cw):
    return image[y0:y0 + ch, x0:x0 + cw], seg[y0:y0 + ch, x0:x0 + cw]


class RandomCrop:
    """Random ``crop_size = (h, w)`` window (clipped to the image), optionally rejecting windows
    where one category covers more than ``single_category_max_area`` of the non-ignore pixels
    (up to 10 tries; the last try is kept), as detectron2's ``RandomCrop_CategoryAreaConstraint``."""

    def __init__(self, crop_size, single_category_max_area: float = 1.0, ignore_label: int = 255):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.max_area = float(single_category_max_area)
        self.ignore_label = ignore_label

    def __call__(self, image, seg, rng):
        h, w = image.shape[:2]
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        for _ in range(10 if self.max_area < 1.0 else 1):
            y0 = int(rng.integers(h - ch + 1))
            x0 = int(rng.integers(w - cw + 1))
            if self.max_area >= 1.0:
                break
            labels, counts = np.unique(seg[y0:y0 + ch, x0:x0 + cw], return_counts=True)
            counts = counts[labels != self.ignore_label]
            if len(counts) > 1 and counts.max() < counts.sum() * self.max_area:
                break
        return _crop(image, seg, y0, x0, ch, cw)

    def __repr__(self):
        return f"RandomCrop({self.crop_size}, single_category_max_area={self.max_area})"


class RandomCropRange:
    """Random crop whose height and width are drawn uniformly (inclusive) from
    ``[low, high]``, clipped to the image (detectron2 ``RandomCrop("absolute_range")``)."""

    def __init__(self, low: int, high: int):
        self.low, self.high = int(low), int(high)

    def __call__(self, image, seg, rng):
        h, w = image.shape[:2]
        ch = int(rng.integers(min(h, self.low), min(h, self.high) + 1))
        cw = int(rng.integers(min(w, self.low), min(w, self.high) + 1))
        y0 = int(rng.integers(h - ch + 1))
        x0 = int(rng.integers(w - cw + 1))
        return _crop(image, seg, y0, x0, ch, cw)

    def __repr__(self):
        return f"RandomCropRange({self.low}, {self.high})"


class RandomFlip:
    """Horizontal flip with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, seg, rng):
        if rng.random() < self.p:
            return image[:, ::-1], seg[:, ::-1]
        return image, seg

    def __repr__(self):
        return f"RandomFlip(p={self.p})"


class PadTo:
    """Pad bottom/right to at least ``size = (h, w)``: image with ``image_value`` (128, before
    normalisation, as the official semantic mapper), seg with ``seg_value`` (ignore / void)."""

    def __init__(self, size, image_value: int = 128, seg_value: int = 255):
        self.size = (int(size[0]), int(size[1]))
        self.image_value, self.seg_value = image_value, seg_value

    def __call__(self, image, seg, rng):
        h, w = image.shape[:2]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph == 0 and pw == 0:
            return image, seg
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=self.image_value)
        seg = np.pad(seg, ((0, ph), (0, pw)), constant_values=self.seg_value)
        return image, seg

    def __repr__(self):
        return f"PadTo({self.size}, image_value={self.image_value}, seg_value={self.seg_value})"


class ResizeScale:
    """Large-scale jitter resize (detectron2 ``ResizeScale``): a scale s uniform in
    [min_scale, max_scale], then the image resized by ``s * min(target_h / h, target_w / w)``
    (aspect kept)."""

    def __init__(self, min_scale: float, max_scale: float, target_size):
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.target = (int(target_size[0]), int(target_size[1]))

    def __call__(self, image, seg, rng):
        h, w = image.shape[:2]
        s = rng.uniform(self.min_scale, self.max_scale)
        scale = min(s * self.target[0] / h, s * self.target[1] / w)
        return resize(image, seg, (max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)))

    def __repr__(self):
        return f"ResizeScale({self.min_scale}, {self.max_scale}, {self.target})"


class FixedSizeCrop:
    """detectron2 ``FixedSizeCrop``: a ``crop_size`` window at a uniform random offset (clipped
    to the image), then padding bottom/right to exactly ``crop_size`` (image ``image_value``,
    128 as detectron2; seg ``seg_value``). With ``image_value`` 0 it is also EoMT's pad to the
    crop size followed by ``RandomCrop`` (its uint8 image padded with black)."""

    def __init__(self, crop_size, seg_value: int = 255, image_value: int = 128):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.pad = PadTo(self.crop_size, image_value, seg_value)

    def __call__(self, image, seg, rng):
        h, w = image.shape[:2]
        ch, cw = self.crop_size
        y0 = int(round((max(h - ch, 0)) * rng.uniform(0.0, 1.0)))
        x0 = int(round((max(w - cw, 0)) * rng.uniform(0.0, 1.0)))
        return self.pad(*_crop(image, seg, y0, x0, min(ch, h), min(cw, w)), rng)

    def __repr__(self):
        return f"FixedSizeCrop({self.crop_size})"


def lsj_train_augmentation(image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0,
                           ignore_label: int = 0) -> Compose:
    """Mask2Former's COCO large-scale jitter (``coco_panoptic_lsj`` mapper): horizontal flip,
    ``ResizeScale(0.1, 2.0)`` towards image_size x image_size, ``FixedSizeCrop(image_size)``."""
    size = (image_size, image_size)
    return Compose([RandomFlip(0.5), ResizeScale(min_scale, max_scale, size), FixedSizeCrop(size, ignore_label)])


def eomt_train_augmentation(image_size: int, min_scale: float, max_scale: float, ignore_label: int,
                            color_jitter: bool) -> Compose:
    """The official EoMT pipeline (tue-mps/eomt ``datasets/transforms.py``, every dataset):
    colour jitter (:class:`ColorJitterEoMT`, when ``color_jitter``), horizontal flip, scale
    jitter towards image_size x image_size (``ResizeScale(min_scale, max_scale)``: COCO 0.1-2.0,
    ADE20K semantic and Cityscapes 0.5-2.0), black padding to the square, random square crop."""
    size = (image_size, image_size)
    steps = [ColorJitterEoMT()] if color_jitter else []
    return Compose(steps + [RandomFlip(0.5), ResizeScale(min_scale, max_scale, size),
                            FixedSizeCrop(size, ignore_label, image_value=0)])


# ----------------------------------------------------------------------------- photometric
def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # x * alpha + beta on the uint8 range, clipped and truncated back to uint8 (official)
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _value_chroma(f: np.ndarray) -> tuple:
    # HSV value V = max(r, g, b) and chroma C = V - min(r, g, b) = S * V, float32 [H, W]
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    return v, v - np.minimum(np.minimum(r, g), b)


def scale_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
    """HSV saturation ``S -> min(S * alpha, 1)`` keeping hue and value; uint8 ``[H, W, 3]``.

    Each channel is ``V - (V - c) * k`` with ``k = C' / C`` the chroma ratio, which is exactly
    the HSV edit, computed in float without a round trip through 8-bit HSV.
    """
    f = image.astype(np.float32)
    v, chroma = _value_chroma(f)
    k = np.minimum(np.float32(alpha), v / np.maximum(chroma, np.float32(1e-6)))
    return _to_uint8(v[..., None] - (v[..., None] - f) * k[..., None])


def shift_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the HSV hue by ``degrees`` keeping saturation and value; uint8 ``[H, W, 3]``."""
    f = image.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    v, chroma = _value_chroma(f)
    inv = np.float32(1.0) / np.maximum(chroma, np.float32(1e-6))
    # hue in sextants (red 0, green 2, blue 4); masks and sums, as np.where / % are slow
    is_r = v == r
    is_g = (v == g) & ~is_r
    is_b = ~(is_r | is_g)
    h = (is_r * (g - b) + is_g * (b - r) + is_b * (r - g)) * inv + 2 * is_g + 4 * is_b
    h += np.float32(degrees / 60.0)
    h -= 6 * np.floor(h * np.float32(1 / 6))  # -> [0, 6)
    out = np.empty_like(f)
    for channel, n in enumerate((5, 3, 1)):  # HSV -> RGB: c_n = V - C * clip(min(k, 4 - k), 0, 1)
        k = h + n
        k -= 6 * (k >= 6)
        out[..., channel] = v - chroma * np.clip(np.minimum(k, 4 - k), 0, 1)
    return _to_uint8(out)


def _to_uint8(f: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


class ColorJitterSSD:
    """SSD photometric distortion (detectron2/MaskFormer ``ColorAugSSDTransform``): random
    brightness (+-32), then contrast (0.5-1.5) either first or last around saturation (x0.5-1.5
    on HSV S) and hue (an integer +-18 on OpenCV's H in [0, 180), i.e. +-36 degrees); each step
    with probability 0.5 and each result back in uint8, in the official order and with the
    official draws. Saturation and hue are exact float HSV edits: unlike OpenCV's 8-bit HSV
    round trip they add no quantisation error (up to ~4 levels there). Image only."""

    def __init__(self, brightness_delta=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue_delta=18):
        self.brightness_delta = brightness_delta
        self.contrast = contrast
        self.saturation = saturation
        self.hue_delta = hue_delta

    def __call__(self, image, seg, rng):
        if rng.integers(2):
            image = _convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        if rng.integers(2):
            image = self._saturation(self._contrast(image, rng), rng)
            image = self._hue(image, rng)
        else:
            image = self._hue(self._saturation(image, rng), rng)
            image = self._contrast(image, rng)
        return image, seg

    def _contrast(self, image, rng):
        if rng.integers(2):
            return _convert(image, alpha=rng.uniform(*self.contrast))
        return image

    def _saturation(self, image, rng):
        if rng.integers(2):
            return scale_saturation(image, rng.uniform(*self.saturation))
        return image

    def _hue(self, image, rng):
        if rng.integers(2):
            delta = int(rng.integers(-self.hue_delta, self.hue_delta + 1))  # OpenCV units: 2 degrees
            return shift_hue(image, 2.0 * delta)
        return image

    def __repr__(self):
        return "ColorJitterSSD()"


# ----------------------------------------------------------------------------- pipelines
def short_edges_train(base_size: int, factors) -> tuple:
    """``int(f * base_size)`` for each scale factor (official: ``int(x * 0.1 * 512)``, x in 5..20)."""
    return tuple(int(f * base_size) for f in factors)


def _grey(image: np.ndarray) -> np.ndarray:
    """torchvision's ``rgb_to_grayscale`` of a uint8 image: 0.2989 r + 0.587 g + 0.114 b,
    truncated; float32 [H, W]."""
    f = image.astype(np.float32)
    return np.trunc(f[..., 0] * np.float32(0.2989) + f[..., 1] * np.float32(0.587) + f[..., 2] * np.float32(0.114))


def _blend(image: np.ndarray, other, ratio: float) -> np.ndarray:
    """torchvision's ``_blend``: ratio * image + (1 - ratio) * other, clamped and truncated to uint8."""
    f = np.float32(ratio) * image.astype(np.float32) + np.float32(1.0 - ratio) * other
    return np.clip(f, 0, 255).astype(np.uint8)


class ColorJitterEoMT:
    """The official EoMT colour jitter (torchvision ops, ``Transforms.color_jitter``): brightness
    x U(1 +- 32/255) with probability 0.5, then in random order contrast (blend with the mean
    grey by U(0.5, 1.5), p 0.5) and saturation (blend with the pixel's grey by U(0.5, 1.5),
    p 0.5) followed by hue (U(+-18) degrees, p 0.5). Unlike :class:`ColorJitterSSD` brightness
    and contrast scale, not shift, and the hue moves half as far. The hue step rounds to the
    nearest level where torchvision truncates. Image only."""

    def __call__(self, image, seg, rng):
        if rng.uniform() < 0.5:
            image = _blend(image, np.float32(0.0), rng.uniform(1 - 32 / 255, 1 + 32 / 255))
        if rng.uniform() < 0.5:
            image = self._saturation_and_hue(self._contrast(image, rng), rng)
        else:
            image = self._contrast(self._saturation_and_hue(image, rng), rng)
        return image, seg

    @staticmethod
    def _contrast(image, rng):
        if rng.uniform() < 0.5:
            image = _blend(image, _grey(image).mean(dtype=np.float32), rng.uniform(0.5, 1.5))
        return image

    @staticmethod
    def _saturation_and_hue(image, rng):
        if rng.uniform() < 0.5:
            image = _blend(image, _grey(image)[..., None], rng.uniform(0.5, 1.5))
        if rng.uniform() < 0.5:
            image = shift_hue(image, rng.uniform(-18.0, 18.0))
        return image

    def __repr__(self):
        return "ColorJitterEoMT()"


def semantic_train_augmentation(
    crop_size,
    short_edges,
    max_size: int,
    ignore_label: int,
    single_category_max_area: float = 1.0,
    color_jitter: bool = True,
) -> Compose:
    """Official semantic pipeline (DESIGN 5): resize shortest edge to a random choice of
    ``short_edges`` (max ``max_size``) -> random crop -> SSD colour jitter -> horizontal flip ->
    pad to ``crop_size`` (image 128, label ``ignore_label``)."""
    ts = [
        ResizeShortestEdge(short_edges, max_size),
        RandomCrop(crop_size, single_category_max_area, ignore_label),
    ]
    if color_jitter:
        ts.append(ColorJitterSSD())
    ts += [RandomFlip(0.5), PadTo(crop_size, 128, ignore_label)]
    return Compose(ts)


def panoptic_train_augmentation(
    short_edges=tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_short_edges=(400, 500, 600),
    crop_range=(384, 600),
) -> Compose:
    """Official COCO panoptic pipeline (MaskFormer's DETR-style mapper): horizontal flip, then
    with probability 0.5 either resize shortest edge to a choice of ``short_edges`` (max
    ``max_size``), or resize to a choice of ``crop_short_edges`` (no max, as detectron2's
    default), random crop with sides in ``crop_range`` and then the first resize. No colour
    jitter, no padding (the model pads)."""
    resize_ = ResizeShortestEdge(short_edges, max_size)
    crop = Compose([
        ResizeShortestEdge(crop_short_edges, sys.maxsize),
        RandomCropRange(*crop_range),
        resize_,
    ])
    return Compose([RandomFlip(0.5), OneOf([resize_, crop])])


def test_augmentation(min_size: int, max_size: int) -> Compose:
    """Test-time resize: shortest edge to ``min_size``, longest <= ``max_size``."""
    return Compose([ResizeShortestEdge(min_size, max_size)])


def build_augmentation(data_cfg, train: bool, ignore_label: int) -> Compose:
    """The pipeline for ``data_cfg`` (a ``DataConfig``), train or test. The training pipeline is
    ``data_cfg.augmentation``: "semantic" (DESIGN 5; also the official ADE20K panoptic one),
    "detr" (MaskFormer's COCO panoptic one, longest edge <= ``max_size_train``), "lsj"
    (Mask2Former's COCO large-scale jitter at ``crop_size``, ``jitter_scale``) or "eomt" (the
    official EoMT pipeline, :func:`eomt_train_augmentation`); None picks "detr" for COCO
    panoptic only. The test resize is ``data_cfg.test_resize`` (:func:`resized_test_size`).
    ``ignore_label``: the seg value of unlabelled pixels (padding, crop statistics): the
    dataset's ignore label for label maps, 0 (void) for panoptic id maps."""
    if not train:
        if getattr(data_cfg, "test_resize", "shortest-edge") == "eomt":
            return Compose([ResizeForTest(data_cfg)])
        return test_augmentation(data_cfg.min_size_test, data_cfg.max_size_test)
    pipeline = data_cfg.augmentation or ("detr" if data_cfg.dataset == "coco-panoptic" else "semantic")
    if pipeline == "detr":
        return panoptic_train_augmentation(max_size=data_cfg.max_size_train)
    if pipeline == "lsj":
        return lsj_train_augmentation(max(data_cfg.crop_size), *data_cfg.jitter_scale, ignore_label=ignore_label)
    if pipeline == "eomt":
        return eomt_train_augmentation(max(data_cfg.crop_size), *data_cfg.jitter_scale, ignore_label,
                                       data_cfg.color_jitter)
    if pipeline != "semantic":
        raise ValueError(f"data.augmentation must be 'semantic', 'detr', 'lsj' or 'eomt', got {pipeline!r}")
    base = data_cfg.base_size_train or max(data_cfg.crop_size)
    return semantic_train_augmentation(
        data_cfg.crop_size,
        short_edges_train(base, data_cfg.min_scale_factors),
        data_cfg.max_size_train,
        ignore_label,
        data_cfg.single_category_max_area,
        data_cfg.color_jitter,
    )
