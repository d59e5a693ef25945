"""How much of multi-scale deformable attention's gather traffic an SM's L1 cache can serve.

The roofline (``roofline.py``) charges every bilinear tap to L2. Neighbouring queries sample
overlapping value rows, so part of that traffic is repeats an L1 cache serves, and how much
depends on what one thread block (program) touches and in which order: our Triton kernels give a
program BLOCK_Q neighbouring queries of ONE head (the backward QBLOCKS such blocks in turn), the
official CUDA extension's forward block 4 queries x 8 heads (1024 threads over (q, h, d)) and its
backward block one (query, head), PyTorch's ``grid_sample`` (the eager formulation) 256
neighbouring outputs (query, point) of one (image, head) plane, each thread looping over the
channels.

This module replays those access streams on the benchmark's inputs (``deform_inputs.make_inputs``:
reference points at pixel centres plus Gaussian offsets of 2 pixels, one image: the statistics
are per image) through one least-recently-used cache per block, and returns the
bytes that miss it (what L2 must serve) per byte the roofline charges today.

Rules, the same for every kernel (assumptions, stated):
- ``L1_BYTES`` of L1 per SM, shared evenly by the blocks that can be resident (warps alone: 64
  warps, 32 blocks per SM; the most blocks, so the least L1 each);
- a block's accesses run in its loop order, the lanes of one load in query order; blocks on one
  SM share nothing (consecutive blocks go to different SMs);
- lines: a value row of one head (D elements, contiguous in [S, H, D]) for ours and the
  official op; a 32-byte sector for ``grid_sample``'s 4-byte channel reads (its value planes are
  [D, h, w]: a tap's channels are h*w elements apart, so an isolated read moves a whole sector);
- atomics are executed in L2 and are not cached (charged in full elsewhere).
Blocks are sampled (every 7th at 512x512, every 28th at 1024x1024, the same for all kernels) to
keep this under a minute on a CPU.
"""
from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from pathlib import Path

import torch

L1_BYTES = 192 * 1024  # per SM (H100: 256 KB of L1 + shared memory; these kernels use almost none)
SECTOR = 32
MAX_WARPS, MAX_BLOCKS = 64, 32
GRID_SAMPLE_THREADS = 256  # PyTorch's grid_sampler_2d kernels
OFFICIAL_FWD_THREADS = 1024  # the official extension: CUDA_NUM_THREADS threads over (b, q, h, d)


def _per_block_bytes(warps: int) -> int:
    """L1 bytes one block gets: L1_BYTES shared by the most blocks of ``warps`` warps an SM holds."""
    return L1_BYTES // min(MAX_BLOCKS, MAX_WARPS // warps)


