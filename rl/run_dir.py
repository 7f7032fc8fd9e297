"""A run directory: its layout, who owns it, and whether a new run may start in it.

`RunDir(path)` is the one place a run's paths are spelled (the resolved config, the Parquet
rollouts, the checkpoints and which one holds a weight version, the MLflow store and the
metrics files) and where a trajectory's task reference is kept; the trainer, replay, inspect,
plot, tracking and checkpoint code ask it instead of joining paths themselves.

One live `keeprl train` owns a run directory at a time. Ownership is an exclusive `flock` on
`<run>/.keeprl.lock`, held for the whole run: the kernel drops it when the process ends, by
kill -9 too, so a crashed run never leaves the directory stuck, and a second train into the
same directory is refused in one line before it writes anything. The lock file also records
the owner's pid and host, to name it in that line. (flock is local to one machine on network
filesystems that do not forward it; two hosts must not share an output directory.)

`check_start` decides, before anything is written, whether a run may start: a new run needs an
empty (or missing) directory, `--resume` needs a run to continue, and `--overwrite` deletes an
earlier keeprl run (and only a keeprl run) to start over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOCK_FILE = ".keeprl.lock"
CONFIG_FILE = "config.yaml"
CHECKPOINT_PREFIX = "step_"
REFERENCE_KEY = "reference"  # Trajectory.extra key of the task's reference answer


@dataclass(frozen=True)
class RunDir:
    """The layout of one run directory (see the module docstring)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        """The resolved config the run was started with."""
        return self.path / CONFIG_FILE

    @property
    def rollouts(self) -> Path:
        """The Parquet rollout store (rollout.RolloutStore), one file per step."""
        return self.path / "rollouts"

    @property
    def eval(self) -> Path:
        """Held-out evaluation samples (rl/evaluation.py): eval/<set>/step_<N>.parquet, N the
        number of updates of the evaluated policy."""
        return self.path / "eval"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint written after step `step` (0-based), whether or not it exists."""
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}"

    @property
    def initial_policy(self) -> Path:
        """Where a run that neither warm-starts (cached elsewhere) nor names model.checkpoint
        keeps the weights it started from."""
        return self.path / "initial_policy"

    def weights(self, version: int, model_checkpoint: str | None = None) -> Path:
        """The policy directory holding weight version `version`: the checkpoint after step
        version - 1, or for version 0 the weights the run started from (model.checkpoint, or
        the run's own initial policy). FileNotFoundError naming what is kept otherwise."""
        if version == 0:
            for candidate in (model_checkpoint, self.initial_policy):
                if candidate and (Path(candidate) / "config.json").exists():
                    return Path(candidate)
            raise FileNotFoundError(
                f"{self.path}: the initial policy is not stored with the run (a cached "
                "warm-start); use model.checkpoint or a later step"
            )
        path = self.checkpoint(version - 1) / "policy"
        if not (path / "config.json").exists():
            kept = sorted(p.name for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*"))
            raise FileNotFoundError(
                f"{self.path}: no checkpoint with weight version {version} "
                f"({self.checkpoint(version - 1).name}); kept: {kept or 'none'}. The weights "
                "that sampled a step are kept only with checkpoint.every=1 and a large enough "
                "checkpoint.keep_last"
            )
        return path

    @property
    def mlflow_store(self) -> Path:
        """The default local MLflow store (tracking.mlflow_uri unset)."""
        return self.path / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path / "mlartifacts"

    @property
    def mlflow_run_id(self) -> Path:
        """The file holding the id of the run's MLflow run."""
        return self.path / "mlflow_run_id"

    @property
    def pending_metrics(self) -> Path:
        """Metrics of the steps no checkpoint covers yet, one JSON line a step."""
        return self.path / "metrics.pending.jsonl"

    @property
    def committed_metrics(self) -> Path:
        """The last step whose metrics MLflow holds."""
        return self.path / "metrics.committed"

    @property
    def sending_metrics(self) -> Path:
        """Present while (or since a crash during) a send of metrics to MLflow."""
        return self.path / "metrics.sending"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @staticmethod
    def attach_reference(trajectory: Any, reference: dict[str, Any]) -> None:
        """Store the task's reference answer with a trajectory (so replay can re-score)."""
        trajectory.extra[REFERENCE_KEY] = reference

    @staticmethod
    def reference_of(trajectory: Any) -> dict[str, Any] | None:
        """The task reference a trajectory was stored with, or None."""
        return trajectory.extra.get(REFERENCE_KEY)


class RunDirError(ValueError):
    """The run directory cannot be used as asked; one line that names the fix."""


class RunLock:
    """An exclusive, crash-safe claim on a run directory (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock, creating the directory if needed; RunDirError if another process
        holds it."""
        usable(self.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Held open for the run's life. Python opens files non-inheritable, so programs the
            # run starts (Ray, vLLM) never hold the lock past it.
            f = open(self.dir / LOCK_FILE, "a+")
        except OSError as e:
            raise RunDirError(f"trainer.output_dir {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise
            f.seek(0)
            owner = f.read().strip()
            f.close()
            who = _describe(owner)
            raise RunDirError(
                f"{self.dir} is in use by another keeprl train{who}; wait for it to end or "
                "set trainer.output_dir to another directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(owner: str) -> str:
    try:
        info = json.loads(owner)
        return f" (pid {info['pid']} on {info['host']})"
    except (ValueError, KeyError, TypeError):
        return ""


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor: what decides whether
    `path` can be created (as a directory, or a file with its parents)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def usable(run_dir: Path) -> None:
    """RunDirError unless `run_dir` is, or can become, a writable directory."""
    probe = nearest_existing(run_dir)
    if probe.exists() and not probe.is_dir():
        what = "is" if probe == run_dir else f"is under {probe}, which is"
        raise RunDirError(f"trainer.output_dir {run_dir} {what} a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"trainer.output_dir {run_dir}: {probe} is not writable")


def contents(run_dir: Path) -> list[str]:
    """The names a run directory holds, the lock file aside (sorted; [] if it is missing)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def check_start(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """RunDirError unless a run may start in `run_dir` as asked (see the module docstring).
    Call it before taking the lock (so a refused run creates nothing) and again once it is
    held (the answer that counts)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: choose one")
    held = contents(run_dir)
    if resume:
        if CONFIG_FILE not in held:
            what = "does not exist" if not run_dir.exists() else f"holds no {CONFIG_FILE}"
            raise RunDirError(
                f"--resume: {run_dir} {what}, so there is no run to continue; "
                "start it without --resume"
            )
        return
    if not held:
        return
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    if not overwrite:
        raise RunDirError(
            f"{run_dir} is not empty ({shown}): pass --resume to continue the run in it, "
            "--overwrite to delete it and start over, or set trainer.output_dir to a new "
            "directory"
        )
    if CONFIG_FILE not in held:
        raise RunDirError(
            f"--overwrite: {run_dir} holds files but no keeprl run (no {CONFIG_FILE}); "
            "keeprl deletes only its own runs: choose another trainer.output_dir"
        )


def clear(run_dir: Path) -> None:
    """Delete everything in `run_dir` but the lock file (--overwrite, under the lock)."""
    for name in contents(run_dir):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
