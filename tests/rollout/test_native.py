"""The native engine: what it records is exactly what its policy computes.

float64 engines make "exactly" checkable: decode-time (absorbed MLA, KV cache) and
teacher-forced (MHA) log-probs then agree to ~1e-12, so the remaining gap is the float32 the
Trajectory stores log-probs in (1e-6 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy import save_pretrained
from policy.testing import tiny_policy
from rollout import Sampling
from rollout.native import NativeEngine
from rollout.sampling import kept_ids_of, truncate_logits

PROMPTS = [[5, 9, 2, 7], [11, 3], [8, 8, 1, 4, 6, 2]]


@pytest.fixture
def ckpt(tmp_path):
    def make(seed: int = 0, **overrides):
        path = tmp_path / f"policy-{seed}-{overrides.get('index_topk', 'd')}"
        save_pretrained(tiny_policy(seed, **overrides), path)
        return path

    return make


def _teacher_forced(engine: NativeEngine, traj, replay: bool = True):
    """Logits [tokens, V] and routing of one full forward over prompt + response."""
    seq = torch.tensor([traj.prompt_ids + traj.response_ids])
    routing = None
    if replay:
        rec = torch.from_numpy(traj.routing.astype(np.int64))
        pad = torch.arange(rec.shape[-1]).expand(seq.shape[1] - rec.shape[0], *rec.shape[1:])
        routing = torch.cat([rec, pad])[None]
    with torch.no_grad():
        out = engine.model(seq, replay_routing=routing)
    return out.logits[0].double(), out.routing[0]


def test_shapes_order_and_stop(ckpt):
    engine = NativeEngine(ckpt())
    sampling = Sampling(temperature=1.0, top_k=10, max_tokens=12, seed=0, stop_token_ids=(7,))
    trajs = engine.generate(PROMPTS, sampling, n=2)
    assert [t.prompt_index for t in trajs] == [0, 0, 1, 1, 2, 2]
    for t in trajs:
        assert t.prompt_ids == PROMPTS[t.prompt_index] and t.engine == "native"
        assert t.routing.shape == (t.num_tokens - 1, 1, 2) and t.routing.dtype == np.uint8
        assert len(t.logprobs) == len(t.kept_ids) == len(t.response_ids) <= 12
        assert all(len(k) <= 10 and r in k for k, r in zip(t.kept_ids, t.response_ids, strict=True))
        stopped = 7 in t.response_ids
        assert t.finish_reason == ("stop" if stopped else "length")
        assert not stopped or t.response_ids.index(7) == len(t.response_ids) - 1


@pytest.mark.parametrize("topk", [8, 256])  # 8: DSA selects a subset once past 8 tokens
def test_replayed_routing_reproduces_the_logprobs(ckpt, topk):
    engine = NativeEngine(ckpt(index_topk=topk), dtype=torch.float64)
    sampling = Sampling(temperature=0.8, top_p=0.9, top_k=40, max_tokens=20, seed=1)
    for t in engine.generate(PROMPTS, sampling, n=2):
        logits, routing = _teacher_forced(engine, t)
        p = len(t.prompt_ids)
        z = truncate_logits(logits[p - 1 : -1] / 0.8, 40, 0.9)
        lp = z.log_softmax(-1).gather(1, torch.tensor(t.response_ids)[:, None])[:, 0]
        np.testing.assert_allclose(lp.numpy(), t.logprobs, rtol=1e-6, atol=1e-7)
        # the recorded kept set is the one recomputed from the same logits
        recomputed = kept_ids_of(z)
        for j, kept in enumerate(t.kept_ids):
            assert set(kept.tolist()) == set(recomputed[j][recomputed[j] >= 0].tolist())
            assert t.response_ids[j] in kept
        # without replay the policy routes the same way (same weights, same numerics)
        _, own = _teacher_forced(engine, t, replay=False)
        agree = (own[:-1].sort(-1).values.numpy() == np.sort(t.routing, -1)).all(-1).mean()
        assert agree == 1.0


def test_left_padded_batch_equals_one_prompt_at_a_time(ckpt):
    # float64: a batch and a single row take different matmul shapes, whose float32 rounding
    # differs between CPUs and thread counts, enough to flip a near-tied greedy pick or top-k.
    engine = NativeEngine(ckpt(index_topk=8), dtype=torch.float64)
    greedy = Sampling(temperature=0.0, max_tokens=16)
    batched = engine.generate(PROMPTS, greedy)
    for i, p in enumerate(PROMPTS):
        alone = engine.generate([p], greedy)[0]
        assert alone.response_ids == batched[i].response_ids
        np.testing.assert_allclose(alone.logprobs, batched[i].logprobs, rtol=0, atol=1e-5)


def test_update_weights_equals_a_fresh_engine(ckpt):
    old, new = ckpt(seed=0), ckpt(seed=1)
    engine = NativeEngine(old)
    sampling = Sampling(temperature=1.0, top_k=20, max_tokens=10, seed=3)
    before = engine.generate(PROMPTS, sampling)
    assert engine.update_weights(new, version=7) == "in-place"
    after = engine.generate(PROMPTS, sampling)
    fresh = NativeEngine(new).generate(PROMPTS, sampling)
    assert [t.response_ids for t in after] == [t.response_ids for t in fresh]
    assert [t.response_ids for t in after] != [t.response_ids for t in before]
    for a, f in zip(after, fresh, strict=True):
        assert np.array_equal(a.logprobs, f.logprobs) and np.array_equal(a.routing, f.routing)
        assert a.weight_version == 7 and f.weight_version == 0


def test_too_long_is_an_error(ckpt):
    engine = NativeEngine(ckpt(max_position_embeddings=32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1] * 30], Sampling(max_tokens=8))


def test_release_holds_no_device_memory_on_the_cpu():
    engine = NativeEngine(tiny_policy())
    assert engine.release() is False and engine.resume() is False


@pytest.mark.gpu
def test_release_frees_the_device_and_resume_restores_the_same_sampler():
    """Colocated placement: the engine's weights leave the GPU while the learner steps, and
    come back to give the same greedy tokens."""
    engine = NativeEngine(tiny_policy(), device="cuda")
    greedy = Sampling(temperature=0.0, max_tokens=6)
    before = engine.generate([[1, 2, 3]], greedy)[0].response_ids
    held = torch.cuda.memory_allocated()
    assert engine.release() is True
    assert torch.cuda.memory_allocated() < held
    assert engine.resume() is True
    assert engine.generate([[1, 2, 3]], greedy)[0].response_ids == before
