"""README command 1 as a new user runs it: a fresh virtual environment, ``pip install -q -e`` of
this checkout (the default install, no extras), then the ``fastmaskformer demo`` entry point in
quick mode must finish, print its summary (the trained model beats the trivial baseline) and draw its
curves.

The venv is made by the Python that CI's own .venv comes from and installs the checkout under
test (whose build/ folder the install reuses). The cost is mostly pip unpacking torch and its CUDA
libraries (about 6 GB; some 2.5 CPU-minutes), then the quick demo's 60 training steps."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_command_1_runs_the_demo(tmp_path):
    venv = tmp_path / ".venv"
    python3 = Path(sys.base_prefix) / "bin" / "python3"
    # a user's shell: no test-suite settings (Triton interpreter) and nothing that reaches other installs
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "VIRTUAL_ENV")}

    def run(*cmd):
        result = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=1800)
        assert result.returncode == 0, (f"{cmd[0]} exited with {result.returncode}:\n{result.stdout[-2000:]}\n"
                                        f"{result.stderr[-4000:]}")
        return result

    try:
        run(python3, "-m", "venv", venv)
        run(venv / "bin" / "pip", "install", "-q", "-e", REPO)
        demo = run(venv / "bin" / "fastmaskformer", "demo", "--quick", "--no-progress")
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 6 GB
    assert "Traceback" not in demo.stderr, demo.stderr[-4000:]
    for line in ("[5/5] wrote curves to", "trivial (", "MaskFormer (demo)", "training loss"):
        assert line in demo.stdout, demo.stdout
    out = tmp_path / "demo_output" / "maskformer"  # one folder per --arch
    assert (out / "run" / "curves.png").is_file()
    # it learns: the printed table's demo row beats the trivial row, the loss falls by 15 %
    baseline_miou = float(re.search(r"^trivial \(.*\)\s+([\d.]+)", demo.stdout, re.M).group(1))
    miou = float(re.search(r"^MaskFormer \(demo\)\s+([\d.]+)", demo.stdout, re.M).group(1))
    first, last = map(float, re.search(r"training loss ([\d.]+) -> ([\d.]+)", demo.stdout).groups())
    assert miou > baseline_miou and last < 0.85 * first, demo.stdout
    assert len(list((out / "predictions").glob("*_sem.png"))) == 4
    assert len(list((out / "predictions").glob("*_panoptic_overlay.png"))) == 4
