"""MaskFormer's set criterion (DESIGN 3): matching, then per decoder layer a weighted
cross-entropy over all queries and focal + dice on the matched masks (deep supervision).

The criterion reads the lazy outputs (``class_logits [L,B,Q,K+1]``, ``mask_embed [L,B,Q,C]``,
``pixel_embed [B,C,h,w]`` shared by the predictions, or ``[L,B,C,h,w]``: each prediction's own
features, as EoMT's): the mask logits are formed inside ``ops.mask_loss`` (fused kernel on
CUDA), never as ``[L,B,Q,h,w]``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..generators import generator_on
from ..ops._checks import check_embeddings, check_targets, default_input_size, select_pixel_embed
from ..ops._dispatch import preload_kernels
from ..ops.matching_cost import pack_targets
from ..target import Target, validate_targets
from .matcher import HungarianMatcher, build_matcher


def count_masks(targets: Sequence[Target], device) -> float:
    """num_masks: GT segments in the batch, summed over ranks, divided by world size, >= 1."""
    total = float(sum(t.num_segments for t in targets))
    if dist.is_available() and dist.is_initialized():
        backend_device = device if dist.get_backend() == "nccl" else "cpu"
        buf = torch.tensor([total], dtype=torch.float64, device=backend_device)
        dist.all_reduce(buf)
        total = float(buf.item()) / dist.get_world_size()
    return max(total, 1.0)


class SetCriterion(nn.Module):
    """Loss of one batch: returns the UNWEIGHTED terms ``loss_ce``, ``loss_mask`` (focal),
    ``loss_dice`` of the final layer and ``loss_ce_{i}`` ... for auxiliary layers i = 0..L-2;
    ``weight_dict`` holds their weights and ``total(losses)`` the weighted sum.
    """

    def __init__(self, num_classes: int, matcher=None, class_weight: float = 1.0, mask_weight: float = 20.0,
                 dice_weight: float = 1.0, no_object_weight: float = 0.1, deep_supervision: bool = True,
                 impl: str = "auto", mask_loss_precision: str | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher(impl=impl)
        self.deep_supervision = deep_supervision
        self.impl = impl
        self.mask_loss_precision = mask_loss_precision
        self.base_weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def weight_dict(self, num_layers: int) -> dict[str, float]:
        weights = dict(self.base_weights)
        if self.deep_supervision:
            for i in range(num_layers - 1):
                weights.update({f"{k}_{i}": v for k, v in self.base_weights.items()})
        return weights

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum over layers of CE + 20 focal + 1 dice."""
        layers = 1 + sum(1 for k in losses if k.startswith("loss_ce_"))
        weights = self.weight_dict(layers)
        return sum(losses[k] * weights[k] for k in losses if k in weights)

    def target_classes(self, matching, targets: Sequence[Target], num_queries: int, device) -> Tensor:
        """Class target of every query of every matched layer from index pairs: int64 [L', B, Q]
        (K = no object)."""
        out = torch.full((len(matching), len(targets), num_queries), self.num_classes, dtype=torch.int64)
        labels = [t.labels.cpu() for t in targets]
        for layer, indices in enumerate(matching):
            for b, (qi, si) in enumerate(indices):
                out[layer, b, qi] = labels[b][si]
        return out.to(device)

    def assigned_classes(self, assignment: Tensor, labels: Tensor, num_queries: int) -> Tensor:
        """assignment int64 [L',B,M] (query of each segment, -1 = none), labels int64 [B,M] ->
        class target of every query int64 [L',B,Q] (K = no object), on the device."""
        num_layers, batch, m = assignment.shape
        out = torch.full((num_layers, batch, num_queries + 1), self.num_classes, dtype=torch.int64,
                         device=assignment.device)
        # Unmatched segments write into an extra column, dropped.
        index = torch.where(assignment >= 0, assignment, num_queries)
        out.scatter_(2, index, labels[None].expand(num_layers, batch, m))
        return out[..., :num_queries]

    def class_loss(self, class_logits: Tensor, target_classes: Tensor) -> Tensor:
        """class_logits [B,Q,K+1], target_classes [B,Q]: weighted mean CE over all B*Q queries."""
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes,
                               self.empty_weight.to(class_logits.device))

    def forward(self, outputs, targets: Sequence[Target], input_size=None) -> dict[str, Tensor]:
        """outputs: anything with ``class_logits [L,B,Q,K+1]``, ``mask_embed [L,B,Q,C]``,
        ``pixel_embed [B,C,h,w]`` or ``[L,B,C,h,w]``; targets: B Targets (segment maps at input
        resolution).

        The host part (label checks, packing the targets, the all-reduced mask count) runs here;
        the rest is :meth:`losses`, which has no host sync but the solver's one copy."""
        return self.losses(*self.prepare(outputs, targets, input_size))

    def prepare(self, outputs, targets: Sequence[Target], input_size=None) -> tuple[Tensor, ...]:
        """The host part of a step: checks, packed targets and num_masks -> the arguments of
        :meth:`losses` (class_logits, mask_embed, pixel_embed, seg_maps, labels, num_segments,
        num_masks)."""
        class_logits, mask_embed, pixel_embed = outputs.class_logits, outputs.mask_embed, outputs.pixel_embed
        if class_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"class_logits has {class_logits.shape[-1]} classes, expected "
                             f"num_classes + 1 = {self.num_classes + 1}")
        validate_targets(targets, self.num_classes)  # on the host, before moving them
        self.matcher.check(targets, class_logits.shape[2])
        check_embeddings(mask_embed, pixel_embed)
        size = default_input_size(pixel_embed, input_size)
        check_targets(targets, pixel_embed.shape[-4], None, size)
        seg_maps, labels, num_segments = pack_targets(targets, size, pixel_embed.device)
        num_masks = torch.tensor(count_masks(targets, pixel_embed.device), device=pixel_embed.device)
        preload_kernels(self.impl, pixel_embed, modules=("matching_cost", "mask_loss"))
        return class_logits, mask_embed, pixel_embed, seg_maps, labels, num_segments, num_masks

    def supervised_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.deep_supervision else [num_layers - 1]

    def collect(self, class_logits: Tensor, assignment: Tensor, labels: Tensor, mask_terms: Tensor,
                dice_terms: Tensor) -> dict[str, Tensor]:
        """Per supervised layer: the class loss from the assignment [L',B,M] and the given mask
        and dice terms [L'] -> the named loss dict (final layer unsuffixed)."""
        num_layers = class_logits.shape[0]
        layers = self.supervised_layers(num_layers)
        target_classes = self.assigned_classes(assignment, labels, class_logits.shape[2])
        losses = {}
        for i, layer in enumerate(layers):
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            losses["loss_ce" + suffix] = self.class_loss(class_logits[layer], target_classes[i])
            losses["loss_mask" + suffix] = mask_terms[i]
            losses["loss_dice" + suffix] = dice_terms[i]
        return losses

    def losses(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
               labels: Tensor, num_segments: Tensor, num_masks: Tensor) -> dict[str, Tensor]:
        """The loss terms from the model outputs and packed targets (``ops.matching_cost.
        pack_targets``: seg_maps int32 [B,H,W], labels int64 [B,M], num_segments int64 [B]) and
        the normaliser num_masks (0-d). Static shapes throughout: ``torch.compile`` captures it
        in one graph (the matcher's solve is one opaque operator)."""
        layers = self.supervised_layers(class_logits.shape[0])
        pixel_embed = select_pixel_embed(pixel_embed, layers)  # per-prediction features: those of the layers
        assignment = self.matcher.assign(class_logits[layers].detach(), mask_embed[layers].detach(),
                                         pixel_embed.detach(), seg_maps, labels, num_segments)  # [L',B,M]
        # All layers' mask losses in one call: the fused path reads each pixel embedding once.
        focal, dice = ops.mask_loss_assigned(mask_embed[layers], pixel_embed, assignment, seg_maps, num_masks,
                                             self.mask_loss_precision, impl=self.impl)
        return self.collect(class_logits, assignment, labels, focal, dice)


