"""Triton kernels, each beside the plain torch reference it is tested against.

Knows nothing of models: callers pass tensors in and get tensors back.
"""

# Name clash: `kernels` is also the import name of the Hugging Face hub-kernels distribution,
# which transformers probes (`is_kernels_available`) by finding the module `kernels`, mapping
# it to a distribution through package metadata, and comparing that version to a window. Once
# keeprl is installed, that metadata maps `kernels` to keeprl, so transformers reads keeprl's
# version; with no metadata it imports this module and reads `__version__`. So this module stays
# cheap to import (no torch or triton at top level) and defines no `__version__` and none of the
# hub-kernels names (`get_kernel`, `kernelize`, ...), and keeprl's version must stay outside
# transformers' window. tests/test_packaging.py checks all of this.
