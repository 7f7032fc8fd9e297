"""Ray rollout workers: a full prompt-major batch from two workers, workers that die mid-batch
(their own process exits, or ray.kill from outside) replaced with every prompt still returned,
bounded retries, and weight pushes that reach every worker including replacements.

One local Ray instance and one two-worker pool of real native engines (tiny policy, CPU) serve
the whole module; tests push the weights they need first, so they do not depend on order.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# The GPU image lacks ray; there this module is skipped, not a collection error.
pytest.importorskip("ray")

import ray
import torch

import policy
from rollout.native import NativeEngine
from rollout.trajectory import Sampling, Trajectory
from rollout.worker import EngineSpec, RolloutPool, WorkerDiedError, resolve_engine, split_shards

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]

# The test engine below is defined here, in a module Ray's workers cannot import by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ControlledEngine:
    """A NativeEngine that files in a control directory can slow down or kill, from outside:
    `delay` (seconds to sleep before generating), `die-once` (the first generate to claim it
    exits its process), `die-always` (every generate exits). Each generate first touches
    `started.<pid>`."""

    def __init__(self, checkpoint_dir: str, *, control: str, **kwargs) -> None:
        self.inner = NativeEngine(checkpoint_dir, **kwargs)
        self.control = Path(control)
        self.name = self.inner.name

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version

    def update_weights(self, source, version: int) -> str:
        return self.inner.update_weights(source, version)

    def generate(self, prompts, sampling, n=1) -> list[Trajectory]:
        (self.control / f"started.{os.getpid()}").touch()
        delay = self.control / "delay"
        if delay.exists():
            time.sleep(float(delay.read_text()))
        try:  # rename is atomic: exactly one worker process wins the claim
            os.rename(self.control / "die-once", self.control / "died")
            os._exit(1)
        except FileNotFoundError:
            pass
        if (self.control / "die-always").exists():
            os._exit(1)
        return self.inner.generate(prompts, sampling, n)


class BucketLearner:
    """What the pool asks of a learner actor for a streamed sync, over a saved policy: its
    buckets (rl/weights.py), and a weight version it checks."""

    def __init__(self, checkpoint_dir: str, version: int) -> None:
        from rl.weights import WeightVersion

        self.model = policy.load_pretrained(checkpoint_dir)
        self.versions = WeightVersion(version, 1)

    def weight_bucket_names(self, bucket_bytes: int, version: int) -> list[list[str]]:
        from rl.weights import bucket_names

        self.versions.check(version)
        return bucket_names(self.model, bucket_bytes)

    def weight_bucket(self, names: list[str], version: int) -> dict:
        from rl.weights import gather_bucket

        self.versions.check(version)
        return gather_bucket(self.model, names)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    models = {}
    for version, seed in ((0, 0), (1, 1)):
        torch.manual_seed(seed)
        models[version] = policy.Transformer(policy.preset("tiny"))
        policy.save_pretrained(models[version], root / f"v{version}")
    return SimpleNamespace(
        v0=str(root / "v0"), v1=str(root / "v1"), state_v1=models[1].state_dict()
    )


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return tmp_path_factory.mktemp("control")


@pytest.fixture(scope="module")
def pool(ckpts, control):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    spec = EngineSpec(ControlledEngine, ckpts.v0, {"control": str(control)})
    p = RolloutPool(spec, num_workers=2, num_cpus=0.5)
    yield p
    p.shutdown()
    ray.shutdown()


@pytest.fixture(autouse=True)
def clean_control(request):
    yield
    if "control" in request.fixturenames:
        for f in request.getfixturevalue("control").iterdir():
            f.unlink()


def local_reference(ckpt: str, prompts, sampling: Sampling, n: int, shards) -> list[Trajectory]:
    """What the pool must return: one in-process engine run over the same shards, each with
    the pool's per-shard seed."""
    engine, out = NativeEngine(ckpt), []
    for a, b in shards:
        seed = None if sampling.seed is None else sampling.seed + a
        out += engine.generate(prompts[a:b], dataclasses.replace(sampling, seed=seed), n)
    return out


