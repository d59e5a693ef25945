"""Assigning queries to ground-truth segments (DESIGN 3).

``HungarianMatcher`` computes the cost matrices of every image and every decoder layer on the
device (``ops.matching_cost_padded``: one launch with the fused kernel), copies them to the host
in ONE transfer, solves all of them in ONE batched call of the C++ solver, and returns the
indices. The official matcher instead loops over images and layers in Python, with one
device->host sync and one scipy call each; ``solver="scipy"`` reproduces that per-problem loop
(same costs, same optimum) as the baseline.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..ops._checks import check_targets, default_input_size
from ..ops.assignment import check_matching_costs
from ..ops.matching_cost import pack_targets
from ..target import Target

# Per layer, per image: (query_idx int64 [m], seg_idx int64 [m]), query_idx ascending.
Matching = list[list[tuple[Tensor, Tensor]]]


def _solve_scipy_loop(costs: np.ndarray, sizes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    from scipy.optimize import linear_sum_assignment

    return [linear_sum_assignment(costs[n, :, :m]) for n, m in enumerate(sizes)]


def assignment_to_indices(assignment: Tensor) -> Matching:
    """[L, B, M] (query of each segment, -1 = none) -> per layer, per image (query_idx ascending,
    seg_idx) int64 CPU tensors."""
    out = []
    for layer in assignment.cpu():
        per_image = []
        for row in layer:
            seg = torch.nonzero(row >= 0).flatten()
            order = row[seg].argsort()
            per_image.append((row[seg][order], seg[order]))
        out.append(per_image)
    return out


class HungarianMatcher:
    """Optimal one-to-one matching of Q queries to M_b segments for every image and layer.

    cost_class, cost_focal, cost_dice: the weights of the three cost terms (official 1, 20, 1).
    solver: "batched" (C++ batched solver, scipy fallback inside it) or "scipy" (per-problem
    loop, the official behaviour). impl: the matching-cost op implementation; precision: the
    fused kernel's tl.dot precision (None: its default, tf32; see ``ops.matching_cost_padded``).
    """

    def __init__(self, cost_class: float = 1.0, cost_focal: float = 20.0, cost_dice: float = 1.0,
                 solver: str = "batched", impl: str = "auto", precision: str | None = None):
        if solver not in ("batched", "scipy"):
            raise ValueError(f"solver must be 'batched' or 'scipy', got {solver!r}")
        self.weights = (float(cost_class), float(cost_focal), float(cost_dice))
        self.solver = solver
        self.impl = impl
        self.precision = precision

    def check(self, targets: Sequence[Target], num_queries: int) -> None:
        """Host-side checks of the targets before a step (none needed)."""

    @torch.no_grad()
    def assign(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
               labels: Tensor, num_segments: Tensor) -> Tensor:
        """class_logits [L,B,Q,K+1], mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] (shared) or
        [L,B,C,h,w] (per prediction); packed targets
        (``ops.matching_cost.pack_targets``) -> assignment int64 [L,B,M] on the device: the query
        matched to each segment (-1: none). All costs in one launch, ONE device->host copy
        (inside the solver operator), all problems in one batched solve; no other host sync."""
        costs = ops.matching_cost_packed(class_logits, mask_embed, pixel_embed, seg_maps, labels, num_segments,
                                         self.weights, self.precision, impl=self.impl)  # [L*B, Q, M]
        return self.solve(costs, num_segments, class_logits.shape[0])

    def solve(self, costs: Tensor, num_segments: Tensor, num_layers: int) -> Tensor:
        """costs float [L*B, Q, M] (columns past num_segments[b] ignored) -> assignment int64
        [L, B, M] (query of each segment, -1: none), with ONE device->host copy."""
        batch = num_segments.shape[0]
        widths = num_segments.repeat(num_layers)
        if self.solver == "batched":
            rows, cols = torch.ops.fastmaskformer.linear_sum_assignment(costs, widths, False, batch)
        else:
            rows, cols = _scipy_assignment(costs, widths, batch)
        m = costs.shape[2]
        # Scatter query -> segment slot; padding pairs (-1) land in an extra column, dropped.
        assignment = torch.full((costs.shape[0], m + 1), -1, dtype=torch.int64, device=costs.device)
        assignment.scatter_(1, torch.where(cols >= 0, cols, m), torch.where(cols >= 0, rows, -1))
        return assignment[:, :m].reshape(num_layers, batch, m)

    @torch.no_grad()
    def __call__(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                 targets: Sequence[Target], input_size=None) -> Matching:
        """class_logits [L,B,Q,K+1], mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] or [L,B,C,h,w] -> Matching
        (L lists of B index pairs, on the CPU)."""
        if class_logits.dim() == 3:
            class_logits, mask_embed = class_logits[None], mask_embed[None]
        size = default_input_size(pixel_embed, input_size)
        check_targets(targets, pixel_embed.shape[-4], class_logits.shape[-1] - 1, size)
        packed = pack_targets(targets, size, pixel_embed.device)
        return assignment_to_indices(self.assign(class_logits, mask_embed, pixel_embed, *packed))


class PointMatcher(HungarianMatcher):
    """Mask2Former's matcher: the same solve, costs on uniformly sampled points
    (``ops.point_loss.point_matching_cost``: class 2, sigmoid BCE 5, dice 5 by default).

    ``assign`` takes the points explicitly (``coords [L,B,P,2]`` in [0, 1], x then y): the
    criterion draws them from its own generator, tests replay the official draws."""

    @torch.no_grad()
    def assign(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
               labels: Tensor, num_segments: Tensor, coords: Tensor) -> Tensor:
        """As ``HungarianMatcher.assign`` plus coords [L,B,P,2] -> assignment int64 [L,B,M]."""
        from ..ops.point_loss import point_matching_cost

        costs = point_matching_cost(class_logits, mask_embed, pixel_embed, seg_maps, labels, coords, self.weights,
                                    self.precision, impl=self.impl)
        return self.solve(costs, num_segments, class_logits.shape[0])


def _scipy_assignment(costs: Tensor, widths: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """The official per-problem scipy loop (the baseline), in the solver operator's format."""
    host = costs.cpu().numpy()
    sizes = widths.cpu().numpy()
    check_matching_costs(host, sizes, batch)
    rows = torch.full(costs.shape[:1] + (min(costs.shape[1:]),), -1, dtype=torch.int64)
    cols = rows.clone()
    for n, (r, c) in enumerate(_solve_scipy_loop(host, sizes)):
        rows[n, :len(r)] = torch.from_numpy(r)
        cols[n, :len(c)] = torch.from_numpy(c)
    return rows.to(costs.device), cols.to(costs.device)


