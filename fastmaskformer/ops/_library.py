"""Registering the plain-PyTorch references as operators (``torch.ops.fastmaskformer.*``).

Each public op has a Triton implementation (``kernels/<op>.py``, registered there with
``common.triton_operator``) and a plain-PyTorch reference (``ops/<op>.py``). The references are
registered here as ``torch.library.custom_op``s named ``<op>_reference``: a schema, a fake
implementation (the reference itself, traced on fake tensors: it has no data-dependent host
code) and, for differentiable ones, an autograd formula: the vector-Jacobian product of the
reference, recomputed in the backward. ``torch.library.opcheck`` tests all of it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..shared import ON_TRITON_OPERATOR, OP_NAMESPACE


# Triton operator name -> (its reference, differentiable argument names): the Triton operators
# whose kernels have no backward of their own get the reference's vector-Jacobian product.
_TRITON_VJPS: dict[str, tuple[Callable, tuple[str, ...]]] = {}


def reference_operator(name: str, differentiable: Sequence[str] = (), triton_twin: str | None = None):
    """Register the decorated plain-PyTorch function as ``fastmaskformer::<name>`` and return
    the function unchanged (benchmarks trace it op by op; the public ops call the operator).

    differentiable: names of the tensor arguments that get gradients (through ``torch.func.vjp``
    of the function); the other arguments get none. triton_twin: the Triton operator with the
    same schema whose autograd is this vjp too (attached when its kernel module loads).
    """
    def register(fn: Callable):
        op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fn)
        if differentiable:
            register_vjp(f"{OP_NAMESPACE}::{name}", fn, tuple(differentiable))
            if triton_twin is not None:
                _TRITON_VJPS[triton_twin] = (fn, tuple(differentiable))
                _attach(triton_twin)
        return fn
    return register


def _attach(name: str) -> None:
    """Give Triton operator ``name`` its reference's vjp once both are registered."""
    if name not in _TRITON_VJPS:
        return
    try:
        getattr(getattr(torch.ops, OP_NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return  # its kernel module is not imported yet: ON_TRITON_OPERATOR calls back
    fn, differentiable = _TRITON_VJPS.pop(name)
    register_vjp(f"{OP_NAMESPACE}::{name}", fn, differentiable)


ON_TRITON_OPERATOR.append(_attach)


def register_vjp(qualname: str, fn: Callable, differentiable: tuple[str, ...]) -> None:
    """Autograd of operator ``qualname``: the vjp of the plain function ``fn`` (same schema),
    recomputed in the backward, for the arguments named in ``differentiable``."""
    import inspect

    params = list(inspect.signature(fn).parameters)
    positions = [params.index(n) for n in differentiable]

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))
        ctx.inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]

    def backward(ctx, *grads):
        inputs = list(ctx.inputs)
        for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
            inputs[i] = t
        wanted = [i for i in positions if ctx.needs_input_grad[i]]

        def partial(*xs):
            args = list(inputs)
            for i, x in zip(wanted, xs):
                args[i] = x
            return fn(*args)

        outputs, vjp = torch.func.vjp(partial, *(inputs[i] for i in wanted))
        single = isinstance(outputs, torch.Tensor)
        cotangents = [torch.zeros_like(o) if g is None else g
                      for o, g in zip([outputs] if single else outputs, grads)]
        pulled = vjp(cotangents[0] if single else tuple(cotangents))
        result = [None] * len(inputs)
        for i, g in zip(wanted, pulled):
            result[i] = g
        return tuple(result)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
