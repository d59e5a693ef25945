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
from ..target import Target

# Per layer, per image: (query_idx int64 [m], seg_idx int64 [m]), query_idx ascending.
Matching = list[list[tuple[Tensor, Tensor]]]


def _check_finite(costs: np.ndarray, sizes: np.ndarray, batch: int) -> None:
    for n, m in enumerate(sizes):
        block = costs[n, :, :m]
        if not np.isfinite(block).all():
            kind = "NaN" if np.isnan(block).any() else "infinite"
            raise ValueError(
                f"matching cost of layer {n // batch}, image {n % batch} has {kind} entries "
                "(non-finite model outputs? check the loss scale / learning rate)"
            )


def _solve_scipy_loop(costs: np.ndarray, sizes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    from scipy.optimize import linear_sum_assignment

    return [linear_sum_assignment(costs[n, :, :m]) for n, m in enumerate(sizes)]


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

    @torch.no_grad()
    def __call__(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                 targets: Sequence[Target], input_size=None) -> Matching:
        """class_logits [L,B,Q,K+1], mask_embed [L,B,Q,C], pixel_embed [B,C,h,w] -> Matching
        (L lists of B index pairs, on the CPU)."""
        if class_logits.dim() == 3:
            class_logits, mask_embed = class_logits[None], mask_embed[None]
        num_layers, batch = class_logits.shape[:2]
        costs, sizes = ops.matching_cost_padded(class_logits, mask_embed, pixel_embed, targets, self.weights,
                                                input_size, self.precision, impl=self.impl)
        costs = costs.cpu().numpy()  # the one device->host transfer of the step
        sizes = sizes.numpy()
        _check_finite(costs, sizes, batch)
        if self.solver == "batched":
            from ..ops.assignment import linear_sum_assignment_batch

            num_queries = costs.shape[1]
            solved = linear_sum_assignment_batch(costs, sizes=[(num_queries, int(m)) for m in sizes])
        else:
            solved = _solve_scipy_loop(costs, sizes)
        pairs = [(torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)) for r, c in solved]
        return [pairs[l * batch:(l + 1) * batch] for l in range(num_layers)]


class FixedMatcher:
    """MaskFormer-fixed (N = K queries): query i <-> the segment of class i.

    Needs one segment per class per image (semantic targets); a repeated class is an error.
    """

    @torch.no_grad()
    def __call__(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor,
                 targets: Sequence[Target], input_size=None) -> Matching:
        if class_logits.dim() == 3:
            class_logits = class_logits[None]
        num_layers, _, num_queries = class_logits.shape[:3]
        per_image = []
        for b, t in enumerate(targets):
            labels = t.labels.cpu()
            if labels.numel() and (int(labels.max()) >= num_queries):
                raise ValueError(f"fixed matching needs Q >= K: image {b} has class {int(labels.max())} "
                                 f"but only {num_queries} queries")
            if labels.unique().numel() != labels.numel():
                raise ValueError(f"fixed matching needs one segment per class; image {b} repeats a class")
            order = labels.argsort()
            per_image.append((labels[order], order))
        return [list(per_image) for _ in range(num_layers)]


def build_matcher(loss_cfg) -> HungarianMatcher | FixedMatcher:
    """From a ``LossConfig``."""
    if loss_cfg.matching == "fixed":
        return FixedMatcher()
    if loss_cfg.matching != "hungarian":
        raise ValueError(f"matching must be 'hungarian' or 'fixed', got {loss_cfg.matching!r}")
    return HungarianMatcher(loss_cfg.class_weight, loss_cfg.mask_weight, loss_cfg.dice_weight,
                            impl=loss_cfg.impl, precision=loss_cfg.matching_precision)
