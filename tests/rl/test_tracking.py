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


def test_falling_back_past_committed_steps_continues_in_a_new_mlflow_run(tmp_path):
    t = Tracker(tmp_path, experiment="t")
    t.log_params({"seed": 1})
    for step in range(6):
        t.log_step(step, {"reward": step / 10})
    t.commit(5)  # checkpoints at 3 and 5 written, metrics through 5 in MLflow
    old_id = t.run_id
    t.close("FAILED")
    # Resume: the checkpoint of step 5 is damaged; the intact one is step 3.
    t = Tracker(tmp_path, experiment="t")
    t.resume(3)
    assert t.run_id != old_id and t.committed == 3
    assert [s for s, _ in t.history("reward")] == [0, 1, 2, 3]
    for step in (4, 5):
        t.log_step(step, {"reward": 1.0})
    t.commit(5)
    assert t.history("reward") == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3), (4, 1.0), (5, 1.0)]
    run = t.client.get_run(t.run_id)
    assert run.data.params == {"seed": "1"}
    assert run.data.tags["keeprl.resumed_from_run"] == old_id
    old = t.client.get_run(old_id)
    assert old.info.status == "FAILED" and old.data.tags["keeprl.superseded_by"] == t.run_id
    t.close()
    assert Tracker(tmp_path, experiment="t").run_id == run.info.run_id  # the id file moved on


def test_run_name_and_metric_timestamps(tmp_path):
    run = tmp_path / "my-run"
    t = Tracker(run, experiment="t")
    t.log_step(0, {"reward": 0.5})
    t.commit(0)
    info = t.client.get_run(t.run_id)
    assert info.info.run_name == "my-run"
    [point] = t.client.get_metric_history(t.run_id, "reward")
    assert point.timestamp >= info.info.start_time - 1000  # wall-clock ms, not 0
    t.close("KILLED")
    assert t.client.get_run(t.run_id).info.status == "KILLED"


def test_a_crash_inside_a_send_duplicates_nothing(tmp_path):
    from mlflow.entities import Metric

    t = Tracker(tmp_path, experiment="t")
    for step in range(4):
        t.log_step(step, {"a": float(step), "b": -float(step)})
    t.commit(1)
    # Killed while sending steps 2-3: MLflow took metric "a" of both, nothing recorded that.
    t.sending_file.write_text("3")
    t.client.log_batch(t.run_id, metrics=[Metric("a", 2.0, 0, 2), Metric("a", 3.0, 0, 3)])
    t = Tracker(tmp_path, experiment="t")
    t.resume(3)
    assert [s for s, _ in t.history("a")] == [0, 1, 2, 3]
    assert [s for s, _ in t.history("b")] == [0, 1, 2, 3]
    assert t.committed == 3 and not t.sending_file.exists()
    t.close()


def test_evaluations_are_committed_and_resumed_with_their_steps_record(tmp_path):
    """The evaluation after N updates goes with step N's record; the last one (after
    total_steps = 3 updates) with the last step's, logged at MLflow step 3."""
    from rl.plot import read_metrics

    key = "eval/h/greedy/accuracy"
    t = Tracker(tmp_path, experiment="t")
    for step in range(3):
        t.log_step(step, {key: (1 + step) / 10})  # evaluated at 0, 1, 2 updates
        t.log_step(step, {"reward": step / 10})
    t.log_step(2, {key: 0.4}, at=3)  # after the last step
    t.commit(1)
    assert t.history(key) == [(0, 0.1), (1, 0.2)]
    # Pending rows are drawn at their own step, merged with the step's other metrics.
    assert read_metrics(tmp_path, [key, "reward"], history=t.history) == {
        key: [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)],
        "reward": [(0, 0.0), (1, 0.1), (2, 0.2)],
    }
    t.close()
    t = Tracker(tmp_path, experiment="t")
    t.resume(1)  # step 2 runs again, with its evaluation and the last one
    t.log_step(2, {key: 0.35})
    t.log_step(2, {"reward": 0.25})
    t.log_step(2, {key: 0.45}, at=3)
    t.commit(2)
    assert t.history(key) == [(0, 0.1), (1, 0.2), (2, 0.35), (3, 0.45)]
    t.close()
    # Falling back past committed steps keeps the evaluations of the steps kept.
    t = Tracker(tmp_path, experiment="t")
    t.resume(1)
    assert t.history(key) == [(0, 0.1), (1, 0.2)]
    t.close()