@functools.lru_cache(maxsize=None)
def tap_rows(size: int) -> tuple[torch.Tensor, list]:
    """Value rows of every tap of the benchmark's inputs (one image): int64 [L, Lq, H, P, 4]
    (flat row in the [S] levels, -1 outside the map; corners 00, 01, 10, 11) and the level shapes."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from deform_inputs import make_inputs

    _, shapes, _, loc, _ = make_inputs(1, size, "cpu")
    levels, start = [], 0
    for lvl, (h_l, w_l) in enumerate(shapes):
        x = loc[0, :, :, lvl, :, 0] * w_l - 0.5
        y = loc[0, :, :, lvl, :, 1] * h_l - 0.5
        x0, y0 = x.floor().long(), y.floor().long()
        corners = []
        for dy in (0, 1):
            for dx in (0, 1):
                xx, yy = x0 + dx, y0 + dy
                inside = (xx >= 0) & (xx < w_l) & (yy >= 0) & (yy < h_l)
                corners.append(torch.where(inside, start + yy * w_l + xx, -1))
        levels.append(torch.stack(corners, -1))
        start += h_l * w_l
    return torch.stack(levels), shapes


def _lru_misses(streams, capacity: int, counted_below: int = 1 << 62) -> tuple[int, int]:
    """(misses, accesses) of the lines below ``counted_below`` in the streams (iterables of line
    ids, -1 = no access; every line occupies the cache), each stream through its own LRU cache of
    ``capacity`` lines."""
    misses = accesses = 0
    for stream in streams:
        cache = OrderedDict()
        for line in stream:
            if line < 0:
                continue
            counted = line < counted_below
            accesses += counted
            if line in cache:
                cache.move_to_end(line)
            else:
                misses += counted
                cache[line] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return misses, accesses


def _row_blocks(rows: torch.Tensor, queries: int, heads_per_block: int, stride: int):
    """The blocks of ``queries`` neighbouring queries x ``heads_per_block`` heads, every
    ``stride``-th: (query slice, head slice) pairs."""
    _, lq, nh, _, _ = rows.shape
    blocks = [(slice(q, q + queries), slice(h, h + heads_per_block))
              for q in range(0, lq, queries) for h in range(0, nh, heads_per_block)]
    return blocks[::stride]


def _stride(size: int) -> int:
    """Every how many blocks to simulate: about the same number at every size."""
    return 7 * max(1, size // 512) ** 2


@functools.lru_cache(maxsize=None)
def row_kernel_miss_ratio(size: int, dtype_bytes: int, kernel: str, block_q: int = 16, qblocks: int = 1,
                          warps: int = 4, head_dim: int = 32) -> float:
    """Value-row bytes that miss L1 per tap byte (the grad_out rows of the backward occupy the
    cache but are charged elsewhere), for a kernel reading whole rows of one head:
    ``ours-fwd`` (BLOCK_Q queries of one head: levels, points, corners, the queries as lanes),
    ``ours-bwd`` (QBLOCKS blocks of BLOCK_Q queries in turn, each: its grad_out rows, then as the
    forward), ``official-fwd`` (4 queries x 8 heads per block; every (q, h) warp at the same step)
    and ``official-bwd`` (one query and head per block, its grad_out row first)."""
    rows, _ = tap_rows(size)  # [L, Lq, H, P, 4]
    nl, lq, nh, npt, _ = rows.shape
    row_bytes = head_dim * dtype_bytes
    grad_line = 1 << 40  # grad_out rows: ids apart from the value rows
    if kernel == "ours-fwd":
        queries, heads, qblocks = block_q, 1, 1
    elif kernel == "ours-bwd":
        queries, heads = block_q * qblocks, 1
    elif kernel == "official-fwd":
        queries, heads, qblocks, warps = OFFICIAL_FWD_THREADS // (nh * head_dim), nh, 1, OFFICIAL_FWD_THREADS // 32
    elif kernel == "official-bwd":
        queries, heads, qblocks, warps = 1, 1, 1, 1
    else:
        raise ValueError(kernel)
    capacity = _per_block_bytes(warps) // row_bytes

    def stream(qs, hs):
        sub_q = max(1, (qs.stop - qs.start) // qblocks)
        for sub in range(qs.start, min(qs.stop, lq), sub_q):
            block = rows[:, sub:min(sub + sub_q, lq), hs]  # [L, q, h, P, 4]
            lines = block * nh + torch.arange(hs.start, hs.start + block.shape[2])[None, None, :, None, None]
            lines = torch.where(block >= 0, lines, -1)
            if kernel.endswith("bwd"):
                q_ids = torch.arange(sub, sub + block.shape[1])[:, None] * nh + torch.arange(hs.start, hs.stop)
                yield from (grad_line + q_ids.flatten()).tolist()
            # issue order: level, point, corner; the lanes (queries, then heads) of one load together
            yield from lines.permute(0, 3, 4, 1, 2).flatten().tolist()

    misses, accesses = _lru_misses((stream(qs, hs) for qs, hs in _row_blocks(rows, queries, heads, _stride(size))),
                                   capacity, counted_below=grad_line)
    return misses / accesses if accesses else 1.0


@functools.lru_cache(maxsize=None)
def grid_sample_miss_ratio(size: int, dtype_bytes: int, head_dim: int = 32, channels: int = 4) -> float:
    """``grid_sample``'s gathers: L2 bytes (32-byte sectors missing L1) per 4-tap byte the roofline
    charges (4 taps x element size per output element). One call per level on [H, D, h_l, w_l]
    planes; a block = 256 neighbouring (query, point) outputs of one plane; each thread loops over
    the channels (the first ``channels`` of the D simulated: the planes are alike, the other
    channels repeat the pattern on their own planes)."""
    rows, shapes = tap_rows(size)
    nl, lq, nh, npt, _ = rows.shape
    capacity = _per_block_bytes(GRID_SAMPLE_THREADS // 32) // SECTOR
    starts = [0]
    for h_l, w_l in shapes:
        starts.append(starts[-1] + h_l * w_l)
    plane_elems = 1 << 24

    def stream(lvl, h, first):
        outs = rows[lvl, :, h].reshape(lq * npt, 4)[first:first + GRID_SAMPLE_THREADS]  # [256, 4] corners
        local = torch.where(outs >= 0, outs - starts[lvl], -1)
        for c in range(channels):
            sectors = ((lvl * nh + h) * head_dim + c) * plane_elems + local * dtype_bytes // SECTOR
            yield from torch.where(outs >= 0, sectors, -1).t().flatten().tolist()  # corner loads, lanes

    blocks = [(lvl, h, first) for lvl in range(nl) for h in range(nh)
              for first in range(0, lq * npt, GRID_SAMPLE_THREADS)][::_stride(size)]
    misses, accesses = _lru_misses((stream(*b) for b in blocks), capacity)
    return misses * SECTOR / (accesses * dtype_bytes) if accesses else 1.0


@functools.lru_cache(maxsize=None)
def merged_atomic_ratio(size: int, block_q: int) -> float:
    """Atomics of the merged value-gradient scatter (``MERGE``: a program's taps of one level
    sorted by row, one atomic per distinct row) per atomic of the per-tap scatter: distinct rows
    per (block of ``block_q`` neighbouring queries, head, level) over the taps inside the map, on
    the benchmark's inputs (every block: no sampling needed, this is a count)."""
    rows, _ = tap_rows(size)  # [L, Lq, H, P, 4]
    nl, lq, nh, npt, _ = rows.shape
    blocks = -(-lq // block_q)
    padded = torch.cat([rows, rows.new_full((nl, blocks * block_q - lq, nh, npt, 4), -1)], 1)
    taps = padded.view(nl, blocks, block_q, nh, npt, 4).permute(0, 1, 3, 2, 4, 5).reshape(nl * blocks * nh, -1)
    taps = taps.sort(-1).values
    inside = taps >= 0
    new_row = torch.ones_like(inside)
    new_row[:, 1:] = taps[:, 1:] != taps[:, :-1]
    return (inside & new_row).sum().item() / inside.sum().item()

