"""Triton kernels of fastmaskformer: ``fastmaskformer.kernels``.

Each module holds the kernels of one op, its launcher and, for training ops, its
``torch.autograd.Function``; the public ops in ``fastmaskformer.ops`` dispatch there.

The modules live in the top-level ``kernels/`` directory. In a source checkout or an editable
install this shim makes the subpackage search the ``kernels/`` of the same checkout, so a checkout
never picks up the kernels of another one that happens to be installed. A wheel carries the
modules in ``fastmaskformer/kernels/`` instead of this file (see setup.py). ``kernels/`` itself has
no ``__init__.py``: run from the checkout root, it must not shadow the PyPI package ``kernels``
that transformers imports.
"""
from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "kernels")]
