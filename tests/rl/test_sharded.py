"""The sharded learner (rl/sharded.py): 2 Ray actors on gloo, the policy under FSDP2, against
one process on the same batch: loss, every gradient and the updated weights, with Keep
Routing and Keep Sampling Mask on (the masked log-probs) and the KL term's reference model."""

from __future__ import annotations

import copy

import pytest
import torch

ray = pytest.importorskip("ray")

from policy import save_pretrained  # noqa: E402
from rl.learner import AlgorithmConfig, Learner, LearnerConfig, OptimConfig  # noqa: E402
from rl.sharded import ShardedLearnerGroup  # noqa: E402

PROMPT = [3, 17, 5, 42, 8]
LR = 1e-3


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _single(policy, cfg, batch):
    learner = Learner(copy.deepcopy(policy), cfg)
    grads: dict[str, torch.Tensor] = {}

    def record(*_):
        grads.update(
            {n: p.grad.clone() for n, p in learner.policy.named_parameters() if p.grad is not None}
        )

    learner.optimizer.register_step_pre_hook(record)
    metrics = learner.step(batch)
    return metrics, grads, learner.policy.state_dict()


@pytest.mark.parametrize("beta", [0.0, 0.1], ids=["no-kl", "kl"])
def test_two_ranks_equal_one_process(cluster, tmp_path, policy, sampler, beta):
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.5, 0.0])
    assert batch.routing is not None and batch.kept_ids is not None
    cfg = LearnerConfig(
        optim=OptimConfig(lr=LR, micro_batch_tokens=16), algorithm=AlgorithmConfig(beta=beta)
    )
    m1, g1, w1 = _single(policy, cfg, batch)
    save_pretrained(policy, tmp_path / "policy")
    group = ShardedLearnerGroup(2, str(tmp_path / "policy"), cfg, "float32", "cpu", num_cpus=1)
    try:
        m2, g2 = group.step(batch, capture_grads=True)
        w2 = group.state_dict()
        # The streamed sync's buckets, each gathered from the two ranks' shards on its own,
        # are the same weights; a sync of any other version is refused.
        buckets = group.weight_bucket_names(64 << 10, 1)
        assert len(buckets) > 1
        streamed = {}
        for names in buckets:
            streamed.update(group.weight_bucket(names, 1))
        with pytest.raises(RuntimeError, match="learner holds version 1"):
            group.weight_bucket_names(64 << 10, 0)
    finally:
        group.shutdown()
    assert list(streamed) == list(w2)
    for name in w2:
        torch.testing.assert_close(streamed[name], w2[name], rtol=0, atol=0, msg=name)
    # The same sums in another order (two ranks' partial sums, then the reduction): float32
    # rounding apart, equal.
    for key in ("loss", "logp_gap_mean", "entropy", "ratio_mean", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    assert m2["routing_disagreement"] == m1["routing_disagreement"]
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-7, msg=name)
    assert w1.keys() == w2.keys()
    # Adam's first step moves a weight by lr * g / (|g| + eps): near-zero gradients (|g| of
    # ~1e-7, where the ranks' float32 sums differ in the last bits) move by visibly different
    # fractions of lr. Bound the difference by 1% of the step, lr.
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=0.01 * LR, msg=name)
    before = policy.state_dict()
    moved = [n for n in w1 if (w1[n] - before[n]).abs().max() > 0.5 * LR]
    assert len(moved) > 10  # the step moved the weights by about lr, far above that bound


def test_train_with_two_ranks_resumes_on_one_and_back(tmp_path, monkeypatch, small_run):
    """`keeprl train` with ray.learner_workers=2: its checkpoints (each rank's optimizer shards,
    the weights gathered to rank 0) resume on one learner process, and that run's on two ranks
    again."""
    import os

    from rl import checkpoint as ckpt
    from rl.cli import main as cli

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    config = "configs/native-sparse.yaml"
    run, cache = tmp_path / "run", tmp_path / "cache"
    two = ["ray.learner_workers=2", "ray.learner_cpus=0.5", "ray.rollout_cpus=0.5"]
    assert cli(["train", config, *small_run(run, cache, 2), *two]) == 0
    assert ckpt.latest(run).name == "step_000001"
    # two ranks' optimizer shards (torch.distributed.checkpoint), listed in the manifest
    manifest = (ckpt.latest(run) / ckpt.MANIFEST).read_text()
    assert manifest.count(".distcp") == 2 and "optimizer/.metadata" in manifest
    assert cli(["train", config, *small_run(run, cache, 3), "--resume"]) == 0
    assert ckpt.latest(run).name == "step_000002"
    _, one = ckpt.load_state(ckpt.latest(run), restore_rng=False)
    assert one["optimizer_format"] == "by-name" and one["optimizer"]["state"]
    assert cli(["train", config, *small_run(run, cache, 4), *two, "--resume"]) == 0
    state, learner = ckpt.load_state(ckpt.latest(run), restore_rng=False)
    # 4 batches of algorithm.updates_per_batch = 4 optimizer steps (configs/native-sparse.yaml)
    assert state.step == 3 and learner["steps"] == 16 and learner["optimizer_format"] == "dcp"


