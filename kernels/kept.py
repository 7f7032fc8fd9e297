"""Checks of the kept ids a sampler recorded (Keep Sampling Mask), shared by the masked
log-probs' Triton path and rl.logprobs' torch path; torch only, so importing it compiles no
kernel."""

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
