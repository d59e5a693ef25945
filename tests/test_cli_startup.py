"""The command line answers ``--help`` and argument errors without importing torch (measured
0.1 s against 6 s when the trainer was imported before parsing); the package's lazy names still
resolve."""
import subprocess
import sys
import time

from engine_tiny import REPO, cli_command, cli_env

LIMIT_S = 3.0  # generous for a loaded CI box; importing torch alone takes longer than this there


def _timed(*args):
    start = time.perf_counter()
    result = subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)
    return result, time.perf_counter() - start


def test_help_and_argument_errors_are_fast():
    for args, status in ((("--help",), 0), (("train", "--help"), 0), (("prepare", "--help"), 0),
                         (("train", "--bogus-flag"), 2), (("frobnicate",), 2)):
        result, seconds = _timed(*args)
        assert result.returncode == status, result.stderr
        assert seconds < LIMIT_S, (args, seconds)
    assert result.stderr.count("\n") == 1 and "invalid choice: 'frobnicate'" in result.stderr


PARSE_ONLY = """
import sys
from fastmaskformer.cli import build_parser
for argv in (["train", "--preset", "ade20k-150-r50"], ["predict", "a.png", "--checkpoint", "c.pt"],
             ["export", "--checkpoint", "c.pt", "--task", "semantic", "--output", "m.pt2"],
             ["prepare", "cityscapes", "--src", "raw"], ["demo", "--quick"],
             ["convert", "--from", "hf", "x", "--out", "y"]):
    build_parser().parse_args(argv)
heavy = sorted(m for m in ("torch", "numpy", "PIL", "timm", "triton") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_parsing_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", PARSE_ONLY], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


LAZY_NAMES = """
import sys
import fastmaskformer as fmf
assert "torch" not in sys.modules
cfg = fmf.get_config("ade20k-150-r50")
assert callable(fmf.build_model) and fmf.Target.__name__ == "Target" and "torch" in sys.modules
from fastmaskformer.data import DatasetError, build_dataset, get_metadata, synthetic  # lazy package names
from fastmaskformer.data.prepare import PREPARERS, PrepareError, prepare
assert issubclass(PrepareError, DatasetError) and "cityscapes" in PREPARERS and synthetic.NUM_CLASSES > 0
print("ok")
"""


def test_lazy_names_resolve():
    out = subprocess.run([sys.executable, "-c", LAZY_NAMES], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
