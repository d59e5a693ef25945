"""EoMT (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model", CVPR 2025).

No pixel decoder, no transformer decoder: ``num_queries`` learnable queries join a plain ViT in
front of its last ``num_blocks`` blocks. Before each of those blocks and after the last, the
normalised tokens give a prediction: the queries through a linear class head and a 3-layer GELU
MLP (mask embeddings), the patch tokens upscaled to 1/4 of the input by ``ScaleBlock``s (the
pixel embeddings). In training, each query block's queries attend only to the patches where the
previous prediction's mask logit (bilinearly resized to the patch grid) is positive; mask
annealing drops that mask for a growing random share of queries until none is masked.

Output: the shared lazy ``MaskFormerOutput`` with one pixel-embedding map per prediction
(``pixel_embed`` [L, B, C, H/4, W/4], C = the ViT width); logits of prediction l =
``einsum(mask_embed[l], pixel_embed[l])``. In eval mode with every annealing probability 0 (a
trained model), L = 1: no mask and no intermediate prediction is computed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ..generators import generator_on
from .maskformer import MaskFormerOutput, SegmentationModel
from .vit import ViTEncoder


class ScaleBlock(nn.Module):
    """2x upscaling (official ``ScaleBlock``): 2x2 stride-2 transposed conv, GELU, 3x3 depthwise
    conv (no bias), LayerNorm over channels. [B, C, h, w] -> [B, C, 2h, 2w]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


class MaskAnnealing(nn.Module):
    """Per query block, the probability that a query keeps its attention mask: 1 before
    ``start_steps[i]``, ``(1 - progress) ** power`` between start and end, 0 from ``end_steps[i]``
    on (official ``mask_annealing``, set per iteration by ``set_step``). Without a schedule the
    probabilities stay 1 (``masked_attn``) or 0.

    Which queries lose their mask is drawn from this module's own ``torch.Generator`` (seeded with
    ``seed``; the official code uses the global RNG): its state and the probabilities are this
    module's extra state, so a checkpoint resumes the same draws. Eval-mode draws come from a
    fresh generator with the same seed each call, so evaluating never moves the training stream.
    """

    def __init__(self, num_blocks: int, start_steps: Sequence[int] = (), end_steps: Sequence[int] = (),
                 power: float = 0.9, seed: int = 0, masked_attn: bool = True):
        super().__init__()
        if len(start_steps) != len(end_steps) or (start_steps and len(start_steps) != num_blocks):
            raise ValueError(f"mask annealing needs one start and one end step per query block ({num_blocks}), "
                             f"got {len(start_steps)} starts and {len(end_steps)} ends")
        if any(e < s for s, e in zip(start_steps, end_steps)):
            raise ValueError(f"mask annealing end steps {tuple(end_steps)} must not precede the starts {tuple(start_steps)}")
        if start_steps and not masked_attn:
            raise ValueError("mask annealing needs masked attention (model.masked_attn: true)")
        self.start_steps, self.end_steps = tuple(start_steps), tuple(end_steps)
        self.power, self.seed = float(power), int(seed)
        self.probs = [1.0 if masked_attn else 0.0] * num_blocks
        self.generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """The probabilities for training iteration ``step`` (0-based)."""
        for i, (start, end) in enumerate(zip(self.start_steps, self.end_steps)):
            if step < start:
                self.probs[i] = 1.0
            elif step >= end:
                self.probs[i] = 0.0
            else:
                self.probs[i] = (1.0 - (step - start) / (end - start)) ** self.power

    def dropped_queries(self, block: int, batch: int, num_queries: int, device) -> Tensor | None:
        """bool [B, Q]: True where query q of image b attends everywhere in query block
        ``block`` (official: uniform draw > probability); None when the probability is 1."""
        prob = self.probs[block]
        if prob >= 1.0:
            return None
        if self.training:
            generator = self._generator_on(device)
        else:
            generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(batch, num_queries, generator=generator, device=device) > prob

    def _generator_on(self, device) -> torch.Generator:
        return generator_on(self, device)

    def get_extra_state(self) -> dict:
        state = self.generator.get_state() if self.generator is not None else self._pending_state
        return {"seed": self.seed, "generator": state, "probs": list(self.probs)}

    def set_extra_state(self, state: dict) -> None:
        if len(state["probs"]) != len(self.probs):
            raise ValueError(f"mask annealing state for {len(state['probs'])} query blocks, model has {len(self.probs)}")
        self.seed, self.probs = int(state["seed"]), [float(p) for p in state["probs"]]
        self.generator, self._pending_state = None, state["generator"]


