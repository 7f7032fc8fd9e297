"""Small seeded policies for tests, benchmarks and examples.

`tiny_policy(seed)` is the `tiny` preset built under `torch.manual_seed(seed)` with its MoE
selection bias (`e_score_correction_bias`) drawn non-zero, so that routing exercises the
split between the biased top-k selection and the unbiased gate weights: with the bias left at
zero, as a fresh model has it, a bug that mixed the two would go unseen.
"""

from __future__ import annotations

from typing import Any

import torch

from .args import preset
from .model import Transformer


def tiny_policy(
    seed: int = 0,
    *,
    bias_std: float = 0.05,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Transformer:
    """The tiny preset (with `overrides`), seeded, its MoE selection bias ~ N(0, bias_std),
    in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **overrides)).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.normal_(0, bias_std)
    return model.eval()
