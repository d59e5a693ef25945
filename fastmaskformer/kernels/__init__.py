"""``fastmaskformer.kernels`` in a source checkout or an editable install.

The Triton kernels live in the top-level ``kernels/`` directory; this shim makes the subpackage
search that directory of the same checkout, so a checkout never picks up the kernels of another
one that happens to be installed. A wheel has the kernel modules here instead of this file (see
setup.py).
"""
from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "kernels")]
