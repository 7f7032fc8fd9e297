"""GRPO advantages: each reward minus its group's mean reward.

The paper's advantage is A_i = R_i - mean(R) over the G outputs sampled for one prompt, with
no division by the group's standard deviation (that normalisation is an option, off by
default: it up-weights near-unanimous groups). Groups are given as a group id per sample, so
samples need not be contiguous or equally many per group.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_normalize: bool = False,
    eps: float = 1e-6,
    episode_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """A [N] from rewards [N] and integer group ids [N] (any values, any order). With
    episode_ids [N], rows of one episode (an agent episode's segments, which share its reward)
    count once in their group's statistics and all get the episode's advantage."""
    if episode_ids is not None:
        _, inverse = torch.unique(episode_ids, return_inverse=True)
        n = int(inverse.max()) + 1 if inverse.numel() else 0
        rows = torch.arange(inverse.numel(), device=inverse.device)
        first = torch.full((n,), inverse.numel(), dtype=torch.long, device=inverse.device)
        first = first.scatter_reduce(0, inverse, rows, "amin")
        return group_advantages(rewards[first], group_ids[first], std_normalize, eps)[inverse]
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
