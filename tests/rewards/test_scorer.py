"""Batch scoring: verifiers that raise, hang or return garbage become recorded failures with
reward 0, and the batch still returns within its timeout."""

import asyncio
import os
import sys
import time

import pytest

import rewards
from rewards import Sample, Scorer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
V = "rewards_test_verifiers"
SAMPLES = [Sample("p", f"response {i}", {"answer": str(i)}) for i in range(6)]


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        ("raises", "raised ValueError: boom"),
        ("returns_string", "garbage"),
        ("returns_nan", "garbage"),
        ("exits", "SystemExit"),
        ("sleeps_forever", "timeout"),
        ("async_sleeps_forever", "timeout"),
    ],
)
def test_bad_verifier_is_recorded_and_batch_finishes_on_time(name, failure):
    start = time.monotonic()
    scores = rewards.score_batch(f"{V}:{name}", SAMPLES, timeout_s=0.5, max_concurrency=3)
    assert time.monotonic() - start < 0.5 * 2 + 1.0  # two waves of 3, plus slack
    assert len(scores) == len(SAMPLES)
    for score in scores:
        assert score.reward == 0.0 and failure in score.failure


def test_mixed_batch_keeps_good_results():
    verifier = rewards.get(f"{V}:by_length")
    scores = rewards.score_batch(verifier, SAMPLES, timeout_s=5)
    assert [s.reward for s in scores] == [1.0] * 6
    assert all(s.failure is None and s.subscores["chars"] == 10.0 for s in scores)


def test_kwargs_and_async_verifiers():
    assert rewards.score_batch(f"{V}:constant", SAMPLES[:2], kwargs={"value": 0.3})[0].reward == 0.3
    assert rewards.score_batch(f"{V}:async_half", SAMPLES[:2])[1].reward == 0.5
    with Scorer(f"{V}:score_object", kwargs={"bonus": 0.5}) as scorer:
        assert [s.reward for s in scorer.score(SAMPLES[:2])] == [0.75, 0.75]


def test_scorer_inside_a_running_event_loop():
    async def main():
        scorer = Scorer(f"{V}:by_length", timeout_s=5)
        return await scorer.score_async(SAMPLES)

    assert len(asyncio.run(main())) == 6


def test_hung_threads_are_left_running_and_counted():
    import rewards_test_verifiers as helpers

    scores = rewards.score_batch(f"{V}:blocks_until_released", SAMPLES[:2], timeout_s=0.2)
    assert all("timeout" in s.failure for s in scores)
    hung = list(helpers.BLOCKED)
    assert len(hung) == 2 and all(t.is_alive() and t.daemon for t in hung)
    assert rewards.live_verifier_threads() >= 2
    helpers.RELEASE.set()  # a late result is dropped: nobody is waiting any more
    for thread in hung:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_process_isolation_kills_hung_verifiers():
    # A pure-Python spin holds the GIL share of its thread forever; in a worker process it
    # is killed at the timeout and the worker replaced.
    with Scorer(f"{V}:spins_forever", timeout_s=1.0, isolation="process", max_concurrency=2) as s:
        start = time.monotonic()
        scores = s.score(SAMPLES[:2])
        assert time.monotonic() - start < 10  # worker start-up (spawn) included
        assert all("worker killed" in sc.failure for sc in scores)
        assert not s._idle  # killed workers are not reused
    with Scorer(f"{V}:by_length", isolation="process", max_concurrency=2) as s:
        first = s.score(SAMPLES)
        second = s.score(SAMPLES)  # same warm workers
        assert [x.reward for x in first + second] == [1.0] * 12
        assert len(s._idle) <= 2


def test_process_isolation_needs_a_spec():
    with pytest.raises(ValueError, match="spec"):
        Scorer(rewards.get(f"{V}:constant"), isolation="process")
    with pytest.raises(ValueError, match="isolation"):
        Scorer(f"{V}:constant", isolation="fiber")


def test_reward_worker_takes_dicts_and_returns_dicts():
    from rewards.worker import RewardWorker

    worker = RewardWorker([{"name": "math"}, {"name": f"{V}:raises", "weight": 0.5}])
    out = worker.score([{"prompt": "p", "response": "\\boxed{3}", "reference": {"answer": "3"}}])
    worker.close()
    assert out[0]["reward"] == pytest.approx(1.0 / 1.5)
    assert "ValueError: boom" in out[0]["failure"] and out[0]["applied"] is True
