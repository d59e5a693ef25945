"""benchmarks/deform_cache.py: the L1 replay behind the roofline's L1-aware deformable-attention
rows. The LRU counts what it should, a block's misses with an unbounded cache are exactly the
distinct value rows its queries touch, and the merged scatter's atomics are the distinct rows of
each block's level."""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import deform_cache  # noqa: E402


def test_lru_counts_hits_misses_and_evictions():
    # capacity 2: 1 m, 2 m, 1 h, 3 m (evicts 2), 1 h, 2 m (evicts 3); line 9 occupies but is not counted
    assert deform_cache._lru_misses([[1, 2, 1, 3, 1, 2]], capacity=2) == (4, 6)
    assert deform_cache._lru_misses([[1, -1, 1], [1]], capacity=4) == (2, 3)  # -1: no access; own cache each
    assert deform_cache._lru_misses([[1, 9, 1, 9, 2, 1]], capacity=2, counted_below=5) == (3, 4)


def test_unbounded_cache_misses_are_the_distinct_rows_of_each_block(monkeypatch):
    monkeypatch.setattr(deform_cache, "L1_BYTES", 1 << 40)
    deform_cache.row_kernel_miss_ratio.cache_clear()
    rows, _ = deform_cache.tap_rows(128)  # [L, Lq, H, P, 4]
    _, lq, nh, _, _ = rows.shape
    block_q, stride = 16, deform_cache._stride(128)
    blocks = [(q, h) for q in range(0, lq, block_q) for h in range(nh)][::stride]
    distinct = accesses = 0
    for q, h in blocks:
        taps = rows[:, q:q + block_q, h]
        taps = taps[taps >= 0]
        distinct += taps.unique().numel()
        accesses += taps.numel()
    got = deform_cache.row_kernel_miss_ratio(128, 4, "ours-fwd", block_q=block_q, warps=4)
    deform_cache.row_kernel_miss_ratio.cache_clear()
    assert abs(got - distinct / accesses) < 1e-12
    assert 0 < got < 1  # neighbouring queries share rows


def test_one_query_blocks_reuse_less_than_query_tiles():
    """The official backward's blocks (one query, one head) miss more than ours (BLOCK_Q queries of
    one head); grid_sample's sector reads cost at most 8x the packed 4-byte count."""
    ours = deform_cache.row_kernel_miss_ratio(128, 4, "ours-bwd", block_q=8, qblocks=1, warps=4)
    official = deform_cache.row_kernel_miss_ratio(128, 4, "official-bwd")
    assert 0 < ours < official <= 1
    assert 0 < deform_cache.grid_sample_miss_ratio(128, 4) <= deform_cache.SECTOR / 4


def test_merged_atomics_are_the_distinct_rows_of_each_block_and_level():
    """The merged scatter's atomic count: per (block of queries, head, level), one per distinct
    value row among its taps inside the map - counted here block by block with ``unique``."""
    rows, _ = deform_cache.tap_rows(128)  # [L, Lq, H, P, 4]
    nl, lq, nh, _, _ = rows.shape
    block_q = 8
    distinct = inside = 0
    for lvl in range(nl):
        for q in range(0, lq, block_q):
            for h in range(nh):
                taps = rows[lvl, q:q + block_q, h]
                taps = taps[taps >= 0]
                distinct += taps.unique().numel()
                inside += taps.numel()
    got = deform_cache.merged_atomic_ratio(128, block_q)
    assert abs(got - distinct / inside) < 1e-12
    assert 0 < got < 1
    assert deform_cache.merged_atomic_ratio(128, 2 * block_q) <= got  # bigger blocks merge more
