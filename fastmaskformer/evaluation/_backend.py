"""Which engine scores mask AP, PQ from files and semantic confusion counts: hotcoco (Rust,
pycocotools / panopticapi compatible) or the reference (pycocotools' ``COCOeval``, our NumPy PQ
core, ``torch.bincount``).

hotcoco 1.3.0 gives the references' numbers on every case the tests check (bit-identical mask
AP precision tables and per-class AP, PQ within 3e-16 of panopticapi, identical confusion
counts) in a fraction of their time (``benchmarks/bench_evaluation.py``), so ``"auto"`` picks it
whenever it is installed (it is a dependency; the reference stays selectable and tested).
"""
from __future__ import annotations

BACKENDS = ("auto", "hotcoco", "reference")


def hotcoco_available() -> bool:
    try:
        import hotcoco  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"hotcoco"`` when importable, else ``"reference"``; checks the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "hotcoco" if hotcoco_available() else "reference"
    if backend == "hotcoco" and not hotcoco_available():
        raise ImportError("backend='hotcoco' needs hotcoco: pip install hotcoco")
    return backend
