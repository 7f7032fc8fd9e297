"""A run with a held-out eval set: evaluated before the first step and after each `every`
steps on the rollout workers, logged to MLflow under eval/<set>/..., stored as Parquet that
`keeprl inspect --eval` shows, drawn by `keeprl plot`; `keeprl eval` on the run's initial and
final policies gives the numbers the run logged at those steps."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from rl.cli import main as cli  # noqa: E402
from rl.evaluation import eval_tasks  # noqa: E402
from rl.tracking import Tracker  # noqa: E402
from rollout.store import RolloutStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIG = os.path.join(ROOT, "configs", "native-sparse.yaml")
SET = "{name: heldout, task: arithmetic, task_kwargs: {max_operand: 9}, size: 8}"


def test_a_run_evaluates_its_held_out_set_and_keeprl_eval_agrees(
    tmp_path, monkeypatch, capsys, small_run
):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    evals = [f"eval.sets=[{SET}]", "eval.every=1", "eval.samples=3", "eval.pass_k=[1, 3]"]
    assert cli(["train", CONFIG, *small_run(run, tmp_path / "cache", 2), *evals]) == 0
    out = capsys.readouterr().out
    assert "evaluation of the policy after 0 updates" in out
    assert "evaluation of the policy after 2 updates" in out

    # Stored beside the rollouts, greedy and sampled, each with its task reference.
    store = RolloutStore(run / "eval" / "heldout")
    assert store.steps() == [0, 1, 2]
    step2 = store.read_step(2)
    assert len(step2.trajectories) == 8 * (1 + 3)
    assert sorted({t.sampling.temperature for t in step2.trajectories}) == [0.0, 1.0]
    # ... and never among the training prompts (matched by token ids).
    from rl.tasks import TaskStream
    from rl.tokenizer import CharTokenizer

    tok = CharTokenizer()
    space = {t.prompt for t in TaskStream("arithmetic", None, 5, {"max_operand": 9}).take(4000)}
    by_ids = {tuple(tok.prompt_ids(p)): p for p in space}
    held = {t.prompt for t in eval_tasks_of(run)}
    rollouts = RolloutStore(run / "rollouts")
    trained = {
        by_ids[tuple(t.prompt_ids)]
        for s in rollouts.steps()
        for t in rollouts.read_step(s).trajectories
    }
    assert len(space) == 200 and len(held) == 8 and trained and not trained & held

    tracker = Tracker(run)
    logged = {
        k: dict(tracker.history(k))
        for k in ("eval/heldout/greedy/accuracy", "eval/heldout/sampled/pass_at_3", "reward_mean")
    }
    tracker.close()
    assert sorted(logged["eval/heldout/greedy/accuracy"]) == [0, 1, 2]
    assert sorted(logged["eval/heldout/sampled/pass_at_3"]) == [0, 1, 2]
    assert sorted(logged["reward_mean"]) == [0, 1]  # training steps keep their own x

    # keeprl eval: the initial policy (a cached warm start) and the final checkpoint.
    for step in (0, 2):
        report = tmp_path / f"eval{step}.json"
        args = ["eval", str(run), "--step", str(step), "--json", str(report)]
        assert cli(args) == 0
        got = json.loads(report.read_text())["metrics"]
        tracker = Tracker(run)
        for key, value in got.items():
            assert dict(tracker.history(key))[step] == pytest.approx(value, abs=1e-9), key
        tracker.close()
    assert "heldout  greedy" in capsys.readouterr().out

    # Extending the run by a step: its old last evaluation is not repeated, the new one added.
    args = [*small_run(run, tmp_path / "cache", 3), *evals, "--resume"]
    assert cli(["train", CONFIG, *args]) == 0
    assert store.steps() == [0, 1, 2, 3]
    tracker = Tracker(run)
    points = tracker.client.get_metric_history(tracker.run_id, "eval/heldout/greedy/accuracy")
    tracker.close()
    assert sorted(m.step for m in points) == [0, 1, 2, 3]  # each once

    # keeprl inspect shows the eval samples; keeprl plot draws the eval curves.
    assert cli(["inspect", str(run), "--eval", "heldout", "--step", "2", "--limit", "1"]) == 0
    assert "reference" in capsys.readouterr().out
    assert cli(["inspect", str(run), "--eval", "nope", "--step", "2"]) == 2
    assert "evaluated: ['heldout']" in capsys.readouterr().err
    from rl.plot import plot_run

    png = plot_run(run, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def eval_tasks_of(run):
    import yaml

    from rl.config import ExperimentConfig, build

    cfg = build(ExperimentConfig, yaml.safe_load((run / "config.yaml").read_text()))
    return eval_tasks(cfg.eval.sets[0])
