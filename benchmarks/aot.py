"""GPU readiness without a GPU: compile every kernel launch for H100 / A100 ahead of time.

The real launchers run on CPU tensors of the benchmark sizes (DESIGN 7) while ``kernel[grid]``
is intercepted: each launch is recorded with its arguments instead of running. Every recorded
launch is then compiled, for every config its autotuner can choose (after the autotuner's own
pruning), with Triton's full pipeline and the ptxas bundled in the wheel for
``GPUTarget("cuda", arch, 32)`` - no driver needed. The argument specialisation (16-divisible
ints and pointers, ints equal to 1, dtypes, constexprs) is Triton's own binder applied to the
launcher's real arguments, so the code compiled here is the code a device would run.

Per compile: registers, spill bytes, shared memory, occupancy, how each tl.dot is lowered
(wgmma / mma.sync = tensor cores, or FMA), grid size and waves. A compile fails the check when
it cannot launch (shared memory over the per-block limit, compile error) or spills more than
``--max-spill`` bytes per thread.

    python benchmarks/aot.py                      # main cases, sm_90 and sm_80
    python benchmarks/aot.py --all --jobs 2       # every case
    python benchmarks/aot.py --only semantic --json out.json

Run it without TRITON_INTERPRET (the kernel modules pick their GPU autotune configs at import).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the workloads import nothing from here: no import circle
    from aot_cases import Case

ARCHS = {
    90: dict(name="H100 (sm_90a)", sms=132, smem_per_block=232448, smem_per_sm=233472),
    80: dict(name="A100 (sm_80)", sms=108, smem_per_block=166912, smem_per_sm=167936),
}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, RESERVED_SMEM = 65536, 64, 32, 1024
MAX_SPILL = 256  # bytes of spill stores per thread


@dataclasses.dataclass
class Launch:
    case: str
    kernel: str  # module.function
    fn: object  # Autotuner or JITFunction
    args: tuple
    kwargs: dict
    grid: object


# ---------------------------------------------------------------------------- recording
class TensorArg:
    """What Triton's binder reads of a tensor argument (its dtype and the 16-byte alignment of its
    address), kept instead of the tensor so recorded launches hold no memory."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._ptr = 0x10000 if tensor.data_ptr() % 16 == 0 else 0x10008

    def data_ptr(self) -> int:
        return self._ptr


def _stand_in(value):
    import torch

    return TensorArg(value) if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def recording(case: str, launches: list):
    """Within the block, ``kernel[grid](...)`` records a Launch instead of running."""
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def record(self, grid):
        def launch(*args, **kwargs):
            jit = _jit_of(self)
            name = f"{jit.module.rsplit('.', 1)[-1]}.{jit.__name__}"
            launches.append(Launch(case, name, self, tuple(map(_stand_in, args)),
                                   {k: _stand_in(v) for k, v in kwargs.items()}, grid))
        return launch

    KernelInterface.__getitem__ = record
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


def launched_kernels() -> set[str]:
    """module.function of every kernel a launcher can start (autotuned, or @jit named *kernel)."""
    import importlib
    import pkgutil

    import triton
    from triton.runtime.autotuner import Autotuner

    from fastmaskformer import kernels

    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"fastmaskformer.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner) and obj.fn.module == mod.__name__:
                found.add(f"{info.name}.{name}")
            elif (isinstance(obj, triton.runtime.JITFunction) and name.endswith("kernel")
                  and obj.module == mod.__name__):
                found.add(f"{info.name}.{name}")
    return found


