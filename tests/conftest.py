"""Suite-wide pytest hooks: skip `gpu`-marked tests on machines without a CUDA device."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every `gpu` test as skipped when torch sees no CUDA device.

    torch is imported only when a collected test carries the mark, so suites without GPU tests
    never pay for the import.
    """
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in gpu_items:
        item.add_marker(skip)
