"""Every Triton kernel compiles for H100 (sm_90) and A100 (sm_80), fits and does not spill.

No GPU is needed: ``benchmarks/aot.py`` records the launches the real launchers make at
the benchmark sizes (B=16 512x512 training crops, Q=100, M in {8,16,32}, K in {150,847};
512x683 inference outputs, Q in {100,200}, multi-scale + flip TTA) and compiles every autotune
config they can choose with Triton's bundled ptxas. A config fails when it needs more shared
memory than a block may have (it could not launch) or spills more than 256 bytes per thread.
The main cases run here; the exhaustive sweep (every case) is marked slow.

It runs in a subprocess without TRITON_INTERPRET: the kernel modules pick their GPU configs at
import.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

REPO = Path(__file__).resolve().parents[1]


def run_aot(tmp_path, *args) -> dict:
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # ptxas runs for every config
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "aot.py"), "--jobs", "2", "--json", str(out),
                           *args], env=env, capture_output=True, text=True, timeout=3000, cwd=REPO)
    print(proc.stdout[-20000:])
    assert out.exists(), proc.stderr[-5000:]
    return json.loads(out.read_text()) | {"returncode": proc.returncode, "stderr": proc.stderr}


def check(result: dict) -> None:
    rows = result["rows"]
    assert rows, "no launch was recorded"
    assert not result["uncovered"], f"kernels no case launches: {result['uncovered']}"
    failed = [f"{r['kernel']} [{r['case']}] {r['config']} sm_{r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert result["returncode"] == 0, result["stderr"][-3000:]
    for arch in (90, 80):
        kernels = {r["kernel"] for r in rows if r["arch"] == arch}
        assert kernels, f"nothing compiled for sm_{arch}"
    # Tensor cores where the precision asks for them: every non-ieee dot of the training and
    # inference kernels lowers to wgmma (sm_90) or mma (sm_80).
    for r in rows:
        if "dot" in r and "tf32" in r["case"] and r["kernel"] in ("matching_cost._matching_cost_kernel",
                                                                  "semantic._semantic_kernel"):
            assert "FMA" not in r["dot"], f"{r['kernel']} [{r['case']}] sm_{r['arch']}: {r['dot']}"


def test_main_cases_compile_fit_and_do_not_spill(tmp_path):
    check(run_aot(tmp_path, "--arch", "90", "80"))


@pytest.mark.slow
def test_every_case_compiles_fits_and_does_not_spill(tmp_path):
    check(run_aot(tmp_path, "--all", "--arch", "90", "80"))
