"""The learner's maths on a CUDA device. Run with `pytest -m gpu` (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from rl.learner import Learner, LearnerConfig, OptimConfig
from rl.logprobs import masked_logprobs, masked_logprobs_reference

pytestmark = pytest.mark.gpu


def test_chunked_logprobs_on_cuda_match_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 256, generator=g).cuda().requires_grad_()
    w = (torch.randn(129280, 256, generator=g) / 16).cuda().requires_grad_()
    t = torch.randint(0, 129280, (512,), generator=g).cuda()
    kept = (t[:, None] + torch.arange(20, device="cuda") * 7919) % 129280  # distinct ids
    kept[::3] = -1  # some untruncated rows
    a = masked_logprobs(h, w, t, kept)
    b = masked_logprobs_reference(h, w, t, kept)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    ga = torch.autograd.grad(a.sum(), (h, w))
    gb = torch.autograd.grad(b.sum(), (h, w))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


def test_bf16_gradients_track_fp32():
    """bf16 weights: each chunk's weight-gradient product is rounded once into the bf16
    accumulator; the result stays within bf16 precision of the float32 reference."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2048, 512, generator=g).cuda()
    w = (torch.randn(129280, 512, generator=g) / 22).cuda()
    t = torch.randint(0, 129280, (2048,), generator=g).cuda()
    ref_w = w.clone().requires_grad_()
    masked_logprobs_reference(h, ref_w, t, None).sum().backward()
    low_w = w.bfloat16().requires_grad_()
    masked_logprobs(h.bfloat16(), low_w, t, None, chunk_size=128).sum().backward()
    err = (low_w.grad.float() - ref_w.grad).norm() / ref_w.grad.norm()
    assert err < 2e-2, err


def test_learner_step_on_cuda_bf16(policy, sampler):
    batch = sampler(policy, [3, 17, 5, 42, 8], 4, [1.0, 0.0, 0.0, 0.0])
    learner = Learner(policy.cuda().to(torch.bfloat16), LearnerConfig(optim=OptimConfig(lr=1e-3)))
    metrics = learner.step(batch)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["logp_gap_max"] < 0.2


def assert_same_update(got: dict, want: dict, start: dict) -> None:
    """Two learners' weights after the same steps from `start` agree up to rounding: their
    distance is under 1e-3 of how far `want` moved (and it moved)."""
    moved = sum((want[k] - start[k]).double().norm() ** 2 for k in start) ** 0.5
    apart = sum((got[k] - want[k]).double().norm() ** 2 for k in start) ** 0.5
    assert moved > 0 and apart < 1e-3 * moved, (float(apart), float(moved))


def test_fused_adamw_on_cuda_updates_as_the_default_does(policy, sampler):
    """The one-process learner steps with fused AdamW on CUDA (docs/benchmarks.md: faster,
    without the default's parameter-sized temporary); in float32 its two updates are torch's
    default AdamW's up to rounding, small beside the updates themselves."""
    import copy

    batch = sampler(policy, [3, 17, 5, 42, 8], 4, [1.0, 0.0, 0.0, 0.0])
    start = {k: v.cuda() for k, v in policy.state_dict().items()}
    after = []
    for fused in (True, False):
        model = copy.deepcopy(policy).cuda()
        learner = type("L", (Learner,), {"fused_adamw": fused})(
            model, LearnerConfig(optim=OptimConfig(lr=1e-3))
        )
        assert learner.optimizer.defaults["fused"] is (True if fused else None)
        learner.step(batch)
        learner.step(batch)
        after.append(model.state_dict())
    fused, default = after
    assert_same_update(fused, default, start)


def test_sharded_learner_on_cuda_fuses_adamw_and_updates_as_one_process(policy, sampler):
    """ShardedLearner (FSDP2 in a one-rank NCCL group, as each rank of ray.learner_workers
    runs it) steps with fused AdamW on CUDA too (docs/benchmarks.md: 1.09-1.10x under FSDP2);
    in float32 its two updates are the one-process learner's up to rounding."""
    import copy
    import socket

    import torch.distributed as dist

    from rl.sharded import ShardedLearner

    batch = sampler(policy, [3, 17, 5, 42, 8], 4, [1.0, 0.0, 0.0, 0.0])
    start = {k: v.cuda() for k, v in policy.state_dict().items()}
    cfg = LearnerConfig(optim=OptimConfig(lr=1e-3))
    one = Learner(copy.deepcopy(policy).cuda(), cfg)
    one.step(batch)
    one.step(batch)
    want = one.policy.state_dict()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        sharded = ShardedLearner(copy.deepcopy(policy).cuda(), cfg)
        assert sharded.optimizer.defaults["fused"] is True
        sharded.step(batch)
        sharded.step(batch)
        got = {k: v.cuda() for k, v in sharded.full_state_dict().items()}
    finally:
        dist.destroy_process_group()
    assert_same_update(got, want, start)