class FixedMatcher:
    """MaskFormer-fixed (N = K queries): query i <-> the segment of class i.

    Needs one segment per class per image (semantic targets); a repeated class is an error.
    """

    def check(self, targets: Sequence[Target], num_queries: int) -> None:
        """Q >= K and one segment per class (ValueError naming the image)."""
        for b, t in enumerate(targets):
            labels = t.labels.cpu()
            if labels.numel() and (int(labels.max()) >= num_queries):
                raise ValueError(f"fixed matching needs Q >= K: image {b} has class {int(labels.max())} "
                                 f"but only {num_queries} queries")
            if labels.unique().numel() != labels.numel():
                raise ValueError(f"fixed matching needs one segment per class; image {b} repeats a class")

    @torch.no_grad()
    def assign(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
               labels: Tensor, num_segments: Tensor) -> Tensor:
        """Segment j of image b -> query labels[b, j] at every layer: int64 [L,B,M]."""
        segments = torch.arange(labels.shape[1], device=labels.device)
        per_image = torch.where(segments[None, :] < num_segments[:, None], labels, -1)
        return per_image[None].expand(class_logits.shape[0], -1, -1).clone()

    @torch.no_grad()
    def __call__(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                 targets: Sequence[Target], input_size=None) -> Matching:
        if class_logits.dim() == 3:
            class_logits = class_logits[None]
        self.check(targets, class_logits.shape[2])
        per_image = []
        for t in targets:
            labels = t.labels.cpu()
            order = labels.argsort()
            per_image.append((labels[order], order))
        return [list(per_image) for _ in range(class_logits.shape[0])]


def build_matcher(loss_cfg) -> HungarianMatcher | FixedMatcher:
    """From a ``LossConfig``; ``mask_sampling: points`` gives the point-sampled matcher."""
    if loss_cfg.matching == "fixed":
        return FixedMatcher()
    if loss_cfg.matching != "hungarian":
        raise ValueError(f"matching must be 'hungarian' or 'fixed', got {loss_cfg.matching!r}")
    if getattr(loss_cfg, "mask_loss", "focal") == "bce":  # Mask2Former: matching on sampled points
        return PointMatcher(loss_cfg.class_weight, loss_cfg.mask_weight, loss_cfg.dice_weight, impl=loss_cfg.impl)
    return HungarianMatcher(loss_cfg.class_weight, loss_cfg.mask_weight, loss_cfg.dice_weight,
                            impl=loss_cfg.impl, precision=loss_cfg.matching_precision)
