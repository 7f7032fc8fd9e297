"""Metrics to MLflow, committed with the checkpoints so a killed run never duplicates a step.

Each step's metrics are appended to `<run>/metrics.pending.jsonl` as soon as the step ends.
They reach MLflow only when a checkpoint that covers them has been written (`commit(step)`),
and `<run>/metrics.committed` records the last step sent. On resume from a checkpoint at step
c, pending lines for steps <= c that a crash kept from MLflow are sent, and lines for steps
> c are dropped: those steps run again. So MLflow holds each step exactly once, at the cost of
lagging the live run by up to one checkpoint interval (the pending file is live).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

STORE_FILE = "mlflow.db"  # the default local store, in the run directory
RUN_ID_FILE = "mlflow_run_id"


def local_store_uri(run_dir: str | Path) -> str:
    """The tracking URI of a run directory's default local store."""
    return f"sqlite:///{(Path(run_dir) / STORE_FILE).resolve()}"


class Tracker:
    """One MLflow run per experiment directory (the run id is kept in `<run>/mlflow_run_id`).

    uri None logs to `sqlite:///<run>/mlflow.db` with artifacts under `<run>/mlartifacts`
    (`mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db` shows it).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        uri: str | None = None,
        experiment: str = "keeprl",
        run_name: str | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending = self.dir / "metrics.pending.jsonl"
        self.committed_file = self.dir / "metrics.committed"
        # A client, not mlflow's module-level "active run", so several trackers (and the
        # user's own MLflow use) can share a process. Default: a local SQLite store in the
        # run directory (MLflow's file store is frozen).
        self.client = MlflowClient(uri or local_store_uri(self.dir))
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(
                experiment, artifact_location=(self.dir / "mlartifacts").resolve().as_uri()
            )
        )
        id_file = self.dir / RUN_ID_FILE
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            id_file.write_text(self.run_id)

    @property
    def committed(self) -> int:
        """The last step whose metrics are in MLflow (-1 for none)."""
        return int(self.committed_file.read_text()) if self.committed_file.exists() else -1

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        # MLflow refuses to change a param; on resume the config must not have changed.
        new = [Param(k, v) for k, v in _flatten(params).items() if k not in logged]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's files, as artifacts of the run."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Record a finished step (pending until commit)."""
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        with open(self.pending, "a") as f:
            f.write(json.dumps({"step": step, "metrics": clean}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _pending(self) -> list[dict]:
        return read_pending_rows(self.pending)

    def commit(self, step: int) -> None:
        """A checkpoint covering `step` exists: send pending metrics up to it to MLflow."""
        from mlflow.entities import Metric

        done = self.committed
        pending = self._pending()
        rows = [r for r in pending if done < r["step"] <= step]
        metrics = [Metric(k, v, 0, r["step"]) for r in rows for k, v in r["metrics"].items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        _atomic_write(self.committed_file, str(step))
        keep = [r for r in pending if r["step"] > step]
        _atomic_write(self.pending, "".join(json.dumps(r) + "\n" for r in keep))

    def resume(self, checkpoint_step: int) -> None:
        """Reconcile after a restart from the checkpoint of `checkpoint_step` (-1: none)."""
        if checkpoint_step > self.committed:
            self.commit(checkpoint_step)
        keep = [r for r in self._pending() if r["step"] <= checkpoint_step]
        _atomic_write(self.pending, "".join(json.dumps(r) + "\n" for r in keep))

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric as MLflow holds it."""
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def read_pending_rows(path: str | Path) -> list[dict]:
    """The {"step", "metrics"} rows of a pending-metrics file, in file order ([] if none)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: it and anything after are incomplete
    return rows


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
