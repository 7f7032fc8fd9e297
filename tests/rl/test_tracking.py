"""MLflow tracking: metrics reach MLflow once per step, also across a kill and resume."""

from __future__ import annotations

from rl.tracking import Tracker


def test_commit_protocol_survives_a_crash(tmp_path):
    t = Tracker(tmp_path, experiment="t")
    t.log_params({"algorithm": {"beta": 0.0, "opsm": True}, "trainer": {"total_steps": 5}})
    for step in range(3):
        t.log_step(step, {"reward": step / 10})
    t.commit(1)  # checkpoint at step 1: steps 0, 1 go to MLflow; 2 stays pending
    assert [s for s, _ in t.history("reward")] == [0, 1]
    t.log_step(3, {"reward": 0.3})
    t.close()

    # "Crash": a new process resumes from the checkpoint of step 1; steps 2-3 run again.
    t = Tracker(tmp_path, experiment="t")
    t.resume(1)
    for step in (2, 3):
        t.log_step(step, {"reward": step / 10 + 0.01})  # recomputed values
    t.commit(3)
    history = t.history("reward")
    assert [s for s, _ in history] == [0, 1, 2, 3]  # each step exactly once
    assert dict(history)[3] == 0.31
    t.close()


def test_resume_sends_what_a_crash_kept_pending(tmp_path):
    t = Tracker(tmp_path, experiment="t")
    for step in range(4):
        t.log_step(step, {"loss": float(step)})
    t.close()  # died after writing the checkpoint of step 2, before committing metrics
    t = Tracker(tmp_path, experiment="t")
    t.resume(2)
    assert [s for s, _ in t.history("loss")] == [0, 1, 2] and t.committed == 2
    t.close()
