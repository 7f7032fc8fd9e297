"""The learner end to end on the tiny policy: it learns, and each stabilizer's switch changes
the metrics the way it should."""

from __future__ import annotations

import copy

import pytest
import torch

from rl.learner import AlgorithmConfig as A
from rl.learner import Learner, LearnerConfig, lr_factor, micro_batches
from rl.learner import OptimConfig as O

PROMPT = [3, 17, 5, 42, 8]


def _response_logprob(learner: Learner, batch) -> torch.Tensor:
    """Sum of log pi_theta over each response (under the sampling mask) [B]."""
    with torch.no_grad():
        logp, _, _ = learner.token_logprobs(learner.policy, batch)
    return logp.sum(-1)


def test_sampling_mask_makes_the_ratio_exactly_one(policy, sampler):
    policy = policy.double()
    batch = sampler(policy, PROMPT, 3, [1.0, 0.0, 0.0])
    mask = batch.response_mask
    on = Learner(policy, LearnerConfig(algorithm=A(keep_sampling_mask=True)))
    off = Learner(policy, LearnerConfig(algorithm=A(keep_sampling_mask=False)))
    logp_on, _, _ = on.token_logprobs(policy, batch)
    logp_off, _, _ = off.token_logprobs(policy, batch)
    ratio_on = torch.exp(logp_on - batch.old_logprobs)[mask]
    ratio_off = torch.exp(logp_off - batch.old_logprobs)[mask]
    # old_logprobs are stored as float32: 1 up to float32 rounding of the sampler's numbers
    torch.testing.assert_close(ratio_on, torch.ones_like(ratio_on), rtol=0, atol=1e-6)
    # The full softmax puts mass on tokens the sampler could not draw: pi_theta < pi_old.
    assert (ratio_off < 1 - 1e-3).all() and ratio_off.mean() < 0.9
    assert on.step(batch)["logp_gap_max"] < 1e-6


def test_learner_raises_the_rewarded_response(policy, sampler):
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.0, 0.0])
    learner = Learner(policy, LearnerConfig(optim=O(lr=3e-3), algorithm=A(eps_high=0.28)))
    before = _response_logprob(learner, batch)
    for _ in range(6):
        metrics = learner.step(batch)
    after = _response_logprob(learner, batch)
    assert after[0] > before[0] + 1.0, (before, after)
    assert (after[1:] < before[1:]).all()
    assert metrics["clip_high_frac"] > 0  # the step-size limit engaged on the rewarded one
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_kl_switch(policy, sampler):
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.0, 0.0])
    plain = Learner(copy.deepcopy(policy), LearnerConfig(optim=O(lr=3e-3)))
    assert plain.reference is None and "kl" not in plain.step(batch)
    kl = Learner(copy.deepcopy(policy), LearnerConfig(optim=O(lr=3e-3), algorithm=A(beta=0.5)))
    first = kl.step(batch)["kl"]
    for _ in range(3):
        last = kl.step(batch)["kl"]
    assert first == pytest.approx(0.0, abs=1e-9) and last > 1e-4  # grows as the policy moves


def test_opsm_switch(policy, sampler):
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.0, 0.0])
    resp = batch.response_mask
    # A sampler that was much more confident than the learner on sequences 0 (A > 0) and 1
    # (A < 0): only the negative one may be masked.
    batch.old_logprobs[0][resp[0]] += 1.0
    batch.old_logprobs[1][resp[1]] += 1.0
    on = Learner(copy.deepcopy(policy), LearnerConfig(algorithm=A(opsm_delta=0.5)))
    off = Learner(copy.deepcopy(policy), LearnerConfig(algorithm=A(opsm=False)))
    assert on.step(batch)["opsm_masked_frac"] == pytest.approx(0.25)
    assert off.step(batch)["opsm_masked_frac"] == 0.0


def test_keep_routing_switch(policy, sampler):
    # The sampler routes with a different selection bias (as a stale or differently rounded
    # inference engine would); every other weight is identical.
    sampler_model = copy.deepcopy(policy)
    with torch.no_grad():
        sampler_model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    batch = sampler(sampler_model, PROMPT, 4, [1.0, 0.0, 0.0, 0.0])
    on = Learner(copy.deepcopy(policy), LearnerConfig(algorithm=A(keep_routing=True))).step(batch)
    off = Learner(copy.deepcopy(policy), LearnerConfig(algorithm=A(keep_routing=False))).step(batch)
    # Measured either way: with Keep Routing it is what the replay overrides. The only MoE
    # layer's input does not depend on routing, so both runs see the same disagreement.
    assert on["routing_disagreement"] == pytest.approx(off["routing_disagreement"])
    assert off["routing_disagreement"] > 0.1
    # Per MoE layer too (one here: a token differs in some layer iff it differs in that one).
    assert off["routing_disagreement/layer_0"] == off["routing_disagreement"]
    assert on["logp_gap_max"] < 1e-5 < off["logp_gap_max"]


def _step_capturing_grads(learner: Learner, batch) -> tuple[dict, dict]:
    grads: dict[str, torch.Tensor] = {}

    def record(*_):
        grads.update(
            {n: p.grad.clone() for n, p in learner.policy.named_parameters() if p.grad is not None}
        )

    learner.optimizer.register_step_pre_hook(record)
    return learner.step(batch), grads


