"""Each GRPO formula against a hand-worked example, and the unbiased KL estimator's
expectation and gradient against the exact KL (Monte Carlo, fixed seed)."""

from __future__ import annotations

import math

import pytest
import torch

from rl.advantage import group_advantages
from rl.kl import k3_kl, unbiased_kl
from rl.loss import LossConfig, grpo_token_loss, token_weights
from rl.masks import opsm_keep


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 1.0])
    groups = torch.tensor([7, 7, 3, 7, 3, 3])  # not contiguous, not sorted
    adv = group_advantages(rewards, groups)
    torch.testing.assert_close(adv, torch.tensor([1 / 3, -2 / 3, -2.0, 1 / 3, 3.0, -1.0]))
    std7, std3 = math.sqrt(1 / 3), math.sqrt(7.0)  # unbiased stds of {1,0,1} and {0,5,1}
    torch.testing.assert_close(
        group_advantages(rewards, groups, std_normalize=True),
        torch.tensor([1 / 3 / std7, -2 / 3 / std7, -2 / std3, 1 / 3 / std7, 3 / std3, -1 / std3]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert group_advantages(torch.tensor([2.0]), torch.tensor([0])).item() == 0.0


def test_unbiased_kl_by_hand():
    lp, old, ref = math.log(0.5), math.log(0.25), math.log(0.4)
    got = unbiased_kl(torch.tensor(lp), torch.tensor(old), torch.tensor(ref))
    want = (0.5 / 0.25) * (0.4 / 0.5 - math.log(0.4 / 0.5) - 1)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert k3_kl(torch.tensor(lp), torch.tensor(ref)).item() == pytest.approx(want / 2, rel=1e-6)


def test_unbiased_kl_expectation_and_gradient_match_exact_kl():
    gen = torch.Generator().manual_seed(0)
    theta = torch.tensor([0.3, -1.0, 0.8, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.0, 0.5, -0.5, 1.0, 0.2], dtype=torch.float64).log_softmax(0)
    ref = torch.tensor([1.0, -0.2, 0.0, 0.3, -1.0], dtype=torch.float64).log_softmax(0)
    logp = theta.log_softmax(0)
    exact = (logp.exp() * (logp - ref)).sum()  # KL(pi_theta || pi_ref)
    (exact_grad,) = torch.autograd.grad(exact, theta, retain_graph=True)

    x = torch.multinomial(old.exp(), 400_000, replacement=True, generator=gen)  # from pi_old
    est = unbiased_kl(logp[x], old[x], ref[x]).mean()
    (est_grad,) = torch.autograd.grad(est, theta, retain_graph=True)
    assert est.item() == pytest.approx(exact.item(), abs=3e-3)
    torch.testing.assert_close(est_grad, exact_grad, rtol=0, atol=1e-2)
    # Plain K3 on samples from pi_old is biased: it measures the wrong expectation.
    assert abs(k3_kl(logp[x], ref[x]).mean().item() - exact.item()) > 0.03  # 10x the tolerance


def test_opsm_by_hand():
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    old = torch.tensor([[-0.5, -0.5, 9.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]]).bool()  # 9.0s are padding
    adv = torch.tensor([-1.0, 1.0, -0.5])
    # drift per sequence: 0.5, 0.5, 1.0 (padding ignored)
    assert opsm_keep(logp, old, adv, mask, 0.4).tolist() == [False, True, False]
    assert opsm_keep(logp, old, adv, mask, 0.7).tolist() == [True, True, False]
    assert opsm_keep(logp, old, adv, mask, float("inf")).all()
    # the policy moving TOWARDS the sample (negative drift) never masks
    assert opsm_keep(old, logp, adv, mask, 0.0).all()


def test_grpo_token_loss_by_hand():
    cfg = LossConfig(eps_low=0.2, eps_high=0.28, beta=0.1)
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 1.0]]))  # ratios
    ref = torch.zeros(2, 3)
    adv = torch.tensor([2.0, -1.0])
    keep = torch.tensor([True, True])
    loss, info = grpo_token_loss(logp, old, adv, keep, ref, cfg)
    r = logp.exp()
    kl = r * (1 / r - torch.log(1 / r) - 1)
    want_pg = torch.tensor([[-1.28 * 2, -0.9 * 2, -2.0], [0.8 * 1, 1.1 * 1, 1.0]])
    torch.testing.assert_close(loss, want_pg + 0.1 * kl)
    assert info["clip_high"].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert info["clip_low"].tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    masked, _ = grpo_token_loss(logp, old, adv, torch.tensor([True, False]), ref, cfg)
    torch.testing.assert_close(masked[1], 0.1 * kl[1])  # OPSM drops only the clipped term


def test_token_weights_sum_to_batch_means():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    seq = token_weights(mask, "sequence", n_seqs=2, n_tokens=6)
    tok = token_weights(mask, "token", n_seqs=2, n_tokens=6)
    assert seq.tolist() == [[0.25, 0.25, 0, 0], [0.125] * 4]
    assert tok.sum().item() == pytest.approx(1.0) and seq.sum().item() == pytest.approx(1.0)
