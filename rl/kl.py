"""Per-token KL estimates between the trained policy and the frozen reference.

`unbiased_kl` is DeepSeek-V3.2's estimator: the K3 estimate k3 = r - log r - 1 with
r = pi_ref / pi_theta, weighted by the importance ratio pi_theta / pi_old because the token was
sampled from pi_old, not pi_theta. Its expectation under pi_old is exactly KL(pi_theta || pi_ref)
and, with the ratio left in the graph, so is its gradient. Plain K3 (`k3_kl`) treats samples as
if they came from pi_theta: biased once the policies drift apart, and its gradient weights blow
up where pi_theta << pi_ref.
"""

from __future__ import annotations

import torch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1, elementwise (>= 0)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def unbiased_kl(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(pi_theta/pi_old) * k3(pi_theta, pi_ref), elementwise; all log-probs share one shape.

    The importance ratio is NOT detached: its gradient is what makes the estimator's gradient
    unbiased for grad KL(pi_theta || pi_ref).
    """
    return torch.exp(logp - old_logp) * k3_kl(logp, ref_logp)
