"""benchmarks/multi_gpu.py under torchrun, on the CPU (gloo): the script the multi-GPU runs use
(rl.sharded.LearnerWorker, as the Ray learner actors run it) gives one process's step on 2
ranks, and a checkpoint written by 2 ranks continues identically on 1 and on 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _torchrun(n: int, *args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
    cmd += ["--standalone", os.path.join(ROOT, "benchmarks", "multi_gpu.py"), *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("{")]
    return json.loads(line)


def test_two_ranks_equal_one_process_and_checkpoints_reshard(tmp_path):
    work = ["--workdir", str(tmp_path / "work")]
    out = _torchrun(2, "equivalence", *work)
    assert out["world"] == 2 and out["ok"], out
    assert out["grad_rel_max"] < 1e-5 and out["weight_rel_max"] < 1e-5  # float32, gloo
    run = str(tmp_path / "run")
    saved = _torchrun(2, "checkpoint", "--save", run, *work)
    assert saved["world"] == 2
    for n in (1, 3):
        loaded = _torchrun(n, "checkpoint", "--load", run, *work)
        assert loaded["saved_on"] == 2 and loaded["loaded_on"] == n and loaded["ok"], loaded
