"""Triton kernels of fastmaskformer (installed as ``fastmaskformer.kernels``).

Each module holds the kernels of one op, its launcher and, for training ops, its
``torch.autograd.Function``. The public ops in ``fastmaskformer.ops`` dispatch here.
"""
