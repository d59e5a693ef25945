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


# ---------------------------------------------------------------------------- import circles
REPO = KERNELS.parent
# Circles not yet removed: listed so that a new circle fails the test (none left).
PENDING_CIRCLES: list[set[str]] = []


def project_modules() -> dict[str, Path]:
    """Module name -> file: the package (kernels/ installed as fastmaskformer.kernels) and the
    benchmark scripts (run from benchmarks/, importing each other by their bare names)."""
    out = {}
    for path in (REPO / "fastmaskformer").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    out.update({f"fastmaskformer.kernels.{p.stem}": p for p in KERNELS.glob("*.py")})
    out.update({p.stem: p for p in (REPO / "benchmarks").glob("*.py")})
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every import (module level or inside functions: a lazy import hides a circle, it does not
    remove it) of each module, restricted to the project's modules."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:  # "from package import module" imports the module
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circle_detection_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_circles():
    found = [c for c in circles(import_graph(project_modules())) if c not in PENDING_CIRCLES]
    assert not found, [sorted(c) for c in found]