def assert_same_tokens(got: list[Trajectory], want: list[Trajectory]) -> None:
    assert [t.response_ids for t in got] == [t.response_ids for t in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=1e-5, atol=1e-6)
        assert [k.tolist() for k in g.kept_ids] == [k.tolist() for k in w.kept_ids]


def assert_full_batch(out: list[Trajectory], n: int) -> None:
    assert len(out) == len(PROMPTS) * n
    assert [t.prompt_index for t in out] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    assert [t.prompt_ids for t in out] == [
        PROMPTS[i] for i in range(len(PROMPTS)) for _ in range(n)
    ]


# --- no Ray needed -------------------------------------------------------------------------


def test_engine_spec_is_small_and_picklable(ckpts):
    spec = EngineSpec.of(("native", ckpts.v0, {"device": "cpu"}))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert len(pickle.dumps(spec)) < 1000  # the engine itself is built inside the actor
    assert resolve_engine("native") is NativeEngine
    assert resolve_engine("rollout.native:NativeEngine") is NativeEngine
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        resolve_engine("sglang")
    with pytest.raises(ValueError, match="expected"):
        EngineSpec.of(("native",))


def test_shards_cover_every_prompt_once():
    assert split_shards(5, 2) == [(0, 2), (2, 5)]
    assert split_shards(1, 4) == [(0, 1)]
    for n_prompts in range(1, 12):
        for n_shards in range(1, 6):
            shards = split_shards(n_prompts, n_shards)
            covered = [i for a, b in shards for i in range(a, b)]
            assert covered == list(range(n_prompts))
            sizes = [b - a for a, b in shards]
            assert max(sizes) - min(sizes) <= 1


def test_pool_passes_the_cluster_address_to_ray_init(monkeypatch, ckpts):
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        RolloutPool(("native", ckpts.v0), address="ray://head:10001", ray_init_kwargs={"x": 1})
    assert seen == {"address": "ray://head:10001", "x": 1}


# --- on the shared pool --------------------------------------------------------------------


def test_two_workers_return_the_full_batch_in_prompt_major_order(pool, ckpts):
    pool.update_weights(ckpts.v0, version=3)
    sampling = Sampling(temperature=1.0, top_k=6, max_tokens=6, seed=11)
    out = pool.generate(PROMPTS, sampling, n=3)
    assert_full_batch(out, n=3)
    assert {t.weight_version for t in out} == {3}
    assert all(len(k) > 0 for t in out for k in t.kept_ids)
    # Same tokens as one engine run over the same shards: nothing reordered, dropped or mixed.
    want = local_reference(ckpts.v0, PROMPTS, sampling, 3, split_shards(len(PROMPTS), 2))
    assert_same_tokens(out, want)


def test_worker_process_exit_mid_batch_reissues_its_prompts(pool, ckpts, control):
    pool.update_weights(ckpts.v0, version=4)
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=8, max_tokens=5, seed=5)
    before = pool.generate(PROMPTS, sampling, n=2)
    restarts = pool.restarts
    (control / "die-once").touch()
    out = pool.generate(PROMPTS, sampling, n=2)
    assert (control / "died").exists(), "no worker died: the test did not test anything"
    assert pool.restarts == restarts + 1
    assert_full_batch(out, n=2)
    # The re-issued shard kept its seed, so the batch is the one a crash-free run gives.
    assert_same_tokens(out, before)