class EoMT(SegmentationModel):
    """ViT encoder + queries in its last ``num_blocks`` blocks + per-block predictions."""

    panoptic_confident_pixels = True  # official to_per_pixel_preds_panoptic

    def __init__(self, backbone: ViTEncoder, num_classes: int, num_queries: int = 200, num_blocks: int = 4,
                 mask_annealing: MaskAnnealing | None = None, masked_attn: bool = True,
                 pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 pixel_std: Sequence[float] = (58.395, 57.12, 57.375), size_divisibility: int = 16):
        super().__init__(pixel_mean, pixel_std, size_divisibility)
        if not 1 <= num_blocks <= len(backbone.blocks):
            raise ValueError(f"num_blocks must be in [1, {len(backbone.blocks)}] (the ViT's depth), got {num_blocks}")
        dim = backbone.embed_dim
        self.backbone = backbone
        self.num_classes, self.num_queries = num_classes, num_queries
        self.num_blocks, self.masked_attn = num_blocks, masked_attn
        # the square size the official inference runs at (its ``img_size``: windows / padding)
        self.inference_size = backbone.img_size
        self.mask_annealing = mask_annealing or MaskAnnealing(num_blocks, masked_attn=masked_attn)
        self.queries = nn.Embedding(num_queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(),
                                       nn.Linear(dim, dim))
        num_upscale = max(1, int(math.log2(backbone.patch_size)) - 2)  # patch 16: two 2x blocks -> stride 4
        self.upscale = nn.Sequential(*[ScaleBlock(dim) for _ in range(num_upscale)])
        self.first_query_block = len(backbone.blocks) - num_blocks
        backbone.prepend_to_blocks(num_queries, self.first_query_block)

    def forward(self, images: Tensor) -> MaskFormerOutput:
        """images: float [B, 3, H, W], normalised and padded (``preprocess``), H and W multiples of
        the patch size -> class_logits [L, B, Q, K+1], mask_embed [L, B, Q, C], pixel_embed
        [L, B, C, H/4, W/4]; L = the intermediate predictions made + 1 (the final one)."""
        x, grid, rope = self.backbone.embed(images)  # (b, p + hw, c)
        predictions = []
        for i in range(len(self.backbone.blocks)):
            attn_mask = None
            if i == self.first_query_block:
                x = torch.cat([self.queries.weight[None].expand(x.shape[0], -1, -1), x], dim=1)
            if i >= self.first_query_block and self._predicts_before(i - self.first_query_block):
                predictions.append(self._predict(self.backbone.norm(x), grid))
                attn_mask = self._attention_mask(*predictions[-1][1:], grid, i - self.first_query_block)
            x = self.backbone.block(i, x, attn_mask, rope)
        predictions.append(self._predict(self.backbone.norm(x), grid))
        class_logits, mask_embed, pixel_embed = (torch.stack(t) for t in zip(*predictions))
        return MaskFormerOutput(class_logits, mask_embed, pixel_embed)

    def _predicts_before(self, query_block: int) -> bool:
        """An intermediate prediction before query block ``query_block``: always in training (deep
        supervision, official) with masked attention on; in eval only while it still masks."""
        return self.masked_attn and (self.training or self.mask_annealing.probs[query_block] > 0)

    def _predict(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised tokens x [B, Q + P + h*w, C] -> class logits [B, Q, K+1], mask embeddings
        [B, Q, C], pixel embeddings [B, C, 4h, 4w] (patch 16)."""
        queries = x[:, : self.num_queries]
        patches = x[:, self.num_queries + self.backbone.num_prefix_tokens:]  # (b, hw, c)
        patches = patches.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return self.class_head(queries), self.mask_head(queries), self.upscale(patches)

    def _attention_mask(self, mask_embed: Tensor, pixel_embed: Tensor, grid: tuple[int, int],
                        query_block: int) -> Tensor | None:
        """bool [B, 1, N, N] (True = may attend; N = Q + P + h*w): query q sees patch p only where
        its mask logit, bilinearly resized to the patch grid, is > 0, unless annealing dropped its
        mask; every other pair is unmasked. None once annealing has dropped every mask.

        Resizing is linear, so it commutes with the einsum: resizing the C-channel pixel
        embeddings first gives the official resized logits with 16x fewer multiply-adds than
        forming the [B, Q, 4h, 4w] logits (equal up to rounding)."""
        if self.mask_annealing.probs[query_block] <= 0:
            return None
        b, q = mask_embed.shape[:2]
        pixels = F.interpolate(pixel_embed, size=grid, mode="bilinear", align_corners=False)
        keep = torch.einsum("bqc,bchw->bqhw", mask_embed, pixels).flatten(2) > 0  # (b, q, hw)
        dropped = self.mask_annealing.dropped_queries(query_block, b, q, keep.device)
        if dropped is not None:
            keep = keep | dropped[:, :, None]
        n = q + self.backbone.num_prefix_tokens + keep.shape[-1]
        mask = keep.new_ones(b, n, n)
        mask[:, :q, n - keep.shape[-1]:] = keep
        return mask[:, None]


def build_eomt(cfg) -> EoMT:
    """From a ``ModelConfig`` (meta_arch eomt)."""
    b = cfg.backbone
    backbone = ViTEncoder(b.name, img_size=b.img_size, patch_size=cfg.patch_size, pretrained=b.pretrained,
                         **dict(b.kwargs or {}))
    annealing = MaskAnnealing(cfg.num_blocks, cfg.mask_annealing_start, cfg.mask_annealing_end,
                              cfg.mask_annealing_power, cfg.mask_annealing_seed, cfg.masked_attn)
    return EoMT(backbone, cfg.num_classes, cfg.num_queries, cfg.num_blocks, annealing, cfg.masked_attn,
                cfg.pixel_mean, cfg.pixel_std, cfg.size_divisibility)
