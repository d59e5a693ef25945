"""Packaging (setup.py): the Triton kernels are imported from the checkout under test, never from
another checkout that is installed in editable mode, and a built wheel carries them as
``fastmaskformer.kernels`` with the runtime requirements of the package."""
import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (REPO / "kernels").glob("*.py"))


def _run(*cmd, cwd, env=None, timeout=600) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def test_kernels_are_this_checkouts():
    assert KERNEL_MODULES
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"fastmaskformer.kernels.{name}")
        assert Path(module.__file__).resolve() == REPO / "kernels" / f"{name}.py"


def test_another_checkout_imports_its_own_kernels(tmp_path):
    """A second checkout (here a copy of the sources), run while this one is installed in editable
    mode, gets its own kernels: its fastmaskformer/kernels/__init__.py points at its own kernels/,
    where the editable install's import hook would hand out this checkout's."""
    other = tmp_path / "other"
    for folder in ("fastmaskformer", "kernels"):
        shutil.copytree(REPO / folder, other / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    code = "import importlib.util as u; print(u.find_spec('fastmaskformer.kernels.mask_probs').origin)"
    origin = _run(sys.executable, "-c", code, cwd=other).strip()
    assert Path(origin).resolve() == (other / "kernels" / "mask_probs.py").resolve()


def test_checkout_root_does_not_shadow_the_pypi_kernels_package(tmp_path):
    """Run from the checkout root (``python -m pytest``, ``python -c``: the root comes first on
    sys.path), ``import kernels`` still finds an installed top-level package of that name (the
    PyPI ``kernels`` that transformers imports), not this checkout's ``kernels/``."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("INSTALLED = True\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = _run(sys.executable, "-c", "import kernels; print(kernels.INSTALLED)", cwd=REPO, env=env)
    assert out.strip() == "True"


def test_wheel_carries_kernels_and_runtime_requirements(tmp_path):
    """``pip wheel .``: every module of kernels/ lands in fastmaskformer/kernels/ (without the
    source checkout's shim: a namespace subpackage) and imports from there; the
    metadata pins torch & co. to ranges capped at the versions installed here (the tested ones)
    and keeps test and benchmark tools out of the runtime requirements."""
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(tmp_path / "dist"),
         cwd=tmp_path, timeout=900)
    (wheel,) = (tmp_path / "dist").glob("fastmaskformer-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {f"fastmaskformer/kernels/{name}.py" for name in KERNEL_MODULES} <= names
    assert "fastmaskformer/kernels/__init__.py" not in names
    assert not any(n.startswith("kernels/") for n in names)

    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = {re.match(r"[A-Za-z0-9_.-]+", r).group().lower(): r for r in requires if "extra ==" not in r}
    assert "matplotlib" in runtime
    assert not {"pybind11", "pytest", "pytest-benchmark", "nvidia-ml-py", "lap"} & set(runtime)
    # ONNX export tools: the export extra (and the test extra), never the default install
    assert not {"onnx", "onnxruntime", "onnxscript"} & set(runtime)
    for extra in ("export", "test"):
        names = {re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in requires if f'extra == "{extra}"' in r}
        assert {"onnx", "onnxruntime", "onnxscript"} <= names, (extra, names)
    # pycocotools (COCO instance data and mask AP): the instance extra (and the test extra) only
    assert "pycocotools" not in runtime
    for extra in ("instance", "test"):
        assert any(r.startswith("pycocotools") and f'extra == "{extra}"' in r for r in requires), extra
    for name in ("torch", "torchvision", "triton", "timm"):
        assert f"<={version(name)}" in runtime[name], (runtime[name], version(name))

    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    code = "import fastmaskformer.kernels.mask_probs as m; print(m.__file__)"
    env = dict(os.environ, PYTHONPATH=str(site))  # ahead of this checkout's editable install
    origin = _run(sys.executable, "-c", code, cwd=tmp_path, env=env).strip()
    assert Path(origin) == site / "fastmaskformer" / "kernels" / "mask_probs.py"
