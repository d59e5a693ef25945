"""Constants and helpers shared by the public ops and the Triton kernels.

This is the only fastmaskformer module the kernels (``fastmaskformer.kernels``) import: the
kernels are leaves (torch, triton and this), and the ops load them lazily.
"""
from __future__ import annotations

import os

# Focal loss / focal matching cost (official: alpha 0.25, gamma 2). The kernels square
# (1 - p_t) explicitly, so gamma is fixed.
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0

# Namespace of every registered operator (torch.ops.fastmaskformer.<op>).
OP_NAMESPACE = "fastmaskformer"


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``, which
    must be set before ``triton`` is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Called with the name of each Triton operator as ``kernels.common.triton_operator`` registers
# it: the ops layer attaches the autograd formulas the kernels leave to it (see
# ``ops._library.reference_operator``), whichever of the two is imported first.
ON_TRITON_OPERATOR: list = []
