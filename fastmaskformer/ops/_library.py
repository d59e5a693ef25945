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

from ..shared import OP_NAMESPACE


def reference_operator(name: str, differentiable: Sequence[str] = ()):
    """Register the decorated plain-PyTorch function as ``fastmaskformer::<name>`` and return
    the function unchanged (benchmarks trace it op by op; the public ops call the operator).

    differentiable: names of the tensor arguments that get gradients (through ``torch.func.vjp``
    of the function); the other arguments get none.
    """
    def register(fn: Callable):
        op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fn)
        if differentiable:
            _register_vjp(op, fn, tuple(differentiable))
        return fn
    return register


def _register_vjp(op, fn: Callable, differentiable: tuple[str, ...]) -> None:
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

    op.register_autograd(backward, setup_context=setup_context)
