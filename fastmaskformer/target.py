"""Ground truth as segment maps (DESIGN 1.2).

A target image is ``labels: int64 [M]`` (class ids in ``[0, K)``) plus ``segment_map: int32
[H, W]`` with values in ``[-1, M)``. Binary mask ``m`` is ``segment_map == m``; ``-1`` marks
pixels that belong to no segment (ignore label, void, crowd, padding). A segment may have no
pixels at all: panoptic targets keep every non-crowd segment of the annotation, also one that
a random crop removed (an empty mask, as both official panoptic dataset mappers do); it is
still matched, still counts in ``num_masks`` and still gives its query a class target. This is
what the fused kernels read, and it is 32-128x smaller than ``M`` float masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

IGNORE_SEGMENT = -1


def _as_tensor(x, dtype=None) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    return x if dtype is None else x.to(dtype)


@dataclass
class Target:
    """One image's ground truth.

    labels: int64 [M], class id of each segment, in ``[0, num_classes)``.
    segment_map: int32 [H, W], segment index of each pixel in ``[-1, M)``; -1 = no segment.
    """

    labels: Tensor
    segment_map: Tensor
    # K the labels were last checked against: checks are skipped when repeated (per step, on
    # the host), and moving to a device never re-reads the data (that would sync the device).
    _checked_num_classes: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.labels = _as_tensor(self.labels)
        self.segment_map = _as_tensor(self.segment_map)
        if self.labels.dim() != 1:
            raise ValueError(f"Target.labels must be 1-D [M], got shape {tuple(self.labels.shape)}")
        if self.labels.dtype.is_floating_point or self.labels.dtype in (torch.bool, torch.complex64):
            raise TypeError(f"Target.labels must be an integer tensor, got {self.labels.dtype}")
        if self.segment_map.dim() != 2:
            raise ValueError(
                f"Target.segment_map must be 2-D [H, W], got shape {tuple(self.segment_map.shape)}"
            )
        if self.segment_map.dtype.is_floating_point or self.segment_map.dtype == torch.bool:
            raise TypeError(f"Target.segment_map must be an integer tensor, got {self.segment_map.dtype}")
        self.labels = self.labels.to(torch.int64)
        self.segment_map = self.segment_map.to(torch.int32)
        if self.segment_map.numel():
            lo, hi = int(self.segment_map.min()), int(self.segment_map.max())
            if lo < IGNORE_SEGMENT or hi >= self.num_segments:
                raise ValueError(
                    f"Target.segment_map values must lie in [-1, {self.num_segments}) "
                    f"(M = {self.num_segments} labels), found range [{lo}, {hi}]"
                )

    # ------------------------------------------------------------------ properties
    @property
    def num_segments(self) -> int:
        """M, the number of ground-truth segments."""
        return int(self.labels.numel())

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the segment map."""
        return int(self.segment_map.shape[0]), int(self.segment_map.shape[1])

    @property
    def device(self) -> torch.device:
        return self.segment_map.device

    def _with(self, labels: Tensor, segment_map: Tensor) -> "Target":
        """Same target, other storage: no re-validation (it would read device memory)."""
        out = object.__new__(Target)
        out.labels, out.segment_map = labels, segment_map
        out._checked_num_classes = self._checked_num_classes
        return out

    def to(self, device, non_blocking: bool = False) -> "Target":
        return self._with(self.labels.to(device, non_blocking=non_blocking),
                          self.segment_map.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Target":
        """Page-locked copy (DataLoader(pin_memory=True) calls this) for asynchronous copies."""
        return self._with(self.labels.pin_memory(), self.segment_map.pin_memory())

    def validate_labels(self, num_classes: int, image_index: int | None = None) -> None:
        """Raise a ValueError naming the image and the value if a label is outside [0, K)."""
        if self.labels.numel() == 0 or self._checked_num_classes == num_classes:
            return
        bad = (self.labels < 0) | (self.labels >= num_classes)
        if bool(bad.any()):
            value = int(self.labels[bad][0])
            where = "" if image_index is None else f" in image {image_index}"
            raise ValueError(
                f"target label {value}{where} is out of range [0, {num_classes}) "
                f"(num_classes={num_classes}; ignore pixels belong in segment_map as -1)"
            )
        self._checked_num_classes = num_classes

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_masks(cls, labels, masks) -> "Target":
        """From binary masks ``bool [M, H, W]`` that must not overlap."""
        labels = _as_tensor(labels, torch.int64)
        masks = _as_tensor(masks)
        if masks.dim() != 3:
            raise ValueError(f"masks must be [M, H, W], got shape {tuple(masks.shape)}")
        if masks.shape[0] != labels.numel():
            raise ValueError(f"{labels.numel()} labels but {masks.shape[0]} masks")
        masks = masks.bool()
        coverage = masks.sum(0, dtype=torch.int32)
        if bool((coverage > 1).any()):
            ys, xs = torch.nonzero(coverage > 1, as_tuple=True)
            owners = torch.nonzero(masks[:, ys[0], xs[0]]).flatten().tolist()
            raise ValueError(
                f"masks overlap: {int((coverage > 1).sum())} pixels belong to more than one mask "
                f"(first at y={int(ys[0])}, x={int(xs[0])}, masks {owners}); a segment map needs "
                "disjoint masks"
            )
        segment_map = torch.full(masks.shape[1:], IGNORE_SEGMENT, dtype=torch.int32)
        for m in range(masks.shape[0]):
            segment_map[masks[m]] = m
        return cls(labels, segment_map)

    @classmethod
    def from_semantic(cls, label_map, ignore_label: int = 255, num_classes: int | None = None) -> "Target":
        """From a semantic label map ``[H, W]``: one segment per class present (ascending class
        id, as the official dataset mapper), ``ignore_label`` pixels -> -1."""
        label_map = _as_tensor(label_map).to(torch.int64)
        if label_map.dim() != 2:
            raise ValueError(f"label_map must be 2-D [H, W], got shape {tuple(label_map.shape)}")
        valid = label_map != ignore_label
        classes = torch.unique(label_map[valid])
        if classes.numel() and (int(classes[0]) < 0 or (num_classes is not None and int(classes[-1]) >= num_classes)):
            bad = int(classes[0]) if int(classes[0]) < 0 else int(classes[-1])
            raise ValueError(
                f"label value {bad} is out of range [0, {num_classes}) and is not the ignore label "
                f"{ignore_label}"
            )
        segment_map = torch.full(label_map.shape, IGNORE_SEGMENT, dtype=torch.int32)
        if classes.numel():
            # class id -> segment index via searchsorted over the sorted unique classes
            index = torch.searchsorted(classes, label_map[valid]).to(torch.int32)
            segment_map[valid] = index
        return cls(classes, segment_map)

    @classmethod
    def from_panoptic(
        cls,
        id_map,
        segments_info: Sequence[Mapping],
        category_map: Mapping[int, int] | None = None,
        drop_crowd: bool = True,
    ) -> "Target":
        """From a COCO panoptic id map ``[H, W]`` (id = R + 256 G + 256^2 B) and its
        ``segments_info`` (dicts with ``id``, ``category_id``, optional ``iscrowd``).

        One segment per entry of ``segments_info``, in that order, whether or not its id occurs
        in ``id_map`` (a segment that a crop removed keeps its label and has no pixels, as in
        the official mappers). ``category_map`` maps dataset category ids to contiguous ids
        ``[0, K)`` (identity if None). Crowd segments are dropped and their pixels become -1
        like the official mapper when ``drop_crowd``. Ids in the map that are not in
        ``segments_info`` (0 = void) become -1.
        """
        id_map = _as_tensor(id_map).to(torch.int64)
        if id_map.dim() == 3:  # RGB-encoded PNG [H, W, 3]
            id_map = id_map[..., 0] + 256 * id_map[..., 1] + 256 * 256 * id_map[..., 2]
        if id_map.dim() != 2:
            raise ValueError(f"id_map must be [H, W] or [H, W, 3], got shape {tuple(id_map.shape)}")
        labels: list[int] = []
        segment_map = torch.full(id_map.shape, IGNORE_SEGMENT, dtype=torch.int32)
        for info in segments_info:
            if drop_crowd and info.get("iscrowd", 0):
                continue
            cat = int(info["category_id"])
            if category_map is not None:
                if cat not in category_map:
                    raise ValueError(f"segment {info['id']} has unknown category_id {cat}")
                cat = int(category_map[cat])
            segment_map[id_map == int(info["id"])] = len(labels)
            labels.append(cat)
        return cls(torch.tensor(labels, dtype=torch.int64), segment_map)

    # ------------------------------------------------------------------ conversions
    def to_masks(self) -> Tensor:
        """Binary masks ``bool [M, H, W]``."""
        ids = torch.arange(self.num_segments, device=self.device, dtype=torch.int32)
        return self.segment_map[None] == ids[:, None, None]


def pad_segment_maps(targets: Sequence[Target], size: tuple[int, int] | None = None) -> Tensor:
    """Stack segment maps into ``int32 [B, H, W]``, padding bottom/right with -1.

    ``size`` defaults to the largest (H, W) among the targets.
    """
    if size is None:
        size = (
            max((t.image_size[0] for t in targets), default=0),
            max((t.image_size[1] for t in targets), default=0),
        )
    device = targets[0].device if targets else "cpu"
    out = torch.full((len(targets), *size), IGNORE_SEGMENT, dtype=torch.int32, device=device)
    for i, t in enumerate(targets):
        h, w = t.image_size
        if h > size[0] or w > size[1]:
            raise ValueError(f"target {i} is {h}x{w}, larger than the padded size {size[0]}x{size[1]}")
        out[i, :h, :w] = t.segment_map
    return out


def validate_targets(targets: Iterable[Target], num_classes: int) -> None:
    """Check every target's labels against ``num_classes`` (ValueError naming image and value)."""
    for i, t in enumerate(targets):
        if not isinstance(t, Target):
            raise TypeError(f"targets[{i}] must be a fastmaskformer.Target, got {type(t).__name__}")
        t.validate_labels(num_classes, image_index=i)
