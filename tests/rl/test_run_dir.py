"""Run directories: one live owner (a lock a killed run does not leave stuck), and a new run
refused where an earlier one left anything behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rl.run_dir import LOCK_FILE, RunDirError, RunLock, check_start, clear, usable

HOLDER = textwrap.dedent(
    """
    import sys, time
    from rl.run_dir import RunLock
    lock = RunLock(sys.argv[1]).acquire()  # held while the object lives
    print("held", flush=True)
    time.sleep(600)
    """
)


def _holder(run) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_owner_is_refused_and_a_killed_owner_frees_the_directory(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(RunDirError, match=rf"in use by another keeprl train \(pid {proc.pid} "):
            RunLock(run).acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with RunLock(run):  # kill -9 released it: nothing to clean up by hand
        pass
    assert (run / LOCK_FILE).exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match="in use"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


def test_new_runs_need_an_empty_directory(tmp_path):
    run = tmp_path / "run"
    check_start(run, resume=False, overwrite=False)  # missing: fine
    run.mkdir()
    (run / LOCK_FILE).write_text("")
    check_start(run, resume=False, overwrite=False)  # only a lock file: empty
    (run / "rollouts").mkdir()
    (run / "config.yaml").write_text("x: 1")
    with pytest.raises(RunDirError, match=r"not empty \(config\.yaml, rollouts\): pass --resume"):
        check_start(run, resume=False, overwrite=False)
    check_start(run, resume=False, overwrite=True)
    clear(run)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


def test_overwrite_deletes_only_a_keeprl_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(RunDirError, match="holds files but no keeprl run"):
        check_start(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "thesis.tex").exists()


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(RunDirError, match="does not exist, so there is no run to continue"):
        check_start(tmp_path / "nope", resume=True, overwrite=False)
    assert not (tmp_path / "nope").exists()
    with pytest.raises(RunDirError, match="holds no config.yaml"):
        check_start(tmp_path, resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="exclude each other"):
        check_start(tmp_path, resume=True, overwrite=True)


def test_unusable_output_directories_are_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match=r"file is a file, not a directory"):
        usable(tmp_path / "file")
    with pytest.raises(RunDirError, match=r"is under .*file, which is a file"):
        usable(tmp_path / "file" / "run")
    with pytest.raises(RunDirError, match=r"/proc/keeprl-run"):
        RunLock("/proc/keeprl-run").acquire()


def test_a_dead_holders_pid_is_not_trusted(tmp_path):
    # The lock file keeps the last owner's pid after it dies; only the flock decides.
    (tmp_path / LOCK_FILE).write_text('{"pid": 1, "host": "elsewhere"}')
    with RunLock(tmp_path):
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()


def test_the_layout_and_which_checkpoint_holds_a_weight_version(tmp_path):
    from rl.run_dir import RunDir

    run = RunDir(tmp_path)
    assert run.checkpoint(7) == tmp_path / "checkpoints" / "step_000007"
    assert run.rollouts == tmp_path / "rollouts" and run.config == tmp_path / "config.yaml"
    with pytest.raises(FileNotFoundError, match="initial policy is not stored"):
        run.weights(0)
    (run.checkpoint(2) / "policy").mkdir(parents=True)
    (run.checkpoint(2) / "policy" / "config.json").write_text("{}")
    assert run.weights(3) == run.checkpoint(2) / "policy"  # sampled after step 2 ended
    with pytest.raises(
        FileNotFoundError, match=r"weight version 2 \(step_000001\); kept: \['step_000002'\]"
    ):
        run.weights(2)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    assert run.weights(0, str(tmp_path / "base")) == tmp_path / "base"


def test_a_trajectorys_task_reference():
    from types import SimpleNamespace

    from rl.run_dir import RunDir

    t = SimpleNamespace(extra={})
    assert RunDir.reference_of(t) is None
    RunDir.attach_reference(t, {"answer": "7"})
    assert RunDir.reference_of(t) == {"answer": "7"}
