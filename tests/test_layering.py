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


def package_import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in the file, lazy imports
    included: a circle through a function-level import is still a circle)."""
    modules = {p.stem: p for p in package.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for imported in imported_modules(path):
            if imported.startswith(".") and not imported.startswith(".."):
                target = imported[1:].split(".")[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def test_converters_have_no_import_circle():
    """issue 24 item 10: hf.py <-> hf_mask2former.py imported each other; the pieces they share
    live in hf_common.py now."""
    graph = package_import_graph(Path(__file__).resolve().parents[1] / "fastmaskformer" / "convert")
    assert {"hf", "hf_mask2former", "hf_eomt", "hf_common", "eomt"} <= set(graph)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    circles = sorted(name for name in graph if reaches(name, name))
    assert not circles, f"import circles through {circles}"
