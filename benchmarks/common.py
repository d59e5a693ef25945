"""Shared benchmark plumbing: timing (median after warm-up), peak memory, device facts,
measured roofline, and result files (JSON + Markdown).

Every benchmark runs its providers side by side in one process; a time is only reported next
to its baseline.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Iterable

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def track_cpu_memory() -> None:
    """On Linux, re-execute this script with glibc's mmap threshold fixed at 128 KiB (once): every
    large tensor is then its own mapping, returned to the OS when freed, so the resident set
    follows the live tensors and :func:`measure` can report a CPU peak from the kernel's ``VmHWM``.
    Call it first thing in ``main`` of a CPU benchmark."""
    if platform.system() == "Linux" and _MMAP_THRESHOLD not in os.environ:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, _MMAP_THRESHOLD: "131072"})


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_cpu_peak() -> float | None:
    """Reset the kernel's peak-RSS counter; the RSS now (MiB), or None where peaks cannot be
    measured (not Linux, or the process was not started by :func:`track_cpu_memory`)."""
    if _MMAP_THRESHOLD not in os.environ:
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return status_mib("VmRSS")


def measure(fn: Callable[[], object], device, warmup: int = 2, repeats: int = 5) -> dict:
    """Median / p20 / p80 wall time in ms over ``repeats`` calls after ``warmup`` calls, and the
    peak memory above what was held before the first timed call (MiB): on CUDA the allocator's
    peak, on the CPU the peak resident set (only under :func:`track_cpu_memory`)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    cpu_base = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        cpu_base = _reset_cpu_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    result = {
        "median_ms": statistics.median(times),
        "p20_ms": _quantile(times, 0.2),
        "p80_ms": _quantile(times, 0.8),
        "repeats": repeats,
    }
    if device.type == "cuda":
        result["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif cpu_base is not None:
        result["peak_mem_mib"] = status_mib("VmHWM") - cpu_base
    return result


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def device_facts(device) -> dict:
    """Name, memory, clocks and driver (nvidia-ml-py) of a CUDA device; CPU facts otherwise."""
    device = torch.device(device)
    facts = {"torch": torch.__version__, "python": platform.python_version()}
    if device.type != "cuda":
        facts.update(name=platform.processor() or platform.machine(), kind="cpu",
                     cores=len(os.sched_getaffinity(0)), torch_threads=torch.get_num_threads())
        return facts
    props = torch.cuda.get_device_properties(device)
    facts.update(name=props.name, kind="cuda", total_memory_gib=props.total_memory / 2**30,
                 sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        facts.update(
            driver=_text(pynvml.nvmlSystemGetDriverVersion()),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            power_limit_w=pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
        )
        pynvml.nvmlShutdown()
    except Exception as exc:  # facts are best effort; the timings still stand
        facts["nvml_error"] = str(exc)
    return facts


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def measure_roofline(device, size_mib: int = 256, n: int = 4096) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and matmul rates (TFLOP/s) on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        size_mib, n = 64, 1024
    src = torch.empty(size_mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), device, warmup=2, repeats=10)["median_ms"]
    roof = {"copy_gbps": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9}
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda":
        dtypes.update(tf32=torch.float32, bf16=torch.bfloat16)
    for label, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = label == "tf32"
        try:
            ms = measure(lambda: a @ b, device, warmup=2, repeats=10)["median_ms"]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        roof[f"matmul_{label}_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    return roof


def markdown_table(rows: Iterable[dict], columns: list[str]) -> str:
    rows = list(rows)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_path(name: str, device, out_dir=None) -> pathlib.Path:
    """``benchmarks/results/<device>-<name>-<date>.json``."""
    device = torch.device(device)
    tag = "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    out = pathlib.Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{tag}-{name}-{_dt.date.today().isoformat()}.json"


def write_results(path, rows: list[dict], device, columns: list[str], extra: dict | None = None) -> str:
    """Write JSON (rows + device facts + roofline) and return the Markdown table."""
    path = pathlib.Path(path)
    table = markdown_table(rows, columns)
    payload = {"device": device_facts(device), "date": _dt.datetime.now().isoformat(timespec="seconds"),
               "rows": rows, "table": table, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=float))
    path.with_suffix(".md").write_text(table + "\n")
    return table


def compare_to_baseline(row: dict, rows: list[dict], keys: tuple[str, ...], baseline: str = "eager") -> None:
    """Add ``speedup_vs_<baseline>`` (and ``mem_ratio_vs_<baseline>`` where peak memory was
    measured) to ``row``, from the row of the ``baseline`` provider with the same ``keys``."""
    base = next(r for r in rows if r["provider"] == baseline and all(r[k] == row[k] for k in keys))
    row[f"speedup_vs_{baseline}"] = base["median_ms"] / row["median_ms"]
    if "peak_mem_mib" in row and "peak_mem_mib" in base:
        row[f"mem_ratio_vs_{baseline}"] = base["peak_mem_mib"] / max(row["peak_mem_mib"], 1e-3)


def report(path, rows: list[dict], device, columns: list[str], extra: dict | None = None) -> None:
    """``write_results`` and print the table and where it went."""
    print(write_results(path, rows, device, columns, extra))
    print("wrote", path)
