"""Kernel tests run twice over: compiled on a CUDA device (`pytest -m gpu`), and through
Triton's interpreter on the CPU in the default suite (small shapes).

TRITON_INTERPRET is read when a kernel is decorated and again when it runs, so when torch sees
no CUDA device it is set here while the kernel modules are first imported and during each
kernel test, and put back in between: the rest of the suite (vLLM, the trainer's
subprocesses) must not inherit it.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

KERNEL_MODULES = (
    "kernels.grouped_gemm",
    "kernels.indexer",
    "kernels.logprobs",
    "kernels.indexer_loss",
    "kernels.sparse_mla",
    "kernels.topk",
)

if not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for _name in KERNEL_MODULES:
            importlib.import_module(_name)
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


@pytest.fixture(autouse=True)
def _interpreted_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where the kernel runs: the CUDA device, or the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