class PointSampledCriterion(SetCriterion):
    """Mask2Former's criterion: the same class loss, solve and deep supervision as
    ``SetCriterion``; matching costs and the sigmoid BCE + dice mask loss on sampled points
    (``ops.point_loss``). Official defaults: class 2, BCE 5, dice 5, no-object 0.1, 12544
    points, oversample 3, importance ratio 0.75.

    The points come from ``self.generator`` (a ``torch.Generator`` on the outputs' device, seeded
    with ``seed``), drawn in the host part :meth:`forward` and passed as tensors to
    :meth:`losses`; its state is in ``state_dict()`` (extra state), so a resumed run draws the
    same points. ``forward(..., points=...)`` replays given draws instead (:meth:`draw_points`
    documents the shapes).

    mask_sampling "full": the same matching (on points), the BCE + dice loss on every pixel of
    the padded input (``ops.mask_loss_assigned(loss="bce")``: the fused kernel on CUDA), the
    exact value the official 12544 points estimate.
    """

    def __init__(self, num_classes: int, matcher=None, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1, deep_supervision: bool = True,
                 impl: str = "auto", num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, seed: int = 0, mask_sampling: str = "points",
                 mask_loss_precision: str | None = None):
        from .matcher import PointMatcher

        if matcher is None:
            matcher = PointMatcher(class_weight, mask_weight, dice_weight, impl=impl)
        super().__init__(num_classes, matcher, class_weight, mask_weight, dice_weight, no_object_weight,
                         deep_supervision, impl, mask_loss_precision)
        if mask_sampling not in ("points", "full"):
            raise ValueError(f"mask_sampling must be 'points' or 'full', got {mask_sampling!r}")
        self.mask_sampling = mask_sampling
        if num_points < 1 or oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
            raise ValueError("point sampling needs num_points >= 1, oversample_ratio >= 1 and "
                             f"0 <= importance_sample_ratio <= 1, got {num_points}, {oversample_ratio}, "
                             f"{importance_sample_ratio}")
        self.num_points = int(num_points)
        self.num_candidates = int(num_points * oversample_ratio)
        self.num_uncertain = int(importance_sample_ratio * num_points)
        self.seed = int(seed)
        self.generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None
        self._draw_buffers: dict[str, Tensor] = {}  # forward's CPU draws, refilled each step

    # ------------------------------------------------------------- the point generator
    def _generator_on(self, device) -> torch.Generator:
        return generator_on(self, device)

    def get_extra_state(self) -> dict:
        state = self.generator.get_state() if self.generator is not None else self._pending_state
        return {"seed": self.seed, "generator": state}

    def set_extra_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator = None
        self._pending_state = state["generator"]

    def draw_points(self, num_layers: int, batch: int, max_segments: int, device,
                    reuse: bool = False) -> dict[str, Tensor]:
        """Uniform draws in [0, 1]^2 (x, y) for one step, from the criterion's generator:
        ``match`` [L',B,P,2] (the matcher's points, per layer and image), ``candidates``
        [L',B,M,S,2] (S = oversample * P per segment slot) and ``extra`` [L',B,M,R,2]
        (R = P - importance * P).

        reuse (``forward``'s own draws, CPU only): fill the tensors of the previous call of the
        same shapes in place (``uniform_``: the same values as ``torch.rand``) instead of new
        ones; the candidates of a Mask2Former step are ~100 MB (R50, 10 layers, 16 segments),
        past glibc's 32 MB mmap threshold, so a new tensor is mapped and page-faulted in anew
        every step. The previous call's tensors are overwritten: only for draws that die with
        the step."""
        g = self._generator_on(device)
        p, s, r = self.num_points, self.num_candidates, self.num_points - self.num_uncertain
        if self.mask_sampling == "full":  # the loss reads every pixel: only the matcher samples
            s = r = 0
        shapes = {"match": (num_layers, batch, p, 2), "candidates": (num_layers, batch, max_segments, s, 2),
                  "extra": (num_layers, batch, max_segments, r, 2)}
        if not reuse or torch.device(device).type != "cpu" or torch.compiler.is_compiling():
            self._draw_buffers = {}
            return {name: torch.rand(shape, generator=g, device=device) for name, shape in shapes.items()}
        out = {}
        for name, shape in shapes.items():  # in this order: the generator's stream
            buf = self._draw_buffers.get(name)
            if buf is None or tuple(buf.shape) != shape:
                buf = self._draw_buffers[name] = torch.empty(shape)
            out[name] = buf.uniform_(generator=g)
        return out

    # ------------------------------------------------------------- the step
    def forward(self, outputs, targets: Sequence[Target], input_size=None,
                points: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """As ``SetCriterion.forward``; points: replayed draws (``draw_points`` shapes), or None
        to draw from the criterion's generator."""
        args = self.prepare(outputs, targets, input_size)
        class_logits, labels = args[0], args[4]
        preload_kernels(self.impl, args[2], modules=("point_matching_cost", "point_loss"))  # outside compiled code
        if points is None:
            points = self.draw_points(len(self.supervised_layers(class_logits.shape[0])), labels.shape[0],
                                      labels.shape[1], class_logits.device, reuse=True)
        return self.losses(*args, points["match"], points["candidates"], points["extra"])

    def losses(self, class_logits: Tensor, mask_embed: Tensor, pixel_embed: Tensor, seg_maps: Tensor,
               labels: Tensor, num_segments: Tensor, num_masks: Tensor, match_points: Tensor,
               candidates: Tensor, extra: Tensor) -> dict[str, Tensor]:
        """``SetCriterion.losses`` plus the draws: match_points [L',B,P,2], candidates
        [L',B,M,S,2], extra [L',B,M,R,2]. No host sync but the solver's copy."""
        from ..ops.point_loss import point_mask_loss

        layers = self.supervised_layers(class_logits.shape[0])
        pixel_embed = select_pixel_embed(pixel_embed, layers)
        assignment = self.matcher.assign(class_logits[layers].detach(), mask_embed[layers].detach(),
                                         pixel_embed.detach(), seg_maps, labels, num_segments, match_points)
        if self.mask_sampling == "full":
            # The exact full-resolution BCE + dice through the fused mask loss (no [M, H, W] logits).
            bce, dice = ops.mask_loss_assigned(mask_embed[layers], pixel_embed, assignment, seg_maps, num_masks,
                                               self.mask_loss_precision, impl=self.impl, loss="bce")
        else:
            # The fused kernels on CUDA (impl="auto"): no per-layer logit maps, deterministic grads.
            bce, dice = point_mask_loss(mask_embed[layers], pixel_embed, assignment, seg_maps, num_masks,
                                        candidates, extra, self.num_uncertain, self.mask_loss_precision,
                                        impl=self.impl)
        return self.collect(class_logits, assignment, labels, bce, dice)


def build_criterion(cfg) -> SetCriterion:
    """From a full ``Config`` (model.num_classes + loss section): ``loss.mask_sampling`` full
    (MaskFormer's full-resolution focal + dice) or points (Mask2Former's point-sampled BCE + dice)."""
    loss = cfg.loss
    sampling, mask_loss = getattr(loss, "mask_sampling", "full"), getattr(loss, "mask_loss", "focal")
    if sampling not in ("full", "points"):
        raise ValueError(f"loss.mask_sampling must be 'full' or 'points', got {sampling!r}")
    if mask_loss not in ("focal", "bce"):
        raise ValueError(f"loss.mask_loss must be 'focal' or 'bce', got {mask_loss!r}")
    if mask_loss == "bce":  # Mask2Former: point-sampled matching; loss on points or every pixel
        from .matcher import PointMatcher

        return PointSampledCriterion(cfg.model.num_classes, PointMatcher(loss.class_weight, loss.mask_weight,
                                                                         loss.dice_weight, impl=loss.impl),
                                     loss.class_weight, loss.mask_weight, loss.dice_weight, loss.no_object_weight,
                                     loss.deep_supervision, loss.impl, loss.num_points, loss.oversample_ratio,
                                     loss.importance_sample_ratio, loss.point_seed, sampling,
                                     loss.mask_loss_precision)
    if sampling == "points":
        raise ValueError("loss.mask_sampling=points needs loss.mask_loss=bce (Mask2Former's point-sampled loss)")
    return SetCriterion(cfg.model.num_classes, build_matcher(loss), loss.class_weight, loss.mask_weight,
                        loss.dice_weight, loss.no_object_weight, loss.deep_supervision, loss.impl,
                        loss.mask_loss_precision)
