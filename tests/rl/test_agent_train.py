"""`keeprl train` with multi-turn agent episodes (agent.environment): a run over a synthesized
environment family trains and stores each episode token-exact with its turns; a bad
environment path is one line at start."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("ray")

from rl.cli import main as cli  # noqa: E402
from rl.tracking import Tracker  # noqa: E402
from rollout.episode import episode_loss_mask  # noqa: E402
from rollout.store import RolloutStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIG = os.path.join(ROOT, "configs", "native-sparse.yaml")


def _args(run):
    return [
        f"trainer.output_dir={run}",
        "trainer.total_steps=2",
        "checkpoint.every=1",
        "warm_start.enabled=false",
        "agent.environment=rewards.agent.spec:lookup_family",
        "agent.max_turns=2",
        "agent.token_budget=600",
        "data.prompts_per_step=2",
        "rollout.samples_per_prompt=2",
        "rollout.sampling.max_tokens=8",
        "ray.num_cpus=2",
    ]


def test_an_agent_run_trains_and_stores_its_episodes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    assert cli(["train", CONFIG, *_args(run)]) == 0
    store = RolloutStore(run / "rollouts")
    assert store.steps() == [0, 1]
    step = store.read_step(1)
    assert len(step.trajectories) == 4 and sorted(set(step.group_ids)) == [2, 3]
    for t in step.trajectories:
        mask = episode_loss_mask(t)
        turns = t.extra["episode"]["turns"]
        assert turns[0][0] == "prompt" and turns[0][2] == len(t.prompt_ids)
        assert sum(mask) == sum(b - a for role, a, b in turns if role == "assistant") > 0
        generated = np.flatnonzero(mask[len(t.prompt_ids) :])
        assert (t.logprobs[generated] != 0).all()  # pi_old on every generated token
        assert t.routing.shape[0] >= t.num_tokens - 1
    # keeprl replay compares the generated turns only: the tool answers between them have no
    # pi_old, and counting them would report a mismatch of many nats.
    out = tmp_path / "replay.json"
    assert cli(["replay", str(run), "--step", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["response_tokens"] == sum(sum(episode_loss_mask(t)) for t in step.trajectories)
    assert report["variants"]["routing+mask"]["gap_max"] < 1e-4  # float32 native engine
    tracker = Tracker(run, experiment="keeprl")
    assert [s for s, _ in tracker.history("agent/turns")] == [0, 1]
    tracker.close()
    # keeprl inspect shows the episode turn by turn, with its reward and how it ended.
    capsys.readouterr()
    assert cli(["inspect", str(run), "--step", "1", "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "   prompt    tokens [0, " in out and "   assistant tokens [" in out
    assert "(episode ends: " in out and "reward " in out


def test_a_bad_environment_is_one_line_at_start(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    args = [*_args(run), "agent.environment=rewards.agent.spec:no_such_family"]
    assert cli(["train", CONFIG, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "agent.environment" in err and "no_such_family" in err
    assert not run.exists()


def test_the_v32_template_needs_its_special_tokens(tmp_path, monkeypatch, capsys):
    """DeepSeek-V3.2's chat format with the character tokenizer: one line at start."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    args = [*_args(run), "agent.chat_template=deepseek-v3.2"]
    assert cli(["train", CONFIG, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "deepseek-v3.2" in err and "special tokens" in err
    assert not run.exists()


def test_an_agent_run_evaluates_held_out_tasks_and_keeprl_eval_agrees(
    tmp_path, monkeypatch, capsys
):
    """An environment eval set in an agent run: its tasks run as episodes before the first
    step and after the last (greedy and 2 samples each), logged under eval/<set>/..., stored
    as Parquet with their turns (`keeprl inspect --eval` shows them), and `keeprl eval` of the
    final checkpoint gives the logged numbers."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    evals = [
        "eval.sets=[{name: held, environment: rewards.agent.spec:lookup_family, size: 3}]",
        "eval.samples=2",
        "eval.pass_k=[1, 2]",
        "agent.token_budget=1200",  # every first prompt fits (600 cuts some off at once)
    ]
    assert cli(["train", CONFIG, *_args(run), *evals]) == 0
    store = RolloutStore(run / "eval" / "held")
    assert store.steps() == [0, 2]
    stored = store.read_step(2)
    assert len(stored.trajectories) == 3 * (1 + 2)
    for t in stored.trajectories:
        assert t.extra["episode"]["turns"][0][0] == "prompt"
    tracker = Tracker(run)
    logged = {
        k: dict(tracker.history(f"eval/held/{k}"))
        for k in ("greedy/accuracy", "greedy/turns", "sampled/pass_at_2", "sampled/reward_mean")
    }
    tracker.close()
    assert all(sorted(v) == [0, 2] for v in logged.values()), logged
    assert logged["sampled/reward_mean"][2] == pytest.approx(
        float(np.mean([r for r, t in zip(stored.rewards, stored.trajectories, strict=True)
                       if t.sampling.temperature > 0]))
    )  # fmt: skip
    capsys.readouterr()
    assert cli(["inspect", str(run), "--eval", "held", "--step", "2", "--index", "0"]) == 0
    assert "(episode ends: " in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert cli(["eval", str(run), "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["step"] == 2
    for key, value in logged.items():
        assert got["metrics"][f"eval/held/{key}"] == pytest.approx(value[2], abs=1e-9), key
