"""Batched Hungarian solver: fastmaskformer's C++ solver vs a scipy loop vs a lap.lapjv loop.

    python benchmarks/bench_assignment.py --repeats 15 --json benchmarks/results/cpu-solver-DATE.json

Problems are the matcher's (DESIGN 3): Q x M costs for 100 queries, M in {8, 20, 50, 100}, and
200 x 100; batches of 1, 16 and 96 (= B 16 x 6 decoder layers) float32 matrices, as the matcher
copies them from the device. Providers, all in this process on the same matrices:

- ``ours-1t``: ``linear_sum_assignment_batch(costs, num_threads=1)``
- ``ours-all``: the same with every core this process may use
- ``scipy``: a Python loop over ``scipy.optimize.linear_sum_assignment``
- ``lapjv``: a Python loop over ``lap.lapjv``, which wants a square matrix: each problem is
  padded with zero columns (or rows) to square, inside the timed loop. Zero padding adds the
  same cost to every choice of real pairs, so the real part of its answer stays optimal.

Each configuration has 96 distinct problems (96 / batch batches of `batch`); a sample solves
them all, batch by batch, repeated to last >= 2 ms so that timer resolution does not matter.
After warm-up we report the median over ``--repeats`` samples as microseconds per problem and
the speedup over the scipy loop. Before timing, every provider's total cost is checked against
scipy's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from fastmaskformer.ops import linear_sum_assignment_batch

SHAPES = ((100, 8), (100, 20), (100, 50), (100, 100), (200, 100))
BATCHES = (1, 16, 96)
MIN_SAMPLE_S = 2e-3
POOL_PROBLEMS = 96


def scipy_loop(costs):
    return [linear_sum_assignment(c) for c in costs]


def lapjv_loop(costs):
    """lap.lapjv on each cost zero-padded to square; returns scipy-style (rows, cols) pairs."""
    import lap

    results = []
    for cost in costs:
        rows, cols = cost.shape
        n = max(rows, cols)
        square = np.zeros((n, n))
        square[:rows, :cols] = cost
        _, col4row, _ = lap.lapjv(square, return_cost=True)
        real = np.flatnonzero(col4row[:rows] < cols)
        results.append((real, col4row[real]))
    return results


def providers(all_threads: int) -> dict:
    return {
        "ours-1t": lambda costs: linear_sum_assignment_batch(costs, num_threads=1),
        "ours-all": lambda costs: linear_sum_assignment_batch(costs, num_threads=all_threads),
        "scipy": scipy_loop,
        "lapjv": lapjv_loop,
    }


def total_costs(costs, results) -> np.ndarray:
    return np.array([c.astype(np.float64)[r, k].sum() for c, (r, k) in zip(costs, results)])


def check_optimal(name: str, costs, results, reference) -> None:
    ours, ref = total_costs(costs, results), total_costs(costs, reference)
    if not np.allclose(ours, ref, rtol=1e-9, atol=0.0):
        raise SystemExit(f"{name}: total cost differs from scipy's: {ours} vs {ref}")


def median_seconds(fn, batches: list, repeats: int, warmup: int = 2) -> float:
    """Median wall time of one fn(batch) call over `repeats` samples. Each sample cycles through
    `batches` (distinct matrices), so that no provider profits from a branch predictor or cache
    that has learnt one matrix by heart."""
    for _ in range(warmup):
        for costs in batches:
            fn(costs)
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < MIN_SAMPLE_S:
        for costs in batches:
            fn(costs)
        rounds += 1
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(rounds):
            for costs in batches:
                fn(costs)
        samples.append((time.perf_counter() - start) / (rounds * len(batches)))
    return statistics.median(samples)


def run(repeats: int, dtype: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    threads = len(os.sched_getaffinity(0))
    rows = []
    for shape in SHAPES:
        for batch in BATCHES:
            # At least POOL_PROBLEMS distinct problems per configuration, in batches of `batch`.
            batches = [[rng.random(shape).astype(dtype) for _ in range(batch)]
                       for _ in range(max(1, POOL_PROBLEMS // batch))]
            times = {}
            for name, fn in providers(threads).items():
                for costs in batches:
                    check_optimal(name, costs, fn(costs), scipy_loop(costs))
                times[name] = median_seconds(fn, batches, repeats)
            for name, seconds in times.items():
                rows.append({
                    "shape": f"{shape[0]}x{shape[1]}", "rows": shape[0], "cols": shape[1],
                    "batch": batch, "provider": name, "threads": threads if name == "ours-all" else 1,
                    "median_ms": seconds * 1e3, "per_problem_us": seconds / batch * 1e6,
                    "speedup_vs_scipy": times["scipy"] / seconds,
                })
            print(f"{shape} x {batch}: " + ", ".join(
                f"{n} {t / batch * 1e6:.1f} us" for n, t in times.items()), file=sys.stderr)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per (shape, batch): us per problem for each provider, speedups vs scipy."""
    names = list(dict.fromkeys(r["provider"] for r in rows))
    head = ["shape", "batch", *[f"{n} us" for n in names], "ours-1t x", "ours-all x", "lapjv x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["batch"]), {})[r["provider"]] = r
    for (shape, batch), by_name in groups.items():
        cells = [shape, str(batch), *[f"{by_name[n]['per_problem_us']:.2f}" for n in names]]
        cells += [f"{by_name[n]['speedup_vs_scipy']:.1f}" for n in ("ours-1t", "ours-all", "lapjv")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import lap
    import scipy

    return {"cpu": name, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__, "lap": lap.__version__,
            # Other work on a shared machine shows here, and in "ours-all" not scaling.
            "load_average_1min_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed samples per provider")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = run(args.repeats, args.dtype, args.seed)
    table = markdown_table(rows)
    print(table)
    if args.json:
        report = {"benchmark": "linear_sum_assignment_batch", "date": dt.date.today().isoformat(),
                  "machine": {**machine(), "load_average_1min_before": load_before},
                  "dtype": args.dtype, "repeats": args.repeats,
                  "unit": "microseconds per problem (median), speedup = scipy time / time",
                  "table": table, "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
