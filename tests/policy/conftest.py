"""Shared fixtures for the policy tests: tiny models built deterministically on the CPU."""

from __future__ import annotations

import pytest
import torch

from policy import Transformer, preset


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Transformer:
    """A tiny DSA policy with seeded random weights (and a non-zero MoE selection bias, so
    tests exercise the biased selection / unbiased weighting split)."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **overrides)).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def make_model():
    """The tiny-model factory, as a fixture: make_model(seed=0, dtype=..., **preset_overrides)."""
    return build_model


@pytest.fixture
def tiny() -> Transformer:
    return build_model()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
