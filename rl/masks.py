"""Off-Policy Sequence Masking (OPSM).

A sampled sequence is dropped from the policy-gradient term when its advantage is negative and
the policy it was sampled from has drifted too far from the current one:
    M_i = 0  if  A_i < 0  and  (1/|o_i|) sum_t log(pi_old(o_it) / pi_theta(o_it)) > delta.
The decision is per sequence. pi_old is the sampler's own probability, so the test covers both
staleness and training/inference mismatch. Positive-advantage sequences are never masked.
"""

from __future__ import annotations

import torch


def sequence_mean(x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over each row's response tokens -> [B] (0 for an empty row)."""
    m = response_mask.bool()
    # where, not multiply: padding positions may hold -inf log-probs (and -inf * 0 = nan).
    return torch.where(m, x, torch.zeros_like(x)).sum(-1) / m.sum(-1).clamp_min(1)


@torch.no_grad()
def opsm_keep(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    delta: float,
) -> torch.Tensor:
    """bool [B]: True for sequences that keep their policy-gradient term.

    logp, old_logp, response_mask: [B, T]; advantages: [B]. delta = inf masks nothing.
    """
    drift = sequence_mean(old_logp.float() - logp.float(), response_mask)
    return ~((advantages < 0) & (drift > delta))
