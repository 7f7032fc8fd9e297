"""Crash consistency of `keeprl train`: SIGKILL inside every window where a crash could tear
a run's records apart (rl/faults.py), two runs started at once into one directory, and a
second run started while the first is alive. After the kills and resumes, every step is stored
exactly once in Parquet and in MLflow, MLflow's rewards are Parquet's, and every checkpoint
verifies.

One run of 8 steps with a checkpoint every 2 steps (after steps 1, 3, 5, 7; 0-based), killed
five times: each resume continues from the newest intact checkpoint and meets the next kill.
A second run with a held-out eval set is killed between evaluations' samples and metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rl import checkpoint as ckpt
from rl.faults import ENV, PGID_ENV
from rl.run_dir import RunDirError, RunLock
from rl.tracking import Tracker
from rollout import RolloutStore

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/native-sparse.yaml"
STEPS = 8


def _args(overrides: list[str], resume: bool) -> list[str]:
    return [sys.executable, "-m", "rl.cli", "train", CONFIG, *overrides] + (
        ["--resume"] if resume else []
    )


def _start(overrides: list[str], crash: str | None, resume: bool = True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, PGID_ENV)}
    if crash:
        env[ENV] = crash
    return subprocess.Popen(
        _args(overrides, resume),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the crash point kills all of it
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


def _killed(proc: subprocess.Popen) -> None:
    code, err = _finish(proc)
    assert code == -signal.SIGKILL, f"exit {code}, expected the crash point's kill:\n{err}"


def _committed(run: Path) -> int:
    """The last step whose metrics the run has recorded as sent to MLflow."""
    return int((run / "metrics.committed").read_text())


def _wait_for_owner(run: Path, proc: subprocess.Popen) -> None:
    """Until `proc` holds the run directory's lock."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run never took its directory"
        try:
            RunLock(run).acquire().release()
        except RunDirError:
            return
        time.sleep(0.2)


def test_sigkill_anywhere_loses_and_duplicates_nothing(tmp_path, small_run):
    run = tmp_path / "run"
    # A checkpoint every 2 steps, all kept: kills land between checkpoints too.
    cfg = [
        *small_run(run, tmp_path / "cache", STEPS),
        "checkpoint.every=2",
        "checkpoint.keep_last=0",
    ]

    # Two trains started at the same moment: one takes the directory, the other is refused in
    # one line before touching it (it used to crash creating mlflow.db and leave it broken).
    first, second = (_start(cfg, "metrics_pending@2", resume=False) for _ in range(2))
    outcomes = sorted([_finish(first), _finish(second)], key=lambda r: r[0], reverse=True)
    (code, err), (killed, _) = outcomes
    assert code == 2 and killed == -signal.SIGKILL, outcomes
    assert err.count("\n") == 1 and ("in use by another keeprl train" in err or "not empty" in err)

    # Killed inside the checkpoint write; meanwhile a second train is refused.
    proc = _start(cfg, "checkpoint@3")
    _wait_for_owner(run, proc)
    code, err = _finish(_start(cfg, None))
    assert code == 2 and "in use by another keeprl train" in err and err.count("\n") == 1
    _killed(proc)
    assert list((run / "checkpoints").glob(".tmp-*"))  # the torn write is there ...
    assert ckpt.latest(run).name == "step_000001"  # ... and invisible

    # Killed between a written checkpoint and its metrics reaching MLflow.
    _killed(_start(cfg, "checkpoint_written@3"))
    assert ckpt.latest(run).name == "step_000003" and _committed(run) == 1

    # Killed after MLflow took steps 4-5, before the run recorded that it had.
    _killed(_start(cfg, "mlflow_sent@5"))
    assert (run / "metrics.sending").exists() and _committed(run) == 3

    # Killed with step 6's rollouts stored and nothing else of it.
    _killed(_start(cfg, "rollouts_stored@6"))
    assert (run / "rollouts" / "step_000006.parquet").exists()
    assert ckpt.latest(run).name == "step_000005"

    code, err = _finish(_start(cfg, None))
    assert code == 0, err

    store = RolloutStore(run / "rollouts")
    assert store.steps() == list(range(STEPS))
    tracker = Tracker(run)
    for key in ("reward_mean", "loss", "entropy", "logp_gap_max"):
        assert [s for s, _ in tracker.history(key)] == list(range(STEPS)), key
    for step, value in tracker.history("reward_mean"):
        logged = store.read_step(step)
        assert {t.weight_version for t in logged.trajectories} == {step}
        assert value == pytest.approx(float(np.mean(logged.rewards)), abs=1e-12)
    tracker.close()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"step_{s:06d}" for s in (1, 3, 5, 7)]  # no torn .tmp-* left
    for name in checkpoints:
        ckpt.verify(run / "checkpoints" / name)
    assert not (run / "metrics.sending").exists()


def test_sigkill_between_an_evaluation_and_its_metrics(tmp_path, small_run):
    """A run with a held-out set evaluated every 2 updates (0, 2, 4 and 6 of 6), killed after an
    evaluation's samples are stored and before its metrics are: in the middle of the run (the
    evaluation after 4 updates) and at its end (after 6, which belongs to the last step's
    record). After the resumes each evaluation is in MLflow once, at its number of updates,
    with the numbers of the samples stored for it."""
    run = tmp_path / "run"
    cfg = [
        *small_run(run, tmp_path / "cache", 6),
        "checkpoint.every=2",
        "checkpoint.keep_last=0",
        "eval.sets=[{name: heldout, task: arithmetic, task_kwargs: {max_operand: 9}, size: 6}]",
        "eval.every=2",
    ]
    # The evaluation after 4 updates runs beside step 4's training (it belongs to step 4's
    # record, which the checkpoint of step 5 would commit).
    _killed(_start(cfg, "eval_stored@4", resume=False))
    assert RolloutStore(run / "eval" / "heldout").steps() == [0, 2, 4]  # 4's samples stored
    assert ckpt.latest(run).name == "step_000003"
    tracker = Tracker(run)  # ... and not its metrics
    assert [s for s, _ in tracker.history("eval/heldout/greedy/reward_mean")] == [0, 2]
    tracker.close()
    # The last one, after 6 updates, comes before the last step's checkpoint.
    _killed(_start(cfg, "eval_stored@6"))
    assert RolloutStore(run / "eval" / "heldout").steps() == [0, 2, 4, 6]
    assert ckpt.latest(run).name == "step_000003"
    code, err = _finish(_start(cfg, None))
    assert code == 0, err

    store = RolloutStore(run / "eval" / "heldout")
    assert store.steps() == [0, 2, 4, 6]
    tracker = Tracker(run)
    logged = tracker.history("eval/heldout/greedy/reward_mean")
    assert [s for s, _ in tracker.history("reward_mean")] == list(range(6))
    tracker.close()
    assert [s for s, _ in logged] == [0, 2, 4, 6]  # each once
    for updates, value in logged:
        stored = store.read_step(updates)
        assert {t.weight_version for t in stored.trajectories} == {updates}
        assert value == pytest.approx(float(np.mean(stored.rewards)), abs=1e-12)