def test_micro_batches_add_up_to_the_full_batch(policy, sampler):
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.5, 0.0])
    assert len(micro_batches(batch, 16)) == 4 and len(micro_batches(batch, 10**6)) == 1
    for aggregation in ("sequence", "token"):
        algorithm = A(aggregation=aggregation, beta=0.1)
        big, small = (
            Learner(
                copy.deepcopy(policy),
                LearnerConfig(optim=O(micro_batch_tokens=budget), algorithm=algorithm),
            )
            for budget in (10**6, 16)
        )
        (mb, gb), (ms, gs) = _step_capturing_grads(big, batch), _step_capturing_grads(small, batch)
        assert mb["loss"] == pytest.approx(ms["loss"], abs=1e-7)
        assert gb.keys() == gs.keys() and len(gb) > 10
        for name in gb:
            torch.testing.assert_close(gb[name], gs[name], rtol=1e-4, atol=1e-8, msg=name)


def test_activation_checkpointing_changes_nothing_but_memory(policy, sampler):
    """Recomputing each block in the backward gives the same loss, gradients and updated
    weights (float32: the recomputation repeats the forward's operations exactly; routing is
    replayed and the gates' top-k is deterministic)."""
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.5, 0.0])
    algorithm = A(beta=0.1)
    plain, ckpt = (
        Learner(
            copy.deepcopy(policy),
            LearnerConfig(optim=O(activation_checkpointing=on), algorithm=algorithm),
        )
        for on in (False, True)
    )
    assert ckpt.policy.activation_checkpointing and not plain.policy.activation_checkpointing
    (mp, gp), (mc, gc) = _step_capturing_grads(plain, batch), _step_capturing_grads(ckpt, batch)
    assert mp["loss"] == mc["loss"] and gp.keys() == gc.keys() and len(gp) > 10
    for name in gp:
        assert torch.equal(gp[name], gc[name]), name
    for a, b in zip(plain.policy.parameters(), ckpt.policy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bf16_step(policy, sampler):
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.0, 0.0])
    learner = Learner(policy.to(torch.bfloat16), LearnerConfig(optim=O(lr=1e-3)))
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = learner.step(batch)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["logp_gap_max"] < 0.2  # bf16 logits vs the fp32 sampler
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_lr_schedule():
    schedule = O(lr=1.0, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    cfg = LearnerConfig(optim=schedule, total_steps=6)
    got = [lr_factor(s, cfg) for s in range(7)]
    assert got[:3] == [0.5, 1.0, 1.0] and got[4] == pytest.approx(0.55) and got[6] == 0.1
    with pytest.raises(ValueError, match=r"cosine' needs more optimizer steps \(0\)"):
        LearnerConfig(optim=O(lr_schedule="cosine"))


def test_native_rollouts_feed_the_learner_exactly(tmp_path):
    """Trajectories from the native engine, through Batch.from_trajectories, give the learner
    pi_theta == pi_old at every sampled token (float64 policy; float32 storage of pi_old)."""
    from policy import Transformer, preset, save_pretrained
    from rl.batch import Batch
    from rollout import NativeEngine, Sampling

    torch.manual_seed(0)
    save_pretrained(Transformer(preset("tiny", index_topk=8)), tmp_path)
    engine = NativeEngine(tmp_path, dtype=torch.float64)
    sampling = Sampling(temperature=0.9, top_k=30, top_p=0.95, max_tokens=16, seed=0)
    trajs = engine.generate([[4, 8, 15], [16, 23, 42, 7]], sampling, n=3)
    batch = Batch.from_trajectories(trajs, [1.0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1])
    learner = Learner(engine.model, LearnerConfig())
    logp, _, routing = learner.token_logprobs(engine.model, batch)
    mask = batch.response_mask
    torch.testing.assert_close(logp[mask], batch.old_logprobs[mask].double(), rtol=1e-6, atol=1e-6)
    assert learner.step(batch)["logp_gap_max"] < 1e-5


def _slice_autograd_linear(x, weight, counts):
    """The experts' matmuls as autograd of W[e] slices: the path grouped_linear replaced."""
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        if c:
            outs.append(x[start : start + c] @ weight[e].t())
            start += c
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_routing", [True, False])
def test_grouped_experts_step_equals_the_slice_path(
    policy, sampler, monkeypatch, dtype, keep_routing
):
    """A whole learner step with the grouped experts against the per-expert-slice autograd
    path they replaced: the same loss and gradients (float32: 1e-5 relative; bf16: within the
    rounding of two evaluation orders, 2e-2) and, in float32, the same updated weights (to 1%
    of lr: Adam's first step amplifies last-bit differences of near-zero gradients)."""
    from policy import moe as moe_module

    lr = 1e-3
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.5, 0.0])
    cfg = LearnerConfig(optim=O(lr=lr), algorithm=A(keep_routing=keep_routing))
    results = []
    for linear in (moe_module.grouped_linear, _slice_autograd_linear):
        monkeypatch.setattr(moe_module, "grouped_linear", linear)
        learner = Learner(copy.deepcopy(policy).to(dtype), cfg)
        metrics, grads = _step_capturing_grads(learner, batch)
        weights = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
        results.append((metrics, grads, weights))
    (m1, g1, w1), (m2, g2, w2) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert m1["loss"] == pytest.approx(m2["loss"], rel=tol, abs=1e-6)
    assert g1.keys() == g2.keys() and any("experts" in n for n in g1)
    for name in g1:
        diff = (g1[name].double() - g2[name].double()).norm()
        assert diff <= tol * g2[name].double().norm() + 1e-12, name
    if dtype == torch.float32:
        for name in w1:
            torch.testing.assert_close(w1[name], w2[name], rtol=0, atol=0.01 * lr, msg=name)
