"""The quickstart learns: configs/quickstart.yaml as the README runs it (vLLM rollout workers in
Ray actors, all four stabilizers, 60 steps, fixed seed), from a fresh warm-start; its held-out
set is evaluated at steps 0, 20, 40 and 60, and `keeprl eval` on the initial and final policies
gives the numbers the run logged at those steps.

Slow (about 6 minutes on 2 CPU cores): `pytest -m slow tests/rl/test_quickstart.py`. Measured
when the test was written: mean reward 0.50 over the first 10 steps, 0.73 over the last 10.
The margin asserted is about two thirds of that gain and below the gains of two other seeds
(0.19, 0.22), so a run that learns passes and one that does not (a broken advantage sign, a
sampler/learner mismatch) fails. The held-out accuracy is not asserted to rise: it rose on this
seed (greedy 0.06 -> 0.17) and on seed 2 (0.30 -> 0.36) but fell on seed 1 (0.42 -> 0.38),
as GRPO here learns the facts it trains on (docs/eval.md); a margin on it would test the seed.
"""

from __future__ import annotations

import json

import pytest

from rl.cli import main as cli
from rl.plot import read_metrics

MARGIN = 0.15


@pytest.mark.slow
def test_quickstart_reward_rises(tmp_path, fresh_run):
    run, rewards = fresh_run("configs/quickstart.yaml")
    assert len(rewards) == 60
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    print(f"\nquickstart mean reward: first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last > first + MARGIN

    key = "eval/heldout/greedy/accuracy"
    held = read_metrics(run, [key, "eval/heldout/sampled/pass_at_1"])
    assert [s for s, _ in held[key]] == [0, 20, 40, 60]
    print(f"held-out accuracy (greedy) at steps 0, 20, 40, 60: {[v for _, v in held[key]]}")
    for step in (0, 60):
        report = tmp_path / f"eval{step}.json"
        assert cli(["eval", str(run), "--step", str(step), "--json", str(report)]) == 0
        got = json.loads(report.read_text())["metrics"]
        logged = read_metrics(run, list(got))
        for k, v in got.items():
            assert dict(logged[k])[step] == pytest.approx(v, abs=1e-9), (step, k)
