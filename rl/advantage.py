"""GRPO advantages: each reward minus its group's mean reward.

The paper's advantage is A_i = R_i - mean(R) over the G outputs sampled for one prompt, with
no division by the group's standard deviation (that normalisation is an option, off by
default: it up-weights near-unanimous groups). Groups are given as a group id per sample, so
samples need not be contiguous or equally many per group.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """A [N] from rewards [N] and integer group ids [N] (any values, any order)."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids "
            f"{tuple(group_ids.shape)} must be equal 1-D shapes"
        )
    r = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)
    count = zeros.index_add(0, inverse, torch.ones_like(r))
    mean = zeros.index_add(0, inverse, r) / count
    adv = r - mean[inverse]
    if std_normalize:
        # Unbiased (n-1) std, as torch.std; a single-sample group has advantage 0 anyway.
        sq = zeros.index_add(0, inverse, adv**2)
        std = (sq / (count - 1).clamp_min(1)).sqrt()
        adv = adv / (std[inverse] + eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
