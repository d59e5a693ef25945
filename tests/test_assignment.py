"""linear_sum_assignment_batch (fastmaskformer._C) against scipy.optimize.linear_sum_assignment.

Property tests draw batches of random problems (sizes 0..150 each way, few of them large) and
check that every answer is a valid matching of min(rows, cols) pairs whose total cost equals
scipy's. Bad input must raise a ValueError naming the problem, on both the native and the scipy
fallback path. The extension's thread pool is tested for reuse, concurrent callers, fork
children, exit, and exceptions thrown inside a worker.
"""
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from fastmaskformer.ops import assignment, linear_sum_assignment_batch

KINDS = ("uniform", "ties", "huge", "tiny", "negative")
LAYOUTS = ("c", "transposed", "strided", "fortran")
PROPERTY = settings(max_examples=1000, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def make_values(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> np.ndarray:
    """Random float64 costs of one kind: [rows, cols]."""
    if kind == "uniform":
        return rng.random(shape)
    if kind == "ties":  # integers in a small range: many optimal assignments
        return rng.integers(0, 4, shape).astype(np.float64)
    if kind == "huge":
        return rng.random(shape) * 1e12
    if kind == "tiny":
        return rng.random(shape) * 1e-12
    return rng.uniform(-100.0, 100.0, shape)


def with_layout(values: np.ndarray, layout: str, dtype) -> np.ndarray:
    """The same matrix, stored with another memory layout: C, transposed view, strided view
    (every other row and every third column of a larger array) or Fortran order."""
    values = values.astype(dtype)
    if layout == "transposed":
        return np.ascontiguousarray(values.T).T
    if layout == "strided":
        rows, cols = values.shape
        big = np.full((2 * rows, 3 * cols), np.nan, dtype=dtype)
        big[::2, ::3] = values
        return big[::2, ::3]
    if layout == "fortran":
        return np.asfortranarray(values)
    return values


@st.composite
def problem_batches(draw):
    """A list of 1..8 cost matrices; one in ten batches has sizes up to 150, the rest up to 40
    (keeps the file fast while still covering large problems), a quarter of them square."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    limit = 150 if draw(st.integers(0, 9)) == 0 else 40
    batch = []
    for _ in range(draw(st.integers(1, 8))):
        rows = draw(st.integers(0, limit))
        # One in four square: that case has its own start (LAPJV's column reduction).
        cols = rows if draw(st.integers(0, 3)) == 0 else draw(st.integers(0, limit))
        shape = (rows, cols)
        values = make_values(rng, shape, draw(st.sampled_from(KINDS)))
        dtype = draw(st.sampled_from((np.float32, np.float64)))
        batch.append(with_layout(values, draw(st.sampled_from(LAYOUTS)), dtype))
    return batch


def check_against_scipy(cost: np.ndarray, result, maximize: bool = False) -> None:
    """result must be a valid matching of cost [rows, cols] with scipy's optimal total."""
    rows, cols = result
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == cols.shape == (min(cost.shape),)
    assert np.all(np.diff(rows) > 0), "row_ind must be strictly ascending"
    assert len(np.unique(cols)) == len(cols)
    if len(rows):
        assert 0 <= rows.min() and rows.max() < cost.shape[0]
        assert 0 <= cols.min() and cols.max() < cost.shape[1]
    cost64 = cost.astype(np.float64)
    ref_rows, ref_cols = linear_sum_assignment(cost64, maximize=maximize)
    ours, ref = cost64[rows, cols].sum(), cost64[ref_rows, ref_cols].sum()
    scale = np.abs(cost64).max() if cost64.size else 0.0
    assert abs(ours - ref) <= 1e-9 * (abs(ref) + scale), (ours, ref)


@pytest.fixture(params=["native", "scipy"])
def backend(request, monkeypatch):
    """Runs a test on the C++ extension and again on the scipy fallback."""
    if request.param == "scipy":
        monkeypatch.setattr(assignment, "_native", None)
        monkeypatch.setattr(assignment, "_fallback_warned", True)  # warning tested separately
    return request.param


def test_native_extension_is_built():
    assert assignment._native is not None, "fastmaskformer._C failed to build or import"


@PROPERTY
@given(problem_batches())
def test_random_batches_match_scipy(batch):
    results = linear_sum_assignment_batch(batch)
    assert len(results) == len(batch)
    for cost, result in zip(batch, results):
        check_against_scipy(cost, result)


@settings(max_examples=300, deadline=None)
@given(problem_batches())
def test_maximize_matches_scipy(batch):
    results = linear_sum_assignment_batch(batch, maximize=True)
    for cost, result in zip(batch, results):
        check_against_scipy(cost, result, maximize=True)


@settings(max_examples=300, deadline=None)
@given(problem_batches(), st.sampled_from((np.float32, np.float64)))
def test_padded_batch_matches_list(batch, dtype):
    """A padded [N, R, C] array with NaN padding gives the list's answers (padding unread)."""
    max_rows = max(c.shape[0] for c in batch)
    max_cols = max(c.shape[1] for c in batch)
    padded = np.full((len(batch), max_rows + 1, max_cols + 2), np.nan, dtype=dtype)
    for i, cost in enumerate(batch):
        padded[i, :cost.shape[0], :cost.shape[1]] = cost
    sizes = [c.shape for c in batch]
    results = linear_sum_assignment_batch(padded, sizes=sizes)
    for i, result in enumerate(results):
        check_against_scipy(padded[i, :sizes[i][0], :sizes[i][1]], result)


def test_torch_tensors():
    """CPU tensors, contiguous or not, alone in a list or as a padded batch."""
    g = torch.Generator().manual_seed(0)
    mats = [torch.rand(100, 20, generator=g), torch.rand(30, 70, generator=g).double().t(),
            torch.rand(50, 60, generator=g, requires_grad=True)[::2, 1::3]]
    for cost, result in zip(mats, linear_sum_assignment_batch(mats)):
        check_against_scipy(cost.detach().numpy(), result)
    padded = torch.rand(3, 12, 9, generator=g)
    results = linear_sum_assignment_batch(padded, sizes=torch.tensor([[12, 9], [4, 9], [0, 3]]))
    check_against_scipy(padded[0].numpy(), results[0])
    check_against_scipy(padded[1, :4].numpy(), results[1])
    assert len(results[2][0]) == 0


def test_padded_without_sizes_uses_full_blocks():
    padded = np.random.default_rng(1).random((4, 7, 5))
    for cost, result in zip(padded, linear_sum_assignment_batch(padded)):
        check_against_scipy(cost, result)


def test_empty_inputs(backend):
    assert linear_sum_assignment_batch([]) == []
    assert linear_sum_assignment_batch(np.zeros((0, 3, 3)), sizes=np.zeros((0, 2), int)) == []
    for shape in [(0, 0), (0, 5), (5, 0)]:
        rows, cols = linear_sum_assignment_batch([np.zeros(shape)])[0]
        assert rows.dtype == cols.dtype == np.int64 and rows.shape == cols.shape == (0,)


def test_result_independent_of_thread_count():
    """Every problem is solved by one thread with the same arithmetic: 1 and 4 threads give
    identical arrays, also with many tied optima."""
    rng = np.random.default_rng(2)
    batch = [make_values(rng, tuple(rng.integers(1, 120, 2)), KINDS[i % len(KINDS)])
             for i in range(200)]
    one = linear_sum_assignment_batch(batch, num_threads=1)
    four = linear_sum_assignment_batch(batch, num_threads=4)
    for (r1, c1), (r4, c4) in zip(one, four):
        np.testing.assert_array_equal(r1, r4)
        np.testing.assert_array_equal(c1, c4)


def test_mask_former_shapes():
    """The matcher's case: B x 6 problems of 100 queries x M segments, M < Q and M = 0."""
    rng = np.random.default_rng(3)
    batch = [rng.random((100, m)).astype(np.float32) for m in (8, 20, 0, 50, 100, 1) * 16]
    for cost, result in zip(batch, linear_sum_assignment_batch(batch)):
        check_against_scipy(cost, result)


def bad_matrix(value, at=(1, 2), shape=(3, 4)):
    cost = np.random.default_rng(4).random(shape)
    cost[at] = value
    return cost


@pytest.mark.parametrize("cost, message", [
    (bad_matrix(np.nan), r"problem 1: NaN cost at \(1, 2\)"),
    (bad_matrix(np.inf), r"problem 1: non-finite cost inf at \(1, 2\)"),
    (bad_matrix(-np.inf), r"problem 1: non-finite cost -inf at \(1, 2\)"),
    (bad_matrix(np.inf, at=(2, slice(None))), r"problem 1: infeasible: row 2 has every cost inf"),
    (bad_matrix(np.inf, at=(slice(None), 3), shape=(5, 4)),
     r"problem 1: infeasible: column 3 has every cost inf"),
    (np.ones(3), r"problem 1: expected a 2-D cost matrix, got 1-D"),
    (np.ones((2, 2, 2)), r"problem 1: expected a 2-D cost matrix, got 3-D"),
    (np.ones((2, 2), dtype=np.int64), r"problem 1: unsupported dtype int64"),
    (np.ones((2, 2), dtype=bool), r"problem 1: unsupported dtype bool"),
    (np.ones((2, 2), dtype=np.complex128), r"problem 1: unsupported dtype complex128"),
    (np.ones((2, 2), dtype=np.float16), r"problem 1: unsupported dtype float16"),
    (np.ones((2, 2), dtype=">f8"), r"problem 1: unsupported dtype >f8"),
    (torch.ones(2, 2, dtype=torch.bfloat16), r"problem 1: unsupported dtype torch.bfloat16"),
    (torch.ones(2, 2, device="meta"), r"problem 1: tensor is on meta"),
    ([[1.0, 2.0], [3.0]], r"problem 1: cannot be read as an array"),
])
def test_bad_matrix_names_problem_and_fault(backend, cost, message):
    good = np.zeros((2, 3))
    with pytest.raises(ValueError, match=message):
        linear_sum_assignment_batch([good, cost, good])


def test_all_inf_row_is_not_infeasible_when_rows_exceed_cols(backend):
    """With more rows than columns a row may stay unassigned: the fault is the inf itself."""
    cost = bad_matrix(np.inf, at=(2, slice(None)), shape=(5, 4))
    with pytest.raises(ValueError, match=r"problem 0: non-finite cost inf at \(2, 0\)"):
        linear_sum_assignment_batch([cost])


def test_maximize_infeasible_is_all_minus_inf(backend):
    cost = bad_matrix(-np.inf, at=(0, slice(None)))
    with pytest.raises(ValueError, match=r"problem 0: infeasible: row 0 has every cost -inf"):
        linear_sum_assignment_batch([cost], maximize=True)


def test_first_bad_problem_is_reported(backend):
    batch = [np.zeros((2, 2)), bad_matrix(np.nan), bad_matrix(np.inf)]
    with pytest.raises(ValueError, match=r"problem 1: NaN"):
        linear_sum_assignment_batch(batch)


def test_padded_nan_in_used_block(backend):
    padded = np.zeros((3, 4, 4))
    padded[2, 1, 1] = np.nan
    padded[1, 3, 3] = np.nan  # padding of problem 1: ignored
    sizes = [(4, 4), (3, 3), (2, 2)]
    with pytest.raises(ValueError, match=r"problem 2: NaN cost at \(1, 1\)"):
        linear_sum_assignment_batch(padded, sizes=sizes)


@pytest.mark.parametrize("costs, sizes, message", [
    (np.zeros((2, 3, 3)), [(3, 3)], r"sizes must have shape \(2, 2\)"),
    (np.zeros((2, 3, 3)), [(3, 3), (4, 1)], r"problem 1: size \(4, 1\) does not fit"),
    (np.zeros((2, 3, 3)), [(3, 3), (1, -1)], r"problem 1: size \(1, -1\) does not fit"),
    (np.zeros((2, 3, 3)), [(3.0, 3.0), (1.5, 1.0)], r"sizes must hold integers"),
    (np.zeros((2, 3, 3), dtype=np.int32), None, r"costs: unsupported dtype int32"),
    (np.zeros((3, 3)), None, r"must be padded \[N, R, C\], got 2-D"),
    ([np.zeros((3, 3))], [(3, 3)], r"sizes is only for a padded"),
])
def test_bad_padded_input(backend, costs, sizes, message):
    with pytest.raises(ValueError, match=message):
        linear_sum_assignment_batch(costs, sizes=sizes)


@pytest.mark.parametrize("num_threads", [0, -1, 1.5, True])
def test_bad_num_threads(num_threads):
    with pytest.raises(ValueError, match="num_threads"):
        linear_sum_assignment_batch([np.zeros((2, 2))], num_threads=num_threads)


def test_scipy_fallback_warns_once_and_solves(monkeypatch):
    monkeypatch.setattr(assignment, "_native", None)
    monkeypatch.setattr(assignment, "_fallback_warned", False)
    rng = np.random.default_rng(5)
    batch = [rng.random((100, 20)), rng.random((7, 9)).astype(np.float32), np.zeros((0, 4))]
    with pytest.warns(RuntimeWarning, match="falls back to a scipy loop"):
        results = linear_sum_assignment_batch(batch)
    for cost, result in zip(batch, results):
        check_against_scipy(cost, result)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_sum_assignment_batch(batch, maximize=True)


# The thread pool (csrc/pool.h): persistent threads shared by every call, fork-safe, joined at
# exit; whatever a worker throws reaches Python as an error naming the problem.

def pool_batch(seed: int, count: int = 48) -> list[np.ndarray]:
    """Enough work that a call with num_threads=2 asks the pool for a helper."""
    rng = np.random.default_rng(seed)
    return [rng.random((100, 50)).astype(np.float32) for _ in range(count)]


def assert_same_results(got, expected) -> None:
    assert len(got) == len(expected)
    for (r1, c1), (r2, c2) in zip(got, expected):
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(c1, c2)


def test_pool_threads_are_reused_across_calls():
    native = assignment._native
    batch = pool_batch(10)
    expected = linear_sum_assignment_batch(batch, num_threads=1)
    assert_same_results(linear_sum_assignment_batch(batch, num_threads=2), expected)
    first = native._pool_stats()
    if (os.cpu_count() or 1) >= 2:
        assert first["threads"] >= 1
    for _ in range(20):
        assert_same_results(linear_sum_assignment_batch(batch, num_threads=2), expected)
    assert native._pool_stats() == first
    assert first["threads"] == first["started"] and not first["shut_down"]


def test_concurrent_calls_from_python_threads():
    """Callers in several Python threads share the pool; each gets its own answers, and one
    caller's error does not disturb the others."""
    batches = [pool_batch(20 + i) for i in range(4)]
    expected = [linear_sum_assignment_batch(b, num_threads=1) for b in batches]
    bad = [bad_matrix(np.nan)] * 3
    barrier = threading.Barrier(len(batches) + 1)

    def solve(i):
        barrier.wait()
        for _ in range(10):
            assert_same_results(linear_sum_assignment_batch(batches[i], num_threads=2),
                                expected[i])
        return i

    def fail():
        barrier.wait()
        for _ in range(10):
            with pytest.raises(ValueError, match="problem 0: NaN"):
                linear_sum_assignment_batch(bad, num_threads=2)

    with ThreadPoolExecutor(len(batches) + 1) as executor:
        futures = [executor.submit(solve, i) for i in range(len(batches))]
        futures.append(executor.submit(fail))
        for future in futures:
            future.result(timeout=120)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_starts_its_own_pool():
    """Forks while another thread keeps the pool busy (its lock may be held at that moment): each
    child must see a fresh pool and solve with threads of its own, not hang."""
    batch = pool_batch(30)
    expected = linear_sum_assignment_batch(batch, num_threads=1)
    stop = threading.Event()

    def keep_busy():
        while not stop.is_set():
            linear_sum_assignment_batch(batch, num_threads=2)

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        for _ in range(8):
            pid = os.fork()
            if pid == 0:  # the child: report through the exit status only
                code = 1
                try:
                    fresh = assignment._native._pool_stats()["started"] == 0
                    assert_same_results(linear_sum_assignment_batch(batch, num_threads=2),
                                        expected)
                    code = 0 if fresh else 2
                finally:
                    os._exit(code)
            assert wait_for_child(pid, timeout=60) == 0
    finally:
        stop.set()
        busy.join()


def wait_for_child(pid: int, timeout: float) -> int:
    """The exit status of child `pid`; kills it and fails the test if it runs past timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} hung (deadlock?)")


class SolvingDataset(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return [col for _, col in linear_sum_assignment_batch(self.batches[i], num_threads=2)]


def test_dataloader_workers_forked_after_use():
    """The DataLoader case: fork-started workers solve after the parent used the pool."""
    batches = [pool_batch(40 + i, count=24) for i in range(4)]
    expected = [linear_sum_assignment_batch(b, num_threads=2) for b in batches]
    loader = torch.utils.data.DataLoader(SolvingDataset(batches), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=60)
    for cols, exp in zip(loader, expected):
        for col, (_, exp_col) in zip(cols, exp):
            np.testing.assert_array_equal(np.asarray(col), exp_col)


@pytest.fixture
def inject_failure():
    """The extension's test hook: solving problem `index` throws `kind`; disarmed afterwards."""
    native = assignment._native
    yield native._inject_failure
    native._inject_failure(-1, "none")


@pytest.mark.parametrize("kind, error, message", [
    ("std_exception", RuntimeError, r"^problem 37: solver failed: injected failure$"),
    ("unknown", RuntimeError, r"^problem 37: solver failed: unknown exception$"),
    ("bad_alloc", MemoryError, r"^problem 37: out of memory while solving$"),
])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_worker_exception_becomes_python_error(inject_failure, kind, error, message, num_threads):
    batch = pool_batch(50)
    expected = linear_sum_assignment_batch(batch, num_threads=1)
    inject_failure(37, kind)
    with pytest.raises(error, match=message):
        linear_sum_assignment_batch(batch, num_threads=num_threads)
    padded = np.stack(batch)
    with pytest.raises(error, match=message):
        linear_sum_assignment_batch(padded, num_threads=num_threads)
    inject_failure(-1, "none")
    assert_same_results(linear_sum_assignment_batch(batch, num_threads=num_threads), expected)


def test_injected_failure_kind_is_checked(inject_failure):
    with pytest.raises(ValueError, match="unknown failure kind 'segfault'"):
        inject_failure(0, "segfault")


POOL_AT_EXIT = """
import atexit, importlib.util, os, sys
import numpy as np
spec = importlib.util.spec_from_file_location("fastmaskformer._C", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
batch = [np.random.default_rng(0).random((100, 50)) for _ in range(48)]
native.solve_list(batch, False, 1)
assert native._pool_stats()["started"] == 0  # one thread: the pool starts none
# Enough work for several threads: the pool holds no more than one per other logical CPU.
pairs, _ = native.solve_list(batch, False, 64)
started = native._pool_stats()["started"]
cpus = os.cpu_count()
assert (started == 0) if cpus == 1 else (1 <= started <= cpus - 1), (started, cpus)
atexit._run_exitfuncs()  # what interpreter exit runs: joins the pool threads
stats = native._pool_stats()
assert stats["threads"] == 0 and stats["shut_down"], stats
again, _ = native.solve_list(batch, False, 2)  # still answers, on the calling thread
assert all((a[1] == b[1]).all() for a, b in zip(pairs, again))
print("ok")
"""


def test_pool_size_and_exit():
    """A fresh interpreter (no torch: quick): the pool starts threads only when a call wants
    helpers, within the machine's CPUs; the atexit hook joins them, and the process exits."""
    done = subprocess.run([sys.executable, "-c", POOL_AT_EXIT, assignment._native.__file__],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
