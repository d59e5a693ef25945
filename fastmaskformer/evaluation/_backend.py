"""Which engine scores PQ and mask AP: hotcoco (Rust, pycocotools / panopticapi compatible) or
the reference (pycocotools' ``COCOeval`` for mask AP, our NumPy PQ core for panoptic files).

hotcoco 1.3.0 gives the references' numbers on every case the tests check (bit-identical mask
AP precision tables, PQ within 3e-16 of panopticapi) at 10-50x their speed, so ``"auto"`` picks
it whenever it is installed (it is a dependency; the reference stays selectable and tested).
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
