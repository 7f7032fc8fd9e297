"""Top-k / top-p sampling records exactly the set it sampled from."""

from __future__ import annotations

import pytest
import torch

from rollout.sampling import kept_ids_of, sample, truncate_logits


def _kept_by_hand(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The kept set of one row, the slow way: sort, cut at k, then at cumulative mass p."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if top_k > 0:
        kth = float(logits[order[top_k - 1]])
        order = [i for i in order if float(logits[i]) >= kth]
    probs = torch.softmax(logits[order], 0).tolist()
    kept, mass = [], 0.0
    for i, p in zip(order, probs, strict=True):
        if mass >= top_p:
            break
        kept.append(i)
        mass += p
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (8, 0.6), (3, 0.2), (0, 1.0)])
def test_kept_set_matches_brute_force(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(32, 40, generator=gen, dtype=torch.float64) * 2
    kept = kept_ids_of(truncate_logits(logits, top_k, top_p))
    for row in range(32):
        got = {i for i in kept[row].tolist() if i >= 0}
        assert got == _kept_by_hand(logits[row], top_k, top_p)


def test_samples_stay_in_the_kept_set_with_truncated_probabilities():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=gen).repeat(20000, 1)
    out = sample(logits, temperature=0.7, top_k=10, top_p=0.8, generator=gen)
    assert (out.kept_ids == out.tokens[:, None]).any(-1).all()
    # Empirical frequencies follow the recorded (renormalised) log-probs.
    freq = torch.bincount(out.tokens, minlength=50).float() / len(out.tokens)
    recorded = torch.zeros(50).scatter_(0, out.tokens, out.logprobs.exp())
    torch.testing.assert_close(freq, recorded, rtol=0, atol=0.015)
    assert recorded.sum() > 0 and torch.allclose(
        recorded[out.kept_ids[0][out.kept_ids[0] >= 0]].sum(), torch.tensor(1.0), atol=1e-5
    )


def test_greedy_and_untruncated_rows():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    greedy = sample(logits, temperature=0)
    assert greedy.tokens.tolist() == [1, 0] and greedy.kept_ids.shape == (2, 0)
    torch.testing.assert_close(greedy.logprobs, logits.log_softmax(-1).amax(-1))
    full = sample(logits, temperature=1.0)
    assert full.kept_ids.shape == (2, 0)  # nothing truncated, nothing recorded
    torch.testing.assert_close(
        full.logprobs, logits.log_softmax(-1).gather(1, full.tokens[:, None])[:, 0]
    )
    with pytest.raises(ValueError):
        sample(logits, top_p=0.0)
