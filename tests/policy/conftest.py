"""Shared fixtures for the policy tests: tiny models built deterministically on the CPU."""

from __future__ import annotations

import pytest
import torch

from policy import Transformer
from policy.testing import tiny_policy


@pytest.fixture
def make_model():
    """The tiny-model factory, as a fixture: make_model(seed=0, dtype=..., **preset_overrides)."""
    return tiny_policy


@pytest.fixture
def tiny() -> Transformer:
    return tiny_policy()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