def test_two_ranks_in_bf16(cluster, tmp_path, policy, sampler):
    """bf16 parameters under FSDP2 (gradients reduce-scattered in float32, then kept in bf16):
    loss and gradients agree with one bf16 process within bf16 rounding. (With two ranks a
    bf16 reduction would pass too; what float32 buys shows at many ranks.)"""
    policy = policy.to(torch.bfloat16)
    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.5, 0.0])
    cfg = LearnerConfig(optim=OptimConfig(lr=LR, micro_batch_tokens=16))
    m1, g1, _ = _single(policy, cfg, batch)
    save_pretrained(policy, tmp_path / "policy")
    group = ShardedLearnerGroup(2, str(tmp_path / "policy"), cfg, "bfloat16", "cpu", num_cpus=1)
    try:
        m2, g2 = group.step(batch, capture_grads=True)
    finally:
        group.shutdown()
    assert m2["loss"] == pytest.approx(m1["loss"], rel=2e-2, abs=1e-3)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert g2[name].dtype == torch.bfloat16, name
        err = (g2[name].double() - g1[name].double()).norm()
        assert err <= 3e-2 * g1[name].double().norm() + 1e-6, name


def test_a_rank_that_dies_mid_step_fails_the_step_at_once(cluster, tmp_path, policy, sampler):
    """The survivors would wait in their collectives for the group's 10-minute timeout; the
    group instead fails the step as soon as a rank's process is gone, naming it."""
    import threading
    import time

    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.5, 0.0])
    save_pretrained(policy, tmp_path / "policy")
    cfg = LearnerConfig(optim=OptimConfig(lr=LR, micro_batch_tokens=16))
    group = ShardedLearnerGroup(2, str(tmp_path / "policy"), cfg, "float32", "cpu", num_cpus=1)
    killer = threading.Timer(0.3, group.kill_rank, args=(1,))
    start = time.time()
    killer.start()
    with pytest.raises(RuntimeError, match="learner rank 1 of 2 died during step"):
        for _ in range(20):  # steps until the kill lands inside one
            group.step(batch)
    assert time.time() - start < 120
    killer.join()


def test_optimizer_shards_load_in_one_process(cluster, tmp_path, policy, sampler):
    """Two ranks step and checkpoint (optimizer shards by torch.distributed.checkpoint); one
    process loads those shards and holds the moments a one-process step produces."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    from rl import checkpoint as ckpt

    batch = sampler(policy, PROMPT, 4, [1.0, 0.0, 0.5, 0.0])
    cfg = LearnerConfig(optim=OptimConfig(lr=LR, micro_batch_tokens=16))
    single = Learner(copy.deepcopy(policy), cfg)
    single.step(batch)
    save_pretrained(policy, tmp_path / "policy")
    group = ShardedLearnerGroup(2, str(tmp_path / "policy"), cfg, "float32", "cpu", num_cpus=1)
    try:
        group.step(batch)
        path = group.save_checkpoint(str(tmp_path / "run"), ckpt.RunState(0, 0, 1, {}), 2)
    finally:
        group.shutdown()
    _, learner_state = ckpt.load_state(ckpt.latest(tmp_path / "run"), restore_rng=False)
    assert path.endswith("step_000000") and learner_state["optimizer_format"] == "dcp"
    fresh = Learner(copy.deepcopy(policy), cfg)
    fresh.load_state_dict(learner_state)
    full = StateDictOptions(full_state_dict=True)
    want = get_optimizer_state_dict(single.policy, single.optimizer, options=full)["state"]
    got = get_optimizer_state_dict(fresh.policy, fresh.optimizer, options=full)["state"]
    assert fresh.steps == single.steps == 1 and len(want) > 10
    # The moments of gradients that match to rtol 1e-4 / atol 1e-7 (test above): exp_avg =
    # 0.1 g, exp_avg_sq = 0.001 g^2 (twice g's relative error).
    for name, moments in want.items():
        assert torch.equal(got[name]["step"], moments["step"]), name
        torch.testing.assert_close(got[name]["exp_avg"], moments["exp_avg"], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(
            got[name]["exp_avg_sq"], moments["exp_avg_sq"], rtol=1e-3, atol=1e-12
        )
