"""The experiment runner end to end on the CPU: Ray actors, native engine, MLflow, Parquet,
checkpoints, and a run killed mid-step then resumed without losing or duplicating a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from rl import checkpoint as ckpt
from rl.cli import main as cli
from rl.config import load_config
from rl.tracking import Tracker
from rollout import RolloutStore

CONFIG = "configs/native-sparse.yaml"


def _overrides(run, cache, steps):
    return [
        f"trainer.output_dir={run}",
        f"trainer.total_steps={steps}",
        "checkpoint.every=1",
        f"warm_start.cache_dir={cache}",
        "warm_start.steps=20",
        "warm_start.indexer_warmup.steps=10",
        "warm_start.sparse_sft.steps=5",
        "data.prompts_per_step=2",
        "rollout.samples_per_prompt=4",
        "rollout.sampling.max_tokens=4",
        "ray.num_cpus=2",
    ]


def _assert_run(run, steps):
    store = RolloutStore(run / "rollouts")
    assert store.steps() == list(range(steps))
    logged = store.read_step(steps - 1)
    assert len(logged.trajectories) == 8 and all(r is not None for r in logged.rewards)
    for t in logged.trajectories:
        assert t.routing.shape[0] == t.num_tokens - 1 and t.routing.shape[1:] == (1, 2)
        assert len(t.kept_ids) == len(t.response_ids)
        assert all(r in k for r, k in zip(t.response_ids, t.kept_ids, strict=True))
        assert t.weight_version == steps - 1  # sampled with the weights of the previous step
    tracker = Tracker(run, experiment="keeprl")
    for key in ("reward_mean", "loss", "logp_gap_max", "opsm_masked_frac", "entropy"):
        assert [s for s, _ in tracker.history(key)] == list(range(steps)), key
    tracker.close()
    assert ckpt.latest(run).name == f"step_{steps - 1:06d}"


def test_train_writes_metrics_rollouts_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    from rl.trainer import train

    run = tmp_path / "run"
    train(load_config(CONFIG, _overrides(run, tmp_path / "cache", 3)))
    _assert_run(run, 3)
    tracker = Tracker(run)
    gaps = [v for _, v in tracker.history("logp_gap_max")]
    tracker.close()
    assert max(gaps) < 1e-4  # native engine and learner compute the same log-probs
    assert len(list(run.glob("mlartifacts/*/artifacts/plots/curves.png"))) == 1
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # keeprl inspect of a logged step: every response token has a kept set and a routing row
    out = tmp_path / "inspect.json"
    assert cli(["inspect", str(run), "--step", "2", "--json", str(out)]) == 0
    shown = json.loads(out.read_text())["trajectories"]
    assert len(shown) == 8 and all(r["reference"] is not None for r in shown)
    assert all(t["kept_size"] > 0 and len(t["experts"]) == 1 for r in shown for t in r["tokens"])

    # keeprl replay of a logged step, with the weights that sampled it
    out = tmp_path / "replay.json"
    assert cli(["replay", str(run), "--step", "2", "--json", str(out), "--verifier", "math"]) == 0
    report = json.loads(out.read_text())
    assert report["variants"]["routing+mask"]["gap_max"] < 1e-5  # float32 storage of pi_old
    assert report["variants"]["neither"]["gap_mean"] > 1e-3  # without the mask: biased
    assert report["rescored"]["rescored_mean"] == report["rescored"]["logged_mean"]
    assert len(report["routing_disagreement_by_layer"]) == 1


def test_killed_run_resumes_without_losing_or_duplicating_steps(tmp_path, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    monkeypatch.chdir(root)
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [sys.executable, "-m", "rl.cli", "train", CONFIG, *_overrides(run, cache, 6)]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    try:  # kill the whole process group (driver and its Ray processes) after step 3 is logged
        while not (run / "rollouts" / "step_000002.parquet").exists():
            assert proc.poll() is None and time.time() < deadline, "trainer did not get going"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert cli(["train", CONFIG, *_overrides(run, cache, 6), "--resume"]) == 0
    _assert_run(run, 6)


def test_config_errors_are_one_line(capsys, tmp_path):
    assert cli(["train", CONFIG, "trainer.totl_steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'trainer.total_steps'" in err
    assert cli(["train", CONFIG, "rewards.verifiers=[{name: nosuch_mod:score}]"]) == 2
    assert "cannot import 'nosuch_mod'" in capsys.readouterr().err


QUICKSTART = "configs/quickstart.yaml"


def test_vllm_run_replays_with_a_small_gap(tmp_path, monkeypatch):
    """The quickstart config end to end with vLLM rollout workers (bf16) and an fp32 learner:
    replaying a logged step with both stabilizers leaves only the two engines' rounding."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    run = tmp_path / "run"
    overrides = [
        f"trainer.output_dir={run}",
        "trainer.total_steps=2",
        "checkpoint.every=1",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "warm_start.steps=100",
        "data.prompts_per_step=4",
        "rollout.samples_per_prompt=4",
    ]
    assert cli(["train", QUICKSTART, *overrides]) == 0
    store = RolloutStore(run / "rollouts")
    logged = store.read_step(1)
    assert {t.engine for t in logged.trajectories} == {"vllm"}
    assert all(len(k) >= 20 for t in logged.trajectories for k in t.kept_ids)  # top_k 20 + ties
    out = tmp_path / "replay.json"
    assert cli(["replay", str(run), "--step", "1", "--json", str(out)]) == 0
    variants = json.loads(out.read_text())["variants"]
    both = variants["routing+mask"]
    print(f"\nvLLM replay: {json.dumps(variants)}")
    assert 0 < both["gap_mean"] < 0.02 and both["gap_max"] < 0.15
    assert variants["neither"]["gap_mean"] > 5 * both["gap_mean"]  # the mask matters