def configs_of(launch: Launch) -> list[tuple[dict, dict, str]]:
    """[(constexpr kwargs, options, label)] the launch can run with: its autotuner's configs
    after the autotuner's own pruning, or the launch's own options for a plain @jit kernel."""
    from triton.runtime.autotuner import Autotuner

    fn = launch.fn
    if isinstance(fn, Autotuner):
        fn.nargs = dict(zip(fn.arg_names, launch.args))
        out = []
        for c in fn.prune_configs(dict(launch.kwargs)):
            opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
            if getattr(c, "maxnreg", None):
                opts["maxnreg"] = c.maxnreg
            label = " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"
            out.append((dict(c.kwargs), opts, label))
        return out
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    opts.setdefault("num_warps", 4)
    opts.setdefault("num_stages", 3)
    return [({}, opts, f"w{opts['num_warps']} s{opts['num_stages']}")]


# ---------------------------------------------------------------------------- compiling
def _jit_of(fn):
    """The JITFunction under autotuning / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _bind(launch: Launch, cfg_kwargs: dict, opts: dict, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit_of(launch.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")}
    kwargs.update(cfg_kwargs)
    kwargs.update(opts)
    bound, spec, options = binder(*launch.args, **kwargs)
    return jit, target, backend, kwargs, bound, spec, options


def specialization_key(launch: Launch, cfg_kwargs: dict, opts: dict) -> str:
    """What decides the compiled code: kernel, argument specialisation and config."""
    spec = _bind(launch, cfg_kwargs, opts, 90)[5]  # every constexpr's value included
    return repr((launch.kernel, spec, sorted(opts.items())))


def _dot_lowering(ttir: str, ptx: str) -> str:
    dots = len(re.findall(r"\btt\.dot\b", ttir))
    if not dots:
        return "-"
    kinds = []
    wgmma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.(\w+)\.\w+", ptx)
    if wgmma:
        kinds.append(f"wgmma.{'/'.join(sorted(set(wgmma)))}")
    mma = re.findall(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.\w+\.(\w+)\.\w+\.\w+", ptx)
    if mma:
        kinds.append(f"mma.{'/'.join(sorted(set(mma)))}")
    return f"{dots} dot: " + (" + ".join(kinds) if kinds else "FMA (no tensor cores)")


def _occupancy(arch: int, regs: int, smem: int, warps: int) -> float:
    """Fraction of the SM's 64 warps resident (CUDA occupancy rules)."""
    hw = ARCHS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    blocks = min(REGS_PER_SM // regs_per_warp // warps, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM,
                 hw["smem_per_sm"] // (math.ceil((smem + RESERVED_SMEM) / 128) * 128) if smem else MAX_BLOCKS_PER_SM)
    return blocks * warps / MAX_WARPS_PER_SM


def compile_one(launch: Launch, cfg_kwargs: dict, opts: dict, label: str, arch: int) -> dict:
    """Compile one (launch, config) for ``arch``; returns the report row."""
    import triton
    from triton import knobs
    from triton.compiler.compiler import ASTSource

    row = dict(case=launch.case, kernel=launch.kernel, config=label, arch=arch, ok=False, error=None)
    start = time.time()
    try:
        jit, target, backend, kwargs, bound, spec, options = _bind(launch, cfg_kwargs, opts, arch)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        row["regs"] = int(regs.group(1)) if regs else None
        row["spill_store"], row["spill_load"] = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
        row["smem"] = compiled.metadata.shared
        row["warps"] = compiled.metadata.num_warps
        row["stages"] = compiled.metadata.num_stages
        row["dot"] = _dot_lowering(compiled.asm["ttir"], compiled.asm["ptx"])
        row["occupancy"] = _occupancy(arch, row["regs"] or 0, row["smem"], row["warps"])
        grid = launch.grid(dict(bound, **cfg_kwargs)) if callable(launch.grid) else launch.grid
        row["programs"] = math.prod(grid)
        per_wave = max(1, int(row["occupancy"] * MAX_WARPS_PER_SM) // row["warps"]) * ARCHS[arch]["sms"]
        row["waves"] = row["programs"] / per_wave
        limit = ARCHS[arch]["smem_per_block"]
        if row["smem"] > limit:
            row["error"] = f"shared memory {row['smem']} B > {limit} B per block: cannot launch"
        elif row["spill_store"] > MAX_SPILL:
            row["error"] = f"spills {row['spill_store']} B per thread (> {MAX_SPILL})"
        else:
            row["ok"] = True
    except Exception as exc:  # noqa: BLE001 - a compile error is a result to report
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    row["seconds"] = round(time.time() - start, 1)
    return row


# ---------------------------------------------------------------------------- workloads
def cases() -> list[Case]:
    """Representative launches at the benchmark sizes (DESIGN 7): training B=16, 512x512 crops,
    Q=100, C=256, 6 layers, M in {8, 16, 32}, K in {150, 847}; inference 512x683 outputs of a
    512x704 input, Q in {100, 200}, multi-scale + flip TTA."""
    import aot_cases

    return aot_cases.cases()


def record_all(selected: list[Case]) -> list[Launch]:
    from fastmaskformer.kernels.common import assume_multiprocessors

    launches: list[Launch] = []
    with assume_multiprocessors(ARCHS[90]["sms"]):
        for case in selected:
            with recording(case.name, launches):
                case.run()
    return launches


_JOBS: list = []  # what forked compile workers read (launches hold unpicklable autotuners)


def _compile_job(index: int) -> dict:
    return compile_one(*_JOBS[index])


def check(selected: list[Case], archs, jobs: int = 1, on_row=None) -> tuple[list[dict], set[str]]:
    """Record the cases' launches, compile each distinct (specialisation, config) for each arch.
    Returns (rows, kernels no case launched)."""
    launches = record_all(selected)
    todo, seen = [], set()
    for launch in launches:
        for cfg_kwargs, opts, label in configs_of(launch):
            key = specialization_key(launch, cfg_kwargs, opts)
            if key in seen:
                continue
            seen.add(key)
            todo += [(launch, cfg_kwargs, opts, label, arch) for arch in archs]
    _JOBS[:] = todo
    rows = []
    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for row in pool.imap(_compile_job, range(len(todo))):
                rows.append(row)
                on_row and on_row(row)
    else:
        for index in range(len(todo)):
            rows.append(_compile_job(index))
            on_row and on_row(rows[-1])
    return rows, launched_kernels() - {launch.kernel for launch in launches}


def format_row(r: dict) -> str:
    head = f"{r['kernel']:<34} {r['case']:<44} {r['config']:<40} sm{r['arch']}"
    if r.get("regs") is None:
        return f"{head} FAIL {r['error']}"
    status = "ok" if r["ok"] else "FAIL"
    return (f"{head} {status:<4} {r['regs']:>3} regs  spill {r['spill_store']:>4}/{r['spill_load']:<4} "
            f"smem {r['smem'] / 1024:>6.1f}K  occ {r['occupancy'] * 100:>3.0f}%  "
            f"{r['programs']:>6} prog {r['waves']:>6.2f} waves  {r['dot']}"
            + (f"  <- {r['error']}" if r["error"] else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    parser.add_argument("--all", action="store_true", help="every case, not only the main ones")
    parser.add_argument("--only", default=None, help="substring of the case names to run")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the kernels would be imported with the interpreter's configs")
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fmf_aot_"))  # ptxas always runs

    selected = [c for c in cases() if (args.all or c.main) and (args.only is None or args.only in c.name)]
    rows, uncovered = check(selected, args.arch, args.jobs, on_row=lambda r: print(format_row(r), flush=True))
    failed = [r for r in rows if not r["ok"]]
    print(f"\n# {len(rows)} compiles: {len(rows) - len(failed)} ok, {len(failed)} failed"
          + (f"; kernels without a case: {sorted(uncovered)}" if uncovered and args.only is None else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "uncovered": sorted(uncovered)}, f, indent=1)
    return 1 if failed or (uncovered and args.only is None) else 0


if __name__ == "__main__":
    sys.exit(main())
