"""Batched exact linear sum assignment: the matcher's Hungarian solve (DESIGN 3 and 7).

``linear_sum_assignment_batch`` solves many small problems in one call: the C++ extension
``fastmaskformer._C`` (``csrc/``) runs a shortest-augmenting-path solver of the Jonker-Volgenant
family with the GIL released, on the calling thread and helpers from a persistent thread pool.
The pool starts its threads when a call first needs them (at most one per logical CPU besides
the caller), shares them between calls and between Python threads calling at once, starts afresh
in a child made by ``fork`` (DataLoader workers), and joins them at interpreter exit. Each
problem gives the same minimum total cost as ``scipy.optimize.linear_sum_assignment`` and the
same output convention. When costs tie, both are optimal but may pick different assignments.

If the extension is missing (the build failed), the same function loops over scipy and warns
once. Tests force that path with ``monkeypatch.setattr(assignment, "_native", None)``.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch

try:
    from .. import _C as _native
except ImportError:  # extension not built: scipy fallback, see _warn_fallback
    _native = None
if not hasattr(_native, "solve_list"):  # None, or a stale build of another version
    _native = None

_fallback_warned = False
_MAX_THREADS = 1024  # the extension takes a C int; more threads than this never help
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

Assignment = tuple[np.ndarray, np.ndarray]


def linear_sum_assignment_batch(costs, sizes=None, maximize: bool = False,
                                num_threads: int | None = None) -> list[Assignment]:
    """Solve a batch of rectangular linear sum assignment problems exactly.

    Args:
        costs: either a sequence of N cost matrices, each 2-D ``[rows_i, cols_i]`` (numpy arrays
            or CPU torch tensors, float32 or float64, any strides, rows_i or cols_i may be 0),
            or one padded array/tensor ``[N, R, C]``.
        sizes: only with padded ``costs``: ``[N, 2]`` integers, problem i is the top-left
            ``sizes[i][0] x sizes[i][1]`` block of ``costs[i]``; the padding is never read and
            may hold anything (NaN included). Default: every problem is the full ``R x C``.
        maximize: maximise the total cost instead, like scipy's flag.
        num_threads: at most this many threads, the calling one included (default: the cores
            this process may run on; never more than the machine's logical CPUs). Small batches
            use fewer, since handing work to a thread costs more than it saves. The result does
            not depend on the number of threads.

    Returns:
        N pairs ``(row_ind, col_ind)`` of int64 arrays of length ``min(rows_i, cols_i)``, as
        ``scipy.optimize.linear_sum_assignment`` returns them: ``row_ind`` ascending and
        ``costs[i][row_ind, col_ind].sum()`` minimal (maximal with ``maximize=True``).

    Raises:
        ValueError: naming the problem index and the fault, for a matrix that is not 2-D, a
            dtype other than float32/float64, NaN or infinite costs (an all-``+inf`` row or
            column that must be assigned is reported as infeasible), ``sizes`` that do not fit
            the padded array, or a tensor that is not on the CPU.
        MemoryError, RuntimeError: naming the problem index, when solving it ran out of memory
            or failed otherwise inside the extension.
    """
    threads = _resolve_threads(num_threads)
    maximize = bool(maximize)
    if _is_array_like(costs):
        return _solve_padded(_to_numpy(costs, "costs"), sizes, maximize, threads)
    if sizes is not None:
        raise ValueError("sizes is only for a padded [N, R, C] array; got a sequence of matrices")
    matrices = [c if type(c) is np.ndarray else _to_numpy(c, f"problem {i}")
                for i, c in enumerate(costs)]
    if _native is None:
        return _solve_with_scipy(matrices, maximize)
    pairs, bad = _native.solve_list(matrices, maximize, threads)
    if bad >= 0:
        raise ValueError(_describe_non_finite(bad, matrices[bad], maximize))
    return pairs


def _solve_padded(padded: np.ndarray, sizes, maximize: bool, threads: int) -> list[Assignment]:
    """padded: [N, R, C]; sizes: None or [N, 2] (rows, cols) per problem."""
    if padded.ndim != 3:
        raise ValueError(
            f"costs as one array must be padded [N, R, C], got {padded.ndim}-D; pass a list of "
            "2-D matrices instead")
    if padded.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"costs: unsupported dtype {padded.dtype}; costs must be float32 or "
                         "float64 in native byte order")
    sizes = _check_sizes(sizes, padded.shape)
    if _native is None:
        return _solve_with_scipy([padded[i, :r, :c] for i, (r, c) in enumerate(sizes)], maximize)
    pairs, bad = _native.solve_padded(padded, sizes, maximize, threads)
    if bad >= 0:
        rows, cols = sizes[bad]
        raise ValueError(_describe_non_finite(bad, padded[bad, :rows, :cols], maximize))
    return pairs


def _check_sizes(sizes, shape: tuple[int, int, int]) -> np.ndarray:
    """Returns sizes as a C-contiguous int64 [N, 2] array that fits ``shape`` = (N, R, C)."""
    n, max_rows, max_cols = shape
    if sizes is None:
        return np.tile(np.array([max_rows, max_cols], dtype=np.int64), (n, 1))
    raw = np.asarray(sizes)
    if raw.size == 0 and n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if raw.dtype.kind not in "iu":
        raise ValueError(f"sizes must hold integers, got dtype {raw.dtype}")
    if raw.shape != (n, 2):
        raise ValueError(f"sizes must have shape ({n}, 2) for padded costs of shape {shape}, "
                         f"got {raw.shape}")
    bad = (raw < 0).any(axis=1) | (raw[:, 0] > max_rows) | (raw[:, 1] > max_cols)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"problem {i}: size {tuple(int(s) for s in raw[i])} does not fit the "
                         f"padded block ({max_rows}, {max_cols})")
    return np.ascontiguousarray(raw, dtype=np.int64)


def _is_array_like(x) -> bool:
    return isinstance(x, np.ndarray) or _is_tensor(x)


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _to_numpy(x, what: str) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy) or np.asarray of anything else."""
    if _is_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"{what}: tensor is on {x.device}; copy all costs to the CPU in one "
                             "transfer before solving")
        try:
            return x.detach().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError) as exc:  # e.g. bfloat16 has no numpy dtype
            raise ValueError(f"{what}: unsupported dtype {x.dtype}; costs must be float32 or "
                             f"float64 ({exc})") from None
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise ValueError(f"{what}: cannot be read as an array ({exc})") from None


