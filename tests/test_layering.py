"""The kernels are leaves: each kernel module imports only the standard library, numpy, torch,
triton, its sibling kernel modules and ``fastmaskformer.shared`` - never the ops or anything
else of the package (the ops load the kernels lazily, so a circle would be hidden)."""
import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
ALLOWED_ROOTS = {"__future__", "contextlib", "functools", "math", "typing", "numpy", "torch", "triton"}


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")


def test_kernel_modules_import_only_leaves():
    modules = sorted(KERNELS.glob("*.py"))
    assert modules, "no kernel modules found"
    bad = []
    for path in modules:
        for name in imported_modules(path):
            if name.startswith(".") or name == "fastmaskformer.shared" or name.split(".")[0] in ALLOWED_ROOTS:
                continue
            bad.append(f"{path.name}: {name}")
    assert not bad, bad
