"""Run the whole benchmark suite (or parts) and write one report.

    python benchmarks/run_all.py --device cuda            # the GPU run: one 10-minute device call
    python benchmarks/run_all.py --device cpu --quick     # small sizes on a CPU
    python benchmarks/run_all.py --only solver train_step

Each part is its own script (``bench_<part>.py``), run in a subprocess so one part's failure
or memory cannot spoil another; each writes JSON. This script merges them into
``benchmarks/results/<device>-<date>.json``, a Markdown report beside it, and PNG plots of
time and peak memory against K / resolution / batch for each provider.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS_DIR, device_facts, markdown_table, measure_roofline  # noqa: E402
from roofline import predicted  # noqa: E402

# part -> (script, arguments for the GPU run, arguments for --quick / CPU runs), in priority
# order: with a time budget, the end-to-end bar is measured first.
PARTS = {
    "train_step": ("bench_train_step.py", ["--batch", "16", "--size", "512", "--steps", "50"],
                   ["--batch", "2", "--size", "128", "--steps", "3", "--repeats", "3", "--amp", "fp32"]),
    # issue 26: the deformable attention (with the official extension where $FASTMASKFORMER_OFFICIAL_MSDA
    # names it) and the Mask2Former step (one GPU of the official run) next
    "ms_deform_attn": ("bench_ms_deform_attn.py", [], ["--quick"]),
    "train_step_mask2former": ("bench_train_step.py", ["--arch", "mask2former", "--batch", "2", "--size", "512",
                                                       "--providers", "eager", "batched", "fused", "transformers",
                                                       "--steps", "20"],
                               ["--arch", "mask2former", "--batch", "2", "--size", "128", "--amp", "fp32", "--steps", "0",
                                "--repeats", "3", "--providers", "eager", "batched", "transformers"]),
    "train_step_847": ("bench_train_step.py", ["--batch", "16", "--size", "512", "--classes", "847", "--amp", "fp32",
                                               "--providers", "eager", "fused", "--steps", "0", "--headroom"],
                       ["--batch", "2", "--size", "128", "--classes", "847", "--amp", "fp32", "--providers", "eager",
                        "batched", "--steps", "0", "--repeats", "3"]),
    "matching_cost": ("bench_matching_cost.py", ["--quick"], ["--quick"]),
    "mask_loss": ("bench_mask_loss.py", ["--quick"], ["--quick"]),
    "point_loss": ("bench_point_loss.py", [], ["--no-compile"]),
    "semantic_inference": ("bench_semantic_inference.py", ["--quick"], ["--quick"]),
    "panoptic_inference": ("bench_panoptic_inference.py", ["--quick"], ["--quick"]),
    "inference_e2e": ("bench_inference_e2e.py", ["--batch", "16", "--size", "512"],
                      ["--batch", "1", "--size", "128", "--classes", "150", "--repeats", "3"]),
    "solver": ("bench_assignment.py", ["--repeats", "7"], ["--repeats", "3"]),
    "evaluation": ("bench_evaluation.py", ["--semantic-images", "2000", "--panoptic-images", "100"],
                   ["--semantic-images", "200", "--panoptic-images", "20", "--coco-val-images", "0"]),
    "train_step_swin": ("bench_train_step.py", ["--preset", "ade20k-150-swin-t", "--batch", "16", "--size", "512",
                                                "--amp", "bf16", "--providers", "eager", "fused", "--steps", "0"],
                        ["--preset", "ade20k-150-swin-t", "--batch", "1", "--size", "128", "--amp", "fp32",
                         "--providers", "eager", "batched", "--steps", "0", "--repeats", "2"]),
}
CPU_ONLY = {"solver"}  # scripts that take no --device
X_KEYS = ("K", "size", "batch", "M", "H", "out")
SERIES_KEYS = ("provider", "impl")
CONFIG_KEYS = ("output", "phase", "precision", "task", "backbone")


def run_part(name: str, device: str, quick: bool, workdir: pathlib.Path, timeout: float) -> dict:
    script, full_args, quick_args = PARTS[name]
    path = HERE / script
    if not path.exists():
        return {"error": f"{script} not found"}
    out = workdir / f"{name}.json"
    args = quick_args if quick or device == "cpu" else full_args
    cmd = [sys.executable, str(path), "--json", str(out), *args]
    if name not in CPU_ONLY:
        cmd += ["--device", device]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "error": f"stopped after {timeout:.0f} s (time budget)"}
    result = {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - start, "returncode": proc.returncode}
    if proc.returncode != 0 or not out.exists():
        result["error"] = proc.stderr[-2000:]
        return result
    result.update(json.loads(out.read_text()))
    return result


# part -> (precision of the plain "fused" provider, keys a row shares with its roofline row)
ROOFLINE_PARTS = {
    "matching_cost": ("tf32", ("batch", "M", "K")),
    "mask_loss": ("ieee", ("batch", "M")),
    "point_loss": ("ieee", ("batch", "M")),
    "semantic_inference": ("tf32", ("batch", "K")),
    "ms_deform_attn": ("deterministic", ("batch", "size", "phase", "dtype")),  # suffix: the variant
}


def versus_roofline(parts: dict, device_name: str) -> list[dict]:
    """Fused rows beside the committed roofline (benchmarks/roofline.py): measured / lower bound
    and measured / predicted speed-up over eager."""
    out = []
    for part, (default, keys) in ROOFLINE_PARTS.items():
        rows = parts.get(part, {}).get("rows", [])
        for row in rows:
            provider = row.get("provider", "")
            if not provider.startswith("fused") or row.get("phase", "fwd+bwd") != "fwd+bwd":
                continue
            if part == "semantic_inference" and row.get("output") != "512x683":
                continue
            precision = provider.split("-", 1)[1] if "-" in provider else default
            suffix_key = "variant" if part == "ms_deform_attn" else "precision"
            model = predicted(part, device_name, **{suffix_key: precision}, **{k: row.get(k) for k in keys})
            if model is None:
                continue
            eager = next((r for r in rows if r.get("provider") == "eager" and r.get("phase") == row.get("phase")
                          and all(r.get(k) == row.get(k) for k in keys + ("output",))), None)
            out.append({"part": part, "provider": provider, **{k: row.get(k) for k in keys},
                        "measured_ms": row["median_ms"], "bound_ms": model["fused_ms"],
                        "pct_of_roofline": 100 * model["fused_ms"] / row["median_ms"],
                        "speedup_measured": eager["median_ms"] / row["median_ms"] if eager else None,
                        "speedup_predicted": model["speedup"], "model": model["hardware"]})
    return out


def plot_part(name: str, rows: list[dict], out_prefix: pathlib.Path) -> list[str]:
    """One PNG per (x key, metric) that the rows vary over: lines per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    # a line per combination of the configuration keys that vary (provider, output size, ...)
    varying = [k for k in SERIES_KEYS + X_KEYS + CONFIG_KEYS if len({str(r.get(k)) for r in rows}) > 1]
    for x_key in X_KEYS:
        xs = {r[x_key] for r in rows if x_key in r and isinstance(r[x_key], (int, float))}
        if len(xs) < 2:
            continue
        series_of = lambda r: " ".join(str(r.get(k)) for k in varying if k != x_key)  # noqa: E731
        for metric in ("median_ms", "peak_mem_mib"):
            points = [r for r in rows if metric in r and x_key in r]
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for series in sorted({series_of(r) for r in points}):
                pts = sorted((r[x_key], r[metric]) for r in points if series_of(r) == series)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=series)
            ax.set_xlabel(x_key)
            ax.set_ylabel(metric)
            ax.set_title(f"{name}: {metric} vs {x_key}")
            ax.legend(fontsize=6)
            fig.tight_layout()
            path = out_prefix.parent / f"{out_prefix.name}-{name}-{metric}-vs-{x_key}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path.name)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--only", nargs="+", choices=list(PARTS), help="run only these parts")
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--budget", type=float, default=540,
                   help="total seconds for all parts (default fits one 10-minute device call); parts "
                        "that no longer fit are recorded as skipped")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list the parts and their scripts, then exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (script, _, _) in PARTS.items():
            print(f"{name:20s} {script}")
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    facts = device_facts(device)
    report = {"device": facts, "roofline": measure_roofline(device), "date": dt.date.today().isoformat(), "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        deadline = time.perf_counter() + args.budget
        for name in args.only or list(PARTS):
            left = deadline - time.perf_counter()
            if left < 20:
                report["parts"][name] = {"error": "skipped: time budget used up"}
                continue
            print(f"== {name}", flush=True)
            report["parts"][name] = run_part(name, device, args.quick, pathlib.Path(tmp), left)
            part = report["parts"][name]
            print(part.get("table") or part.get("error", ""), flush=True)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device == "cpu" else facts["name"].lower().replace(" ", "-")
    prefix = out_dir / f"{tag}-{report['date']}"
    lines = [f"# Benchmarks on {facts['name']} ({report['date']})", "",
             "Roofline: " + ", ".join(f"{k} {v:.3g}" for k, v in report["roofline"].items()), ""]
    for name, part in report["parts"].items():
        lines += [f"## {name}", "", f"`{part.get('command', '')}`", "",
                  part.get("table") or f"error: {part.get('error', '')[-500:]}", ""]
        if not args.no_plots and part.get("rows"):
            part["plots"] = plot_part(name, part["rows"], prefix)
    report["versus_roofline"] = versus_roofline(report["parts"], facts["name"])
    if report["versus_roofline"]:
        table = markdown_table(report["versus_roofline"], list(report["versus_roofline"][0]))
        lines += ["## Measured vs roofline (benchmarks/roofline.py)", "", table, ""]
        print(table)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
    prefix.with_suffix(".md").write_text("\n".join(lines))
    print("wrote", prefix.with_suffix(".json"), "and", prefix.with_suffix(".md"))
    failed = [n for n, part in report["parts"].items() if "error" in part]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
