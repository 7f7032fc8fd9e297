"""The DeepSeek-V3.2 GRPO objective, per token, and its aggregation.

Maximised:  J = 1/G sum_i 1/|o_i| sum_t [ min(r A_i, clip(r, 1-eps_low, 1+eps_high) A_i) M_i
                                          - beta KL_it ]
with r = pi_theta / pi_old (pi_old: the sampler's log-prob, under the sampling mask), M_i the
Off-Policy Sequence Mask and KL_it the unbiased estimate (rl.kl). We minimise -J. Aggregation
'sequence' is the paper's (mean over each sequence's tokens, then over sequences); 'token'
weights every token equally across the batch. Both are normalised by counts over the WHOLE
batch, passed in, so micro-batches add up to exactly the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .kl import k3_kl, unbiased_kl


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The objective's knobs; each stabilizer can be switched off for ablations. The paper
    gives no values for eps, beta or delta (these defaults are keeprl's)."""

    eps_low: float = 0.2  # ratio clip below: 1 - eps_low
    # Ratio clip above: 1 + eps_high. Wider than eps_low ("clip-higher") so that tokens the
    # policy rarely chose can still grow; equal values give the paper's symmetric clip.
    eps_high: float = 0.28
    beta: float = 0.0  # KL weight; 0 skips the reference model altogether
    kl_estimator: Literal["unbiased", "k3"] = "unbiased"  # k3: plain K3, for comparison
    opsm: bool = True  # Off-Policy Sequence Masking
    # Mean per-token log(pi_old / pi_theta) above which a negative-advantage sequence is
    # dropped. 0.05 nats/token sits well above bf16 training/inference mismatch (~1e-3) and
    # below one clipped step's drift.
    opsm_delta: float = 0.05
    # 'sequence': mean over each sequence's tokens, then over sequences (the paper's);
    # 'token': every token of the batch weighs the same.
    aggregation: Literal["sequence", "token"] = "sequence"

    def __post_init__(self) -> None:
        if self.kl_estimator not in ("unbiased", "k3"):
            raise ValueError(f"kl_estimator must be 'unbiased' or 'k3', not {self.kl_estimator!r}")
        if self.aggregation not in ("sequence", "token"):
            raise ValueError(f"aggregation must be 'sequence' or 'token', not {self.aggregation!r}")
        if self.eps_low < 0 or self.eps_high < 0 or self.beta < 0:
            raise ValueError("eps_low, eps_high and beta must be >= 0")


def token_weights(
    response_mask: torch.Tensor, aggregation: str, n_seqs: int, n_tokens: int
) -> torch.Tensor:
    """[B, T] weights whose sum over a micro-batch is its share of the batch mean.

    sequence: 1 / (|o_i| * n_seqs) on response tokens; token: 1 / n_tokens.
    """
    m = response_mask.float()
    if aggregation == "sequence":
        return m / (m.sum(-1, keepdim=True).clamp_min(1) * n_seqs)
    return m / max(n_tokens, 1)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    keep: torch.Tensor,
    ref_logp: torch.Tensor | None,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, T] (to be weighted and summed) and per-token diagnostics.

    logp, old_logp, ref_logp: [B, T] (garbage allowed outside the response mask: callers
    weight by it); advantages, keep (OPSM): [B].
    """
    a = advantages.float().unsqueeze(-1)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    surrogate = torch.minimum(ratio * a, clipped * a)
    loss = -surrogate * keep.float().unsqueeze(-1)
    info = {
        "clip_low": ((ratio < 1 - cfg.eps_low) & (a < 0)).float(),
        "clip_high": ((ratio > 1 + cfg.eps_high) & (a > 0)).float(),
        "ratio": ratio.detach(),
    }
    if ref_logp is not None and cfg.beta > 0:
        kl = (
            unbiased_kl(logp, old_logp, ref_logp)
            if cfg.kl_estimator == "unbiased"
            else k3_kl(logp, ref_logp)
        )
        loss = loss + cfg.beta * kl
        info["kl"] = kl.detach()
    return loss, info