def test_ray_kill_mid_batch_still_returns_every_prompt(pool, ckpts, control):
    pool.update_weights(ckpts.v0, version=5)
    (control / "delay").write_text("1.5")
    victim, restarts = pool.workers[0], pool.restarts

    def kill_when_generating() -> None:
        deadline = time.monotonic() + 30
        while not any(control.glob("started.*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        (control / "delay").unlink()  # the replacement need not wait
        ray.kill(victim)

    killer = threading.Thread(target=kill_when_generating)
    killer.start()
    out = pool.generate(PROMPTS, Sampling(temperature=0.0, max_tokens=4), n=2)
    killer.join()
    assert pool.restarts == restarts + 1 and pool.workers[0] is not victim
    assert_full_batch(out, n=2)
    assert {t.weight_version for t in out} == {5}


def test_weight_push_reaches_every_worker_including_a_replacement(pool, ckpts, control):
    assert pool.update_weights(ckpts.state_v1, version=7) == "in-place"
    assert pool.weight_versions() == [7, 7] and pool.weight_version == 7
    restarts = pool.restarts
    (control / "die-once").touch()
    greedy = Sampling(temperature=0.0, max_tokens=6)
    out = pool.generate(PROMPTS, greedy, n=1)
    assert (control / "died").exists() and pool.restarts == restarts + 1
    assert pool.weight_versions() == [7, 7]  # the replacement was brought to version 7
    assert_full_batch(out, n=1)
    assert {t.weight_version for t in out} == {7}
    assert_same_tokens(out, local_reference(ckpts.v1, PROMPTS, greedy, 1, [(0, len(PROMPTS))]))
    # A checkpoint directory is pushed by path; every worker reads it.
    assert pool.update_weights(ckpts.v0, version=8) == "in-place"
    assert pool.weight_versions() == [8, 8]
    # An ObjectRef (as a learner actor would return) is passed on without a driver copy.
    assert pool.update_weights(ray.put(ckpts.state_v1), version=9) == "in-place"
    assert pool.weight_versions() == [9, 9]
    assert_same_tokens(pool.generate(PROMPTS, greedy), out)


def test_streamed_weights_reach_every_worker_including_a_replacement(pool, ckpts, control):
    pool.update_weights(ckpts.v0, version=10)
    learner = ray.remote(BucketLearner).options(num_cpus=0).remote(ckpts.v1, 11)
    # 64 KiB buckets: the tiny policy arrives in many pieces.
    assert pool.stream_weights(learner, 11, bucket_bytes=64 << 10) == "in-place"
    assert pool.weight_versions() == [11, 11] and pool.weight_version == 11
    restarts = pool.restarts
    (control / "die-once").touch()
    greedy = Sampling(temperature=0.0, max_tokens=6)
    out = pool.generate(PROMPTS, greedy, n=1)
    assert (control / "died").exists() and pool.restarts == restarts + 1
    assert pool.weight_versions() == [11, 11]  # the replacement got the streamed weights
    assert {t.weight_version for t in out} == {11}
    assert_same_tokens(out, local_reference(ckpts.v1, PROMPTS, greedy, 1, [(0, len(PROMPTS))]))
    # A sync of weights the learner does not hold fails before anything is sent; the workers
    # keep serving what they had.
    with pytest.raises(RuntimeError, match="learner holds version 11"):
        pool.stream_weights(learner, 12, bucket_bytes=64 << 10)
    assert pool.weight_versions() == [11, 11]
    ray.kill(learner)


def test_an_engine_error_is_raised_not_retried(pool, ckpts):
    pool.update_weights(ckpts.v0, version=9)
    restarts = pool.restarts
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pool.generate([[1] * 10], Sampling(max_tokens=100_000))
    assert pool.restarts == restarts


def test_workers_that_keep_dying_give_a_clear_error_then_the_pool_heals(
    pool, ckpts, control, monkeypatch
):
    pool.update_weights(ckpts.v0, version=10)
    (control / "die-always").touch()
    monkeypatch.setattr(pool, "max_restarts", 1)
    with pytest.raises(
        WorkerDiedError, match=r"died 2 times .*still missing: \[\[0, 3\], \[3, 6\]\]"
    ):
        pool.generate(PROMPTS, Sampling(temperature=0.0, max_tokens=3))
    (control / "die-always").unlink()
    monkeypatch.setattr(pool, "max_restarts", 3)
    out = pool.generate(PROMPTS, Sampling(temperature=0.0, max_tokens=3), n=2)
    assert_full_batch(out, n=2)
    assert {t.weight_version for t in out} == {10}
    assert pool.weight_versions() == [10, 10]
