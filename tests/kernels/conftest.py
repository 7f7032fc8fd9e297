"""Kernel tests run twice over: compiled on a CUDA device (`pytest -m gpu`), and through
Triton's interpreter on the CPU in the default suite (small shapes).

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module
imports a kernel, whenever torch sees no CUDA device.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where the kernel runs: the CUDA device, or the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
