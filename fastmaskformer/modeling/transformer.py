"""DETR transformer encoder and decoder, as MaskFormer uses them (DESIGN 2).

Post-norm by default (``pre_norm=False``, the official setting): each sub-layer is
``x = norm(x + dropout(sublayer(x)))``. Attention is ``nn.MultiheadAttention`` so dropout also
applies to the attention probabilities (HF transformers sets that dropout to 0) and the
parameter layout (packed ``in_proj_weight``) matches the official checkpoints.

All sequences are batch-first: ``[B, S, d]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def xavier_init_matrices(module: nn.Module) -> None:
    """Xavier-uniform on every parameter with more than one dimension (DETR's
    ``_reset_parameters``); biases and LayerNorms keep their defaults."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class FeedForward(nn.Module):
    """Linear(d, f) - ReLU - Dropout - Linear(f, d)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention (sine PE added to queries and keys) + FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        """src, pos: [B, S, d] -> [B, S, d]."""
        if self.pre_norm:
            x = self.norm1(src)
            q = x + pos
            src = src + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0])
            return src + self.dropout2(self.ffn(self.norm2(src)))
        q = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN.

    The learnable query positional embedding is added to queries and keys of the
    self-attention and to the queries of the cross-attention; the memory's sine encoding is
    added to the cross-attention keys. Values never carry positions.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, pos: Tensor) -> Tensor:
        """tgt, query_pos: [B, Q, d]; memory, pos: [B, S, d] -> [B, Q, d]."""
        mem_key = memory + pos
        if self.pre_norm:
            x = self.norm1(tgt)
            q = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.cross_attn(x + query_pos, mem_key, memory, need_weights=False)[0])
            return tgt + self.dropout3(self.ffn(self.norm3(tgt)))
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, mem_key, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers; pre-norm adds a final LayerNorm (post-norm needs none)."""

    def __init__(self, num_layers: int, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if pre_norm else None
        xavier_init_matrices(self)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        """src, pos: [B, S, d] -> memory [B, S, d]."""
        for layer in self.layers:
            src = layer(src, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers with ONE shared output LayerNorm.

    Every layer's output goes through the same ``norm`` for the prediction heads (deep
    supervision), while the next layer receives the un-normalised state, as in DETR.
    """

    def __init__(self, num_layers: int, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        xavier_init_matrices(self)

    def forward(self, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """memory, pos: [B, S, d]; query_pos: [B, Q, d] -> hs [L, B, Q, d] (normalised)."""
        tgt = torch.zeros_like(query_pos)  # decoder input is zero; queries differ only by query_pos
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)
