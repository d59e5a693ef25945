"""pytest-benchmark timings of the batched Hungarian solver (see bench_assignment.py for the
standalone table). Marked slow, and outside tests/, so CI never runs them; run with

    pytest benchmarks/test_bench_assignment.py --benchmark-only

Each benchmark solves one batch of float32 problems of the given shape: ours with one thread,
ours with every available core, a scipy loop and a lap.lapjv loop (zero-padded to square).
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from bench_assignment import lapjv_loop, scipy_loop  # noqa: E402

from fastmaskformer.ops import linear_sum_assignment_batch  # noqa: E402

SHAPES = [(100, 8), (100, 20), (100, 50), (100, 100), (200, 100)]
BATCHES = [1, 16, 96]
PROVIDERS = {
    "ours-1t": lambda costs: linear_sum_assignment_batch(costs, num_threads=1),
    "ours-all": lambda costs: linear_sum_assignment_batch(costs),
    "scipy": scipy_loop,
    "lapjv": lapjv_loop,
}


@pytest.mark.slow
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_solve_batch(benchmark, shape, batch, provider):
    rng = np.random.default_rng(0)
    costs = [rng.random(shape).astype(np.float32) for _ in range(batch)]
    benchmark.group = f"{shape[0]}x{shape[1]} batch {batch}"
    benchmark.extra_info.update(shape=list(shape), batch=batch, provider=provider)
    results = benchmark(PROVIDERS[provider], costs)
    assert len(results) == batch
