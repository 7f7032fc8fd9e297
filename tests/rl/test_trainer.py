"""The experiment runner end to end on the CPU: Ray actors, native engine, MLflow, Parquet,
checkpoints, and a run killed mid-step then resumed without losing or duplicating a step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rl import checkpoint as ckpt
from rl.cli import main as cli
from rl.config import load_config
from rl.run_dir import RunDir, RunLock
from rl.tokenizer import CharTokenizer
from rl.tracking import Tracker, local_store_uri
from rollout import RolloutStore

CONFIG = "configs/native-sparse.yaml"
TOK = CharTokenizer()


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


def test_train_writes_metrics_rollouts_and_checkpoints(tmp_path, monkeypatch, small_run):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    from rl.trainer import train

    run = tmp_path / "run"
    train(load_config(CONFIG, small_run(run, tmp_path / "cache", 3)))
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


def test_killed_run_resumes_without_losing_or_duplicating_steps(tmp_path, monkeypatch, small_run):
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    monkeypatch.chdir(root)
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [sys.executable, "-m", "rl.cli", "train", CONFIG, *small_run(run, cache, 6)]
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
    assert cli(["train", CONFIG, *small_run(run, cache, 6), "--resume"]) == 0
    _assert_run(run, 6)


def test_resume_refusals_and_a_damaged_checkpoint(tmp_path, monkeypatch, capsys, small_run):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert cli(["train", CONFIG, *small_run(run, cache, 3)]) == 0
    capsys.readouterr()
    config_text = (run / "config.yaml").read_text()
    assert cli(["train", CONFIG, *small_run(run, cache, 3), "--resume"]) == 0
    assert "has completed all 3 steps; nothing to do" in capsys.readouterr().out
    assert cli(["train", CONFIG, *small_run(run, cache, 2), "--resume"]) == 2
    assert "trainer.total_steps=2, but the run has completed 3 steps" in capsys.readouterr().err
    assert cli(["train", CONFIG, *small_run(run, cache, 4), "trainer.seed=5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"differs from {run / 'config.yaml'} at trainer.seed;" in err and err.count("\n") == 1
    assert (run / "config.yaml").read_text() == config_text
    # The newest checkpoint's weights are damaged: resume falls back to the one before (step
    # 1), runs steps 2-3 again, and MLflow, Parquet and the checkpoints hold each step once.
    weights = next((run / "checkpoints" / "step_000002" / "policy").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert cli(["train", CONFIG, *small_run(run, cache, 4), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "skipping a damaged checkpoint" in err and "step_000002" in err
    assert "continuing after step 2 (step_000001)" in err
    _assert_run(run, 4)
    for path in (run / "checkpoints").iterdir():
        ckpt.verify(path)


def test_config_errors_are_one_line(capsys, tmp_path):
    assert cli(["train", CONFIG, "trainer.totl_steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'trainer.total_steps'" in err
    assert cli(["train", CONFIG, "rewards.verifiers=[{name: nosuch_mod:score}]"]) == 2
    assert "cannot import 'nosuch_mod'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.task=null", "data.path=/nonexistent/tasks.jsonl"], "data.path: .* no such file"),
        (["data.task=arithmetc"], "data: unknown task 'arithmetc'"),
        (["data.task_kwargs={max_operan: 9}"], "data.task_kwargs: .*'max_operan'"),
        (["model.preset=tinny"], "model.preset: unknown preset 'tinny'"),
        (
            ["model.overrides={index_topk: 4, vocab_sise: 128}"],
            r"unknown model field 'model\.overrides\.vocab_sise'; did you mean "
            r"'model\.overrides\.vocab_size'",
        ),
        (["model.checkpoint=/nonexistent"], "model.checkpoint: /nonexistent holds no config"),
        (["optim.micro_batch_tokens=0"], "optim.micro_batch_tokens must be >= 1"),
        (["optim.lr_schedule=cosine", "optim.warmup_steps=100000"], "optim: .*cosine"),
        (["rollout.sampling.max_tokens=0"], "rollout.sampling.max_tokens must be >= 1"),
        (["rollout.sampling.temperature=-1"], "rollout.sampling.temperature must be >= 0"),
        (["rewards.timeout_s=0"], "rewards.timeout_s must be > 0"),
        (["checkpoint.keep_last=-1"], "checkpoint.keep_last must be >= 0"),
        (["model.attention=sparse"], "model.attention: must be one of"),
        (["model.attention=triton"], "model.attention: 'triton' cannot run: .*multiple of 16"),
        (
            ["model.attention=triton", "model.overrides={num_attention_heads: 16}"],
            "model.attention: 'triton' cannot run: the learner runs on 'cpu'",
        ),
    ],
)
def test_config_mistakes_stop_before_anything_is_written(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    assert cli(["train", CONFIG, f"trainer.output_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err
    assert not run.exists()


def test_unusable_output_directories_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out, message in [
        (tmp_path / "file", "is a file, not a directory"),
        (tmp_path / "file" / "run", "which is a file"),
        ("/proc/keeprl-run", "/proc/keeprl-run"),
    ]:
        assert cli(["train", CONFIG, f"trainer.output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


def test_a_run_directory_in_use_or_not_empty_is_refused_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLock(run):  # a live run owns it
        assert cli(["train", CONFIG, f"trainer.output_dir={run}"]) == 2
        assert "in use by another keeprl train" in capsys.readouterr().err
    (run / "config.yaml").write_text("earlier: run\n")
    (run / "rollouts").mkdir()
    assert cli(["train", CONFIG, f"trainer.output_dir={run}"]) == 2
    assert "is not empty (config.yaml, rollouts): pass --resume" in capsys.readouterr().err
    assert cli(["train", CONFIG, f"trainer.output_dir={tmp_path / 'none'}", "--resume"]) == 2
    assert "does not exist, so there is no run to continue" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "earlier: run\n"
    assert not (tmp_path / "none").exists()


def test_a_verifier_that_kills_its_process_costs_only_its_samples(tmp_path, monkeypatch, small_run):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    helpers = os.path.join(os.path.dirname(os.path.dirname(__file__)), "rewards")
    monkeypatch.syspath_prepend(helpers)  # here, and in Ray's processes:
    monkeypatch.setenv("PYTHONPATH", helpers + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = tmp_path / "run"
    verifier = "rewards.verifiers=[{name: rewards_test_verifiers:kills_its_process_on_odd_lengths}]"
    assert cli(["train", CONFIG, *small_run(run, tmp_path / "cache", 2), verifier]) == 0
    outcomes = []
    for step in (0, 1):
        logged = RolloutStore(run / "rollouts").read_step(step)
        for t, reward, failure in zip(
            logged.trajectories, logged.rewards, logged.failures, strict=True
        ):
            odd = len(TOK.decode(t.response_ids)) % 2
            assert (reward, failure is not None) == ((0.0, True) if odd else (1.0, False))
            assert not odd or "worker died" in failure
            outcomes.append(odd)
    assert 0 < sum(outcomes) < len(outcomes)  # both kinds of sample were scored


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
    temp = Path(tempfile.gettempdir())
    before = {p.name for p in temp.iterdir() if p.name.startswith(("keeprl-vllm-", "vllm_dist_"))}
    assert cli(["train", QUICKSTART, *overrides]) == 0
    after = {p.name for p in temp.iterdir() if p.name.startswith(("keeprl-vllm-", "vllm_dist_"))}
    assert after <= before  # the engines removed their files from the temp dir
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


def test_accuracy_is_per_verifier_and_failures_show_in_the_progress_line(capsys):
    from rl.evaluation import reward_stats as _reward_stats
    from rl.trainer import _progress

    # math (weight 1) and a concise-answer check (weight 0.2): a right answer that is not
    # concise has combined reward 1/1.2 < 1, which used to count as wrong.
    scores = [
        {"reward": 1.0 / 1.2, "subscores": {"math": 1.0, "concise": 0.0}, "failure": None},
        {"reward": 0.2 / 1.2, "subscores": {"math": 0.0, "concise": 1.0}, "failure": None},
        {"reward": 0.0, "subscores": {"math": 0.0}, "failure": "math: timeout"},  # no concise
    ]
    stats = _reward_stats(scores, [3, 4, 5], ["math", "concise"])
    assert stats["accuracy/math"] == stats["accuracy"] == pytest.approx(1 / 3)
    assert stats["accuracy/concise"] == 0.5  # it applied to two samples
    assert stats["verifier_failures"] == pytest.approx(1 / 3)
    stats.update(logp_gap_max=0.0, rollout_tokens_per_s=1.0)
    _progress(0, 2, stats)
    assert "verifier failed on 33%" in capsys.readouterr().out
    stats["verifier_failures"] = 0.0
    _progress(0, 2, stats)
    assert "failed" not in capsys.readouterr().out


def test_the_custom_verifier_example_trains_as_documented(tmp_path):
    """`keeprl train examples/custom_verifier/experiment.yaml` from the repository root, with
    the installed console script (whose sys.path lacks the root) and the verifier running in
    the reward worker's processes: the plug-in resolves against the directory keeprl runs in."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(os.path.dirname(sys.executable), "keeprl")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = tmp_path / "run"
    args = [
        script,
        "train",
        "examples/custom_verifier/experiment.yaml",
        f"trainer.output_dir={run}",
        "trainer.total_steps=1",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "warm_start.steps=20",
        "data.prompts_per_step=2",
        "rollout.samples_per_prompt=4",
    ]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = RolloutStore(run / "rollouts").read_step(0)
    assert all(f is None for f in logged.failures), logged.failures
    assert all({"math", "concise"} <= set(s) for s in logged.subscores)
    tracker = Tracker(run)
    assert [s for s, _ in tracker.history("accuracy/concise")] == [0]
    tracker.close()


