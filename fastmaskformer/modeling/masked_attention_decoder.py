"""Mask2Former's transformer decoder: masked attention over a multi-scale feature pyramid
(Cheng et al., CVPR 2022, Sec. 3.2; the official ``MultiScaleMaskedTransformerDecoder``).

    learnable query features + query positions
    prediction 0 (before any layer)
    for layer i = 0..8, level = i % 3 (strides 32, 16, 8):
        masked cross-attention to level ``level`` (keys carry sine PE; values and keys carry the
        level embedding), mask from the previous prediction -> self-attention -> FFN (post-norm,
        dropout 0)
        prediction i + 1

Every prediction goes through one shared ``decoder_norm`` and the class / mask-embedding heads.
The attention mask of a prediction blocks the pixels where ``sigmoid(logit) < 0.5`` with the
logits bilinearly resampled (``align_corners=False``) to the next level's size; a query whose
row is fully blocked attends everywhere. Bilinear resampling is linear, so we resample the pixel
embedding ``[B, C, h, w]`` to the level size and take its products with the mask embeddings:
the ``[B, Q, h, w]`` logits are never built (the official code builds them at every layer).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import c2_xavier_fill
from .position_encoding import PositionEmbeddingSine
from .transformer import FeedForward

NUM_LEVELS = 3  # the official decoder always cycles over three scales


class MaskedCrossAttentionLayer(nn.Module):
    """Post-norm cross-attention: ``norm(tgt + attn(tgt + query_pos, memory + pos, memory, mask))``."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, attn_mask: Tensor | None) -> Tensor:
        """tgt, query_pos: [B, Q, d]; memory, pos: [B, S, d]; attn_mask bool [B*nheads, Q, S]
        (True = blocked) -> [B, Q, d]."""
        out = self.attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention among the queries (query positions on queries and keys)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """tgt, query_pos: [B, Q, d] -> [B, Q, d]."""
        q = tgt + query_pos
        return self.norm(tgt + self.dropout(self.attn(q, q, tgt, need_weights=False)[0]))


class FFNLayer(nn.Module):
    """Post-norm feed-forward: ``norm(x + ffn(x))``."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.ffn(x)))


def attention_mask(mask_embed: Tensor, pixel_embed_level: Tensor, nheads: int) -> Tensor:
    """mask_embed [B, Q, C], pixel_embed_level [B, C, h_l, w_l] (the pixel embedding resampled to
    the attention level) -> bool [B*nheads, Q, h_l*w_l], True where the query must not attend
    (``sigmoid(logit) < 0.5``); a fully blocked row is unblocked (the official decoder does this
    right before the attention). Head-major inside each image, as ``nn.MultiheadAttention`` wants."""
    logits = torch.einsum("bqc,bcs->bqs", mask_embed, pixel_embed_level.flatten(2))
    blocked = logits.sigmoid() < 0.5
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    b, q, s = blocked.shape
    return blocked[:, None].expand(b, nheads, q, s).reshape(b * nheads, q, s).detach()


def resample_pixel_embed(pixel_embed: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """The pixel embedding [B, C, h, w] bilinearly resampled (``align_corners=False``, the
    official interpolation of the logits) to each attention level size: [B, C, h_l, w_l]."""
    return [F.interpolate(pixel_embed, size=s, mode="bilinear", align_corners=False) for s in sizes]


class MaskedAttentionDecoder(nn.Module):
    """The official ``MultiScaleMaskedTransformerDecoder``.

    in_channels: width of the multi-scale features (the pixel decoder's conv_dim); a 1x1 input
    projection per level only when it differs from hidden_dim (official ``enforce_input_project``
    False). num_predictions: the official ``DEC_LAYERS`` (10): one prediction from the query
    features plus one per decoder layer, so ``num_predictions - 1`` layers.
    """

    def __init__(self, in_channels: int, num_classes: int, num_queries: int = 100, hidden_dim: int = 256,
                 mask_dim: int = 256, nheads: int = 8, dim_feedforward: int = 2048, num_predictions: int = 10,
                 dropout: float = 0.0, enforce_input_project: bool = False):
        super().__init__()
        from .maskformer import MLP  # the same 3-layer mask-embedding head as MaskFormer

        if num_predictions < 1:
            raise ValueError(f"Mask2Former needs dec_layers >= 1 (predictions), got {num_predictions}")
        self.nheads = nheads
        self.pe = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        n = num_predictions - 1
        self.cross_attention_layers = nn.ModuleList(MaskedCrossAttentionLayer(hidden_dim, nheads, dropout)
                                                    for _ in range(n))
        self.self_attention_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim, nheads, dropout) for _ in range(n))
        self.ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward, dropout) for _ in range(n))
        # Official init: Xavier on every matrix of the attention / FFN layers.
        for layers in (self.cross_attention_layers, self.self_attention_layers, self.ffn_layers):
            for p in layers.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(NUM_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(NUM_LEVELS):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @property
    def num_layers(self) -> int:
        return len(self.cross_attention_layers)

    def heads(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder state [B, Q, d] -> (class logits [B, Q, K+1], mask embedding [B, Q, C])."""
        x = self.decoder_norm(output)
        return self.class_embed(x), self.mask_embed(x)

    def forward(self, features: Sequence[Tensor], pixel_embed: Tensor) -> tuple[Tensor, Tensor]:
        """features: 3 maps [B, C_in, h_l, w_l], lowest resolution first (strides 32, 16, 8);
        pixel_embed: [B, C, h, w] (stride 4) -> class_logits [L, B, Q, K+1], mask_embed [L, B, Q, C]
        with L = num_layers + 1 predictions."""
        if len(features) != NUM_LEVELS:
            raise ValueError(f"Mask2Former's decoder attends to {NUM_LEVELS} feature levels, got {len(features)}")
        sizes = [tuple(x.shape[-2:]) for x in features]
        srcs, pos = [], []
        for i, x in enumerate(features):
            pos.append(self.pe(x).flatten(2).transpose(1, 2).to(x.dtype))  # (b, s, d)
            src = self.input_proj[i](x).flatten(2).transpose(1, 2)
            srcs.append(src + self.level_embed.weight[i].to(src.dtype))  # (b, s, d)
        levels_embed = resample_pixel_embed(pixel_embed, sizes)
        b = features[0].shape[0]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)  # (b, q, d)
        output = self.query_feat.weight[None].expand(b, -1, -1)  # (b, q, d)
        classes, embeds = [], []
        cls, emb = self.heads(output)
        classes.append(cls)
        embeds.append(emb)
        for i in range(self.num_layers):
            level = i % NUM_LEVELS
            mask = attention_mask(emb, levels_embed[level], self.nheads)
            output = self.cross_attention_layers[i](output, srcs[level], pos[level], query_pos, mask)
            output = self.self_attention_layers[i](output, query_pos)
            output = self.ffn_layers[i](output)
            cls, emb = self.heads(output)
            classes.append(cls)
            embeds.append(emb)
        return torch.stack(classes), torch.stack(embeds)
