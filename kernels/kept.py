"""The torch-only pieces of the masked log-probs (Keep Sampling Mask) that the Triton path
(kernels.logprobs) and rl.logprobs' chunked torch path share: the checks of the kept ids a
sampler recorded, and the reference both are tested against. Importing it compiles no kernel."""

from __future__ import annotations

import torch


def check_kept_ids(targets: torch.Tensor, kept: torch.Tensor | None, vocab: int) -> None:
    """Targets and kept ids lie in [0, vocab) (kept ids may be -1), each truncated row holds its
    target and no id twice (the normaliser sums kept logits). Raises ValueError."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"target ids must lie in [0, {vocab})")
    if kept is None or kept.numel() == 0:
        return
    if int(kept.min()) < -1 or int(kept.max()) >= vocab:
        raise ValueError(f"kept ids must lie in [0, {vocab}) or be -1")
    ordered = kept.sort(-1).values
    dup = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(-1)
    if bool(dup.any()):
        raise ValueError(f"token {int(dup.nonzero()[0])}: its kept ids repeat an id")
    ok = (kept == targets.unsqueeze(-1)).any(-1) | (kept < 0).all(-1)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0])
        raise ValueError(
            f"token {bad}: target id {int(targets[bad])} is not in its kept set; "
            "the recorded sampling mask does not contain the sampled token"
        )


def masked_logprobs_reference(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    kept_ids: torch.Tensor | None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(targets) [N] with the full [N, V] logits materialised: matmul in the model dtype,
    softmax in float32 (float64 for float64 inputs) over each row's kept set."""
    z = torch.nn.functional.linear(hidden, lm_head_weight)
    z = (z.float() if z.element_size() < 4 else z) / temperature
    if kept_ids is not None:
        kept = kept_ids.long()
        allowed = torch.zeros_like(z, dtype=torch.bool)
        allowed.scatter_(1, kept.clamp_min(0), kept >= 0)
        truncated = (kept >= 0).any(-1, keepdim=True)
        z = z.masked_fill(~allowed & truncated, float("-inf"))
    return z.log_softmax(-1).gather(1, targets.long()[:, None]).squeeze(1)
