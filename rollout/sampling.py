"""Temperature / top-k / top-p sampling that records what it kept (Keep Sampling Mask).

One implementation for every engine we own, with vLLM's semantics so native and vLLM rollouts
record the same thing: divide logits by the temperature, keep the top-k logits (ties at the
k-th value are kept), then keep the smallest set of the most likely remaining tokens whose
probability reaches top_p (the most likely token always survives), renormalise, sample.

Returned per row: the sampled token, its log-prob under the truncated distribution (pi_old, as
vLLM's processed logprobs give it), and the kept token ids, compact (-1 padded), never a
vocab-sized bitmap. A row with no truncation (top_k <= 0 and top_p >= 1) records no kept ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleOutput:
    """tokens [N]; logprobs [N] float32 under the truncated distribution; kept_ids [N, K]
    (-1 padded, K = the largest kept set in the batch; K = 0 when nothing was truncated)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    kept_ids: torch.Tensor


def truncate_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [N, V] (already temperature-scaled) with -inf outside the top-k/top-p kept set."""
    z = logits.float()
    if top_k > 0 and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        # Mass strictly before each token: a token is dropped once that mass reaches top_p,
        # so the kept prefix is the smallest one whose total reaches top_p (never empty).
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def kept_ids_of(truncated: torch.Tensor) -> torch.Tensor:
    """Compact kept ids [N, K] (-1 padded, ascending) of truncated logits [N, V]."""
    n_vocab = truncated.shape[-1]
    finite = truncated.isfinite()
    k = int(finite.sum(-1).max()) if finite.numel() else 0
    ids = torch.where(finite, torch.arange(n_vocab, device=truncated.device), n_vocab)
    ids = ids.sort(dim=-1).values[:, :k]  # kept ids first, ascending; the rest sort last
    return ids.masked_fill(ids == n_vocab, -1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Sample one token per row of logits [N, V]. temperature 0 is greedy (argmax)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if temperature == 0:
        # Greedy: nothing is sampled, so nothing is truncated or recorded; the log-prob is the
        # model's own (full softmax), as vLLM reports it for greedy requests.
        tokens = logits.argmax(-1)
        logp = logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        return SampleOutput(tokens, logp, tokens.new_empty(tokens.shape[0], 0))
    z = truncate_logits(logits.float() / temperature, top_k, top_p)
    logp = z.log_softmax(-1)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    truncated = top_k > 0 or top_p < 1.0
    kept = (
        kept_ids_of(z)
        if truncated
        else torch.empty(z.shape[0], 0, dtype=torch.long, device=z.device)
    )
    return SampleOutput(tokens, logp.gather(1, tokens[:, None]).squeeze(1), kept)