def _resolve_threads(num_threads: int | None) -> int:
    if num_threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) \
            or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    return min(int(num_threads), _MAX_THREADS)


def _describe_non_finite(index: int, cost: np.ndarray, maximize: bool) -> str:
    """The error message for problem ``index`` whose 2-D ``cost`` has a non-finite entry."""
    nan = np.isnan(cost)
    if nan.any():
        r, c = np.argwhere(nan)[0]
        return f"problem {index}: NaN cost at ({r}, {c})"
    # A row or column that every solution must use, with nothing but forbidden costs in it.
    forbidden = -np.inf if maximize else np.inf
    blocked = cost == forbidden
    rows, cols = cost.shape
    for axis, name, must_assign in ((1, "row", rows <= cols), (0, "column", cols <= rows)):
        full = blocked.all(axis=axis)
        if must_assign and full.any():
            return (f"problem {index}: infeasible: {name} {int(np.argmax(full))} has every "
                    f"cost {forbidden}")
    r, c = np.argwhere(~np.isfinite(cost))[0]
    return f"problem {index}: non-finite cost {cost[r, c]} at ({r}, {c}); costs must be finite"


def _check_matrix(index: int, cost: np.ndarray) -> None:
    """The checks fastmaskformer._C makes while reading its input, with the same messages."""
    if cost.ndim != 2:
        raise ValueError(f"problem {index}: expected a 2-D cost matrix, got {cost.ndim}-D")
    if cost.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"problem {index}: unsupported dtype {cost.dtype}; costs must be "
                         "float32 or float64 in native byte order")


def _solve_with_scipy(matrices: Sequence[np.ndarray], maximize: bool) -> list[Assignment]:
    """Fallback without the extension: the same checks, then a scipy loop."""
    from scipy.optimize import linear_sum_assignment

    _warn_fallback()
    for i, cost in enumerate(matrices):
        _check_matrix(i, cost)
    for i, cost in enumerate(matrices):
        if not np.isfinite(cost).all():
            raise ValueError(_describe_non_finite(i, cost, maximize))
    results = []
    for cost in matrices:
        rows, cols = linear_sum_assignment(cost, maximize=maximize)
        results.append((rows.astype(np.int64), cols.astype(np.int64)))
    return results


def _warn_fallback() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn("fastmaskformer._C is not built: linear_sum_assignment_batch falls back to "
                      "a scipy loop (slower)", RuntimeWarning, stacklevel=4)


def check_matching_costs(costs: np.ndarray, widths: np.ndarray, batch: int) -> None:
    """ValueError naming the layer and image of the first of the matcher's layer-major [L*B]
    problems (``costs[n, :, :widths[n]]``) with a NaN or infinite cost."""
    for n, m in enumerate(widths):
        block = costs[n, :, :m]
        if not np.isfinite(block).all():
            kind = "NaN" if np.isnan(block).any() else "infinite"
            raise ValueError(f"matching cost of layer {n // batch}, image {n % batch} has {kind} entries "
                             "(non-finite model outputs? check the loss scale / learning rate)")


# ---------------------------------------------------------------------------- operator
@torch.library.custom_op("fastmaskformer::linear_sum_assignment", mutates_args=())
def linear_sum_assignment_padded(costs: torch.Tensor, num_cols: torch.Tensor, maximize: bool = False,
                                 batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched solver as an operator (``torch.compile`` / ``torch.export`` see one opaque
    node; its device->host copy of the costs is the only host sync of a training step).

    costs: [N, R, C] float32/float64 on any device; num_cols: int64 [N], problem n is the
    ``R x num_cols[n]`` block of costs[n]. Returns row_ind, col_ind: int64 [N, min(R, C)] on the
    costs' device, scipy's pairs left-aligned and padded with -1. ValueError on NaN/inf costs,
    naming the problem, or with ``batch`` > 0 (problems are layer-major [L*B]) its layer and image.
    """
    n, rows, cols = costs.shape
    host = costs.detach().cpu().numpy()
    widths = num_cols.detach().cpu().to(torch.int64)
    sizes = torch.stack([torch.full_like(widths, rows), widths], 1).numpy()
    if batch > 0:
        check_matching_costs(host, sizes[:, 1], batch)
    solved = linear_sum_assignment_batch(host, sizes=sizes, maximize=maximize)
    out = torch.full((2, n, min(rows, cols)), -1, dtype=torch.int64)
    for i, (r, c) in enumerate(solved):
        out[0, i, :len(r)] = torch.from_numpy(r)
        out[1, i, :len(c)] = torch.from_numpy(c)
    out = out.to(costs.device)
    return out[0].clone(), out[1].clone()


@linear_sum_assignment_padded.register_fake
def _(costs, num_cols, maximize=False, batch=0):
    n, rows, cols = costs.shape
    shape = (n, min(rows, cols))
    return costs.new_empty(shape, dtype=torch.int64), costs.new_empty(shape, dtype=torch.int64)
