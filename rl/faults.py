"""Crash points for testing that a killed run loses and duplicates nothing.

`KEEPRL_CRASH_AT=<point>@<step>` (e.g. `checkpoint@2`) makes a run SIGKILL itself, with every
process of its process group, the moment it reaches `point` during step `step` (0-based): the
same as a kill -9 or a power cut at the worst moment, but at a chosen place instead of a
random one. The points sit inside the windows where a crash could tear the run's records
apart: between the rollout (or evaluation) files and the metrics, inside a checkpoint's write,
and between MLflow accepting metrics and the run recording that it did. Unset (always,
outside tests) a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "KEEPRL_CRASH_AT"
PGID_ENV = "KEEPRL_CRASH_PGID"  # set by the trainer so its Ray actors kill the whole run

POINTS = (
    "rollouts_stored",  # the step's Parquet file is written, its metrics are not
    "metrics_pending",  # the step's metrics are in the pending file, no checkpoint yet
    "checkpoint",  # inside the checkpoint write (learner actor), before the atomic rename
    "checkpoint_written",  # the checkpoint exists, its metrics are not yet sent to MLflow
    "mlflow_sent",  # MLflow holds the metrics, metrics.committed does not say so yet
    "eval_stored",  # an evaluation's Parquet is written, its metrics are not (step: updates)
)


def mark_process_group() -> None:
    """Let processes started from here (Ray actors) kill this run's whole process group."""
    if os.environ.get(ENV):
        os.environ.setdefault(PGID_ENV, str(os.getpgid(0)))


def crash_point(point: str, step: int) -> None:
    """SIGKILL the run here if KEEPRL_CRASH_AT names this point and step."""
    wanted = os.environ.get(ENV)
    if not wanted or wanted != f"{point}@{step}":
        return
    pgid = os.environ.get(PGID_ENV)
    if pgid:
        os.killpg(int(pgid), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