def test_ctrl_c_stops_in_one_line_and_marks_the_run_killed(tmp_path, small_run):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "rl.cli", "train", CONFIG, *small_run(run, tmp_path, 50)]
    # A shell that starts this suite in the background ignores SIGINT for it, and Python then
    # keeps ignoring it: give the trainer the default disposition, as a terminal's would be.
    proc = subprocess.Popen(
        args,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not (run / "rollouts" / "step_000001.parquet").exists():
        assert proc.poll() is None and time.time() < deadline, "trainer did not get going"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted; `--resume` continues" in err
    from mlflow.tracking import MlflowClient

    run_id = RunDir(run).mlflow_run_id.read_text().strip()
    assert MlflowClient(local_store_uri(run)).get_run(run_id).info.status == "KILLED"


def test_a_ctrl_c_that_python_drops_still_stops_the_run(tmp_path, monkeypatch, small_run):
    """SIGINT while garbage collection runs a __del__ or weakref callback: Python prints the
    KeyboardInterrupt as "Exception ignored" and drops it (CI once saw a run finish after its
    Ctrl-C that way). The run stops at its next step boundary anyway, marked killed."""
    import gc
    import signal

    from mlflow.tracking import MlflowClient

    from rl import trainer

    # a suite started in the background ignores SIGINT; a terminal's default is what is tested
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    rollout, sampled = trainer._rollout, []

    class InterruptedWhileCollected:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler's raise ends here, ignored

    def ctrl_c_at_step_1(cfg, n, *args):
        sampled.append(n)
        if n == 1:
            InterruptedWhileCollected()
            gc.collect()
        return rollout(cfg, n, *args)

    monkeypatch.setattr(trainer, "_rollout", ctrl_c_at_step_1)
    run = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train(load_config(CONFIG, small_run(run, tmp_path / "cache", 4)))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous
    run_id = RunDir(run).mlflow_run_id.read_text().strip()
    assert MlflowClient(local_store_uri(run)).get_run(run_id).info.status == "KILLED"
    assert sampled == [0, 1]  # stopped at the boundary after the interrupted step
    assert RolloutStore(run / "rollouts").steps() == [0]  # step 1 unfinished, as on any Ctrl-C


def test_the_sigint_latch_keeps_a_dropped_interrupt_and_its_report_quiet(monkeypatch):
    """The latch under a dropped interrupt: recorded, raised by check, and Python's "Exception
    ignored" report of it not printed; other unraisable errors are still reported, and removing
    the latch restores both hooks."""
    import signal

    from rl.trainer import SigintLatch

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    latch = SigintLatch()
    try:
        latch.install()

        class Collected:
            def __init__(self, raise_):
                self.raise_ = raise_

            def __del__(self):
                self.raise_()

        Collected(lambda: signal.raise_signal(signal.SIGINT))
        assert latch.seen and reported == []
        with pytest.raises(KeyboardInterrupt):
            latch.check()
        Collected(lambda: 1 / 0)
        assert reported == [ZeroDivisionError]
        latch.remove()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert sys.unraisablehook is not latch._unraisable
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_run_that_fails_is_marked_failed(tmp_path, monkeypatch, small_run):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    from mlflow.tracking import MlflowClient

    from rl import trainer

    rollout = trainer._rollout

    def fails_at_step_1(cfg, n, *args):
        if n == 1:
            raise RuntimeError("the learner ran out of memory")
        return rollout(cfg, n, *args)

    monkeypatch.setattr(trainer, "_rollout", fails_at_step_1)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train(load_config(CONFIG, small_run(run, tmp_path / "cache", 3)))
    run_id = RunDir(run).mlflow_run_id.read_text().strip()
    assert MlflowClient(local_store_uri(run)).get_run(run_id).info.status == "FAILED"
    assert RolloutStore(run / "rollouts").steps() == [0]  # what was done stays
    with RunLock(run):  # and the directory is free again
        pass


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from rl import trainer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(trainer, "train", full)
    assert cli(["train", CONFIG, f"trainer.output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device writing" in err, err


def test_the_deepseek_config_validates_and_says_what_it_cannot_run_yet(
    tmp_path, capsys, monkeypatch
):
    """configs/deepseek-v3.2-math.yaml against the released checkpoint's layout (its
    config.json, no weights): it loads, what keeprl cannot run yet is one line at start, and
    the checkpoint is read strictly; each before anything is written."""
    from policy.testing import RELEASED_CONFIG

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    ckpt_dir, data = tmp_path / "DeepSeek-V3.2", tmp_path / "train.jsonl"
    ckpt_dir.mkdir()
    (ckpt_dir / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    data.write_text(json.dumps({"prompt": "1+1=", "reference": {"answer": "2"}}) + "\n")
    run = tmp_path / "run"
    args = [
        "train",
        "configs/deepseek-v3.2-math.yaml",
        f"model.checkpoint={ckpt_dir}",
        f"data.path={data}",
        f"trainer.output_dir={run}",
    ]
    for extra, message in [
        ([], "ray.learner_gpus=8: a learner rank uses one device; for 8 GPUs set"),
        (["ray.learner_gpus=1"], "neither model.safetensors nor model.safetensors.index.json"),
    ]:
        assert cli([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    (ckpt_dir / "config.json").write_text(json.dumps(dict(RELEASED_CONFIG, index_top_k=1024)))
    assert cli([*args, "ray.learner_gpus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "index_top_k" in err and "index_topk" in err, err
    assert not run.exists()


def test_max_staleness_one_overlaps_sampling_with_the_learner(tmp_path, monkeypatch, small_run):
    """rollout.max_staleness=1: step s is sampled with the weights from before update s - 1
    (its rollouts carry weight version s - 1 from step 1 on, and the metric says 1); every step
    is still logged, stored and checkpointed once, and the run resumes."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [*small_run(run, cache, 3), "rollout.max_staleness=1"]
    assert cli(["train", CONFIG, *args]) == 0
    store = RolloutStore(run / "rollouts")
    assert store.steps() == [0, 1, 2]
    versions = [{t.weight_version for t in store.read_step(s).trajectories} for s in range(3)]
    assert versions == [{0}, {0}, {1}]
    tracker = Tracker(run, experiment="keeprl")
    assert [v for _, v in tracker.history("staleness")] == [0.0, 1.0, 1.0]
    tracker.close()
    assert ckpt.latest(run).name == "step_000002"
    assert (
        cli(["train", CONFIG, *small_run(run, cache, 4), "rollout.max_staleness=1", "--resume"])
        == 0
    )
    assert RolloutStore(run / "rollouts").steps() == [0, 1, 2, 3]
