"""The quickstart learns: configs/quickstart.yaml as the README runs it (vLLM rollout workers in
Ray actors, all four stabilizers, 60 steps, fixed seed), from a fresh warm-start.

Slow (about 4 minutes on 2 CPU cores): `pytest -m slow tests/rl/test_quickstart.py`. Measured
when the test was written: mean reward 0.41 over the first 10 steps, 0.71 over the last 10.
The margin asserted, 0.15, is half the gain seen, so a run that learns at all passes and one
that does not (a broken advantage sign, a sampler/learner mismatch) fails.
"""

from __future__ import annotations

import os

import pytest

from rl.cli import main as cli
from rl.plot import read_metrics

MARGIN = 0.15


@pytest.mark.slow
def test_quickstart_reward_rises(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    run = tmp_path / "run"
    overrides = [f"trainer.output_dir={run}", f"warm_start.cache_dir={tmp_path / 'cache'}"]
    assert cli(["train", "configs/quickstart.yaml", *overrides]) == 0
    rewards = [v for _, v in read_metrics(run, ["reward_mean"])["reward_mean"]]
    assert len(rewards) == 60
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"\nquickstart mean reward: first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last > first + MARGIN
