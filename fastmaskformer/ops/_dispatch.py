"""Choosing between the Triton kernel and the plain-PyTorch reference of an op.

``impl="auto"`` picks Triton when every tensor is on a CUDA device (and Triton imports), the
reference otherwise. ``impl="triton"`` on CPU tensors runs the kernels through the Triton
interpreter, which needs ``TRITON_INTERPRET=1`` set before ``triton`` is first imported (the
test-suite does this); without it we raise instead of crashing inside Triton.
"""
from __future__ import annotations

import torch

from ..shared import interpreter_enabled

IMPLS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(impl: str, *tensors: torch.Tensor, op: str) -> str:
    """Return "triton" or "torch" for ``op`` given the user's ``impl`` and the input tensors."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{op}: impl='triton' but triton cannot be imported")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: impl='triton' with CPU tensors needs TRITON_INTERPRET=1 set before triton is "
            "imported (the Triton interpreter); use impl='torch' or move the tensors to CUDA"
        )
    return "triton"


_LOADED: dict = {}


def load_kernel(module: str, op: str):
    """``fastmaskformer.kernels.<module>``; NotImplementedError if that kernel is absent. Loaded
    modules are cached in a plain dict, which ``torch.compile`` reads without a graph break (a
    module must be loaded once outside compiled code: see :func:`preload_kernels`)."""
    if module in _LOADED:
        return _LOADED[module]
    import importlib

    try:
        _LOADED[module] = importlib.import_module(f"fastmaskformer.kernels.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"fastmaskformer.kernels.{module}":
            raise
        raise NotImplementedError(f"{op}: no Triton kernel yet (kernels/{module}.py); use impl='torch'") from None
    return _LOADED[module]


def preload_kernels(impl: str, *tensors: torch.Tensor, modules: tuple[str, ...]) -> None:
    """Load the kernel ``modules`` an op will use with these tensors (before compiled code runs)."""
    if resolve_impl(impl, *tensors, op="preload") == "triton":
        for module in modules:
            load_kernel(module, module)
