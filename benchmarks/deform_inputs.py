"""The deformable-attention benchmark's inputs (``bench_ms_deform_attn.py``, and the L1 replay of
``deform_cache.py``): one call of the Mask2Former pixel decoder's encoder self-attention."""
from __future__ import annotations

import torch

HEADS, HEAD_DIM, LEVELS, POINTS = 8, 32, 3, 4


def make_inputs(batch: int, size: int, device, dtype=torch.float32, loc_dtype=torch.float32, seed=0):
    """value [B,S,H,D], shapes (list and int64 [L,2]), locations [B,S,H,L,P,2], weights [B,S,H,L,P]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    tokens = sum(h * w for h, w in shapes)
    ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                indexing="xy"), -1).reshape(-1, 2) for h, w in shapes])
    scale = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # offsets in pixels of each level
    offsets = torch.randn(batch, tokens, HEADS, LEVELS, POINTS, 2, generator=g) * 2.0 / scale[:, None, :]
    loc = ref[None, :, None, None, None, :] + offsets
    weights = torch.randn(batch, tokens, HEADS, LEVELS * POINTS, generator=g).softmax(-1)
    value = torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=g)
    return (value.to(device, dtype), shapes, torch.tensor(shapes, dtype=torch.int64, device=device),
            loc.to(device, loc_dtype), weights.view(batch, tokens, HEADS, LEVELS, POINTS).to(device, loc_dtype))
