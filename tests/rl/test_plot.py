"""keeprl plot: committed (MLflow) and pending metrics merged by step, MLflow winning; a valid
PNG written without changing the run's MLflow status; unknown metrics and runs are errors."""

from __future__ import annotations

import json

import pytest

# The GPU image lacks mlflow; there this module is skipped, not a collection error.
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient

from rl.cli import main as cli
from rl.plot import plot_run, read_metrics
from rl.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _status(run) -> str:
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    return client.get_run((run / "mlflow_run_id").read_text()).info.status


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run with steps 0-2 in MLflow, step 3 pending only, and a stale pending line
    for step 1 (a crash between sending it and trimming the file) that MLflow must win over."""
    run = tmp_path_factory.mktemp("plot") / "run"
    tracker = Tracker(run)
    for step in range(4):
        tracker.log_step(
            step, {"reward_mean": step / 4, "kl": 0.01 * step, "accuracy": step / 8, "loss": 1.0}
        )
    tracker.commit(2)
    tracker.close()
    with open(run / "metrics.pending.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "metrics": {"reward_mean": 99.0}}) + "\n")
    return run


def test_metrics_merge_committed_and_pending(run):
    series = read_metrics(run, ["reward_mean", "kl", "nosuch"])
    assert series["reward_mean"] == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]
    assert [s for s, _ in series["kl"]] == [0, 1, 2, 3] and "nosuch" not in series
    assert set(read_metrics(run)) == {"reward_mean", "kl", "accuracy", "loss"}


def test_plot_writes_a_png_and_leaves_the_run_alone(run, capsys):
    assert cli(["plot", str(run)]) == 0
    path = run / "curves.png"
    assert f"curves written to {path}" in capsys.readouterr().out
    width, height = _png_size(path)
    assert 400 <= width <= 2000 and 300 <= height <= 2000  # three panels, 7 inches wide
    assert _status(run) == "FINISHED"  # a Tracker would have set it to RUNNING


def test_chosen_metrics_and_output(run, tmp_path):
    out = tmp_path / "sub" / "loss.png"
    assert cli(["plot", str(run), "--metrics", "loss", "--out", str(out)]) == 0
    one_panel = _png_size(out)[1]
    assert one_panel < _png_size(plot_run(run, tmp_path / "all.png"))[1]


def test_unknown_metric_lists_the_logged_ones(run, capsys):
    assert cli(["plot", str(run), "--metrics", "reward_mean,nosuch"]) == 2
    err = capsys.readouterr().err
    assert "metric nosuch not logged; logged: accuracy, kl, loss, reward_mean" in err


def test_pending_only_run_and_missing_run(tmp_path, capsys):
    run = tmp_path / "young"
    run.mkdir()
    (run / "metrics.pending.jsonl").write_text(
        json.dumps({"step": 0, "metrics": {"reward_mean": 0.1}}) + "\n"
    )
    assert cli(["plot", str(run)]) == 0
    assert _png_size(run / "curves.png")[0] > 0
    assert not (run / "mlflow.db").exists()  # reading never creates an MLflow store
    assert cli(["plot", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
