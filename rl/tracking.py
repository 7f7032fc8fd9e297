"""Metrics to MLflow, committed with the checkpoints so a killed run never duplicates a step.

Each step's metrics are appended to `<run>/metrics.pending.jsonl` as soon as the step ends.
They reach MLflow only when a checkpoint that covers them has been written (`commit(step)`),
and `<run>/metrics.committed` records the last step sent. On resume from a checkpoint at step
c, pending lines for steps <= c that a crash kept from MLflow are sent, and lines for steps
> c are dropped: those steps run again. So MLflow holds each step exactly once, at the cost of
lagging the live run by up to one checkpoint interval (the pending file is live).

When a resume has to fall back past committed steps (the newest checkpoints were damaged),
those steps run again; MLflow cannot delete metric points, so the run continues in a new
MLflow run that holds the old one's params and its metrics up to the checkpoint, tagged
`keeprl.resumed_from_run`; the old run is marked FAILED and tagged `keeprl.superseded_by`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .faults import crash_point
from .run_dir import RunDir


def local_store_uri(run_dir: str | Path) -> str:
    """The tracking URI of a run directory's default local store."""
    return f"sqlite:///{RunDir(run_dir).mlflow_store.resolve()}"


class Tracker:
    """One MLflow run per experiment directory (the run id is kept in `<run>/mlflow_run_id`).

    uri None logs to `sqlite:///<run>/mlflow.db` with artifacts under `<run>/mlartifacts`
    (`mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db` shows it). run_name None names
    the MLflow run after the run directory.
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
        layout = RunDir(self.dir)
        self.pending = layout.pending_metrics
        self.committed_file = layout.committed_metrics
        self.sending_file = layout.sending_metrics
        self.id_file = layout.mlflow_run_id
        # A client, not mlflow's module-level "active run", so several trackers (and the
        # user's own MLflow use) can share a process. Default: a local SQLite store in the
        # run directory (MLflow's file store is frozen).
        self.client = MlflowClient(uri or local_store_uri(self.dir))
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(
                experiment, artifact_location=layout.mlflow_artifacts.resolve().as_uri()
            )
        )
        if self.id_file.exists():
            self.run_id = self.id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = run_name or self.dir.resolve().name
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            _atomic_write(self.id_file, self.run_id)

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

    def log_step(self, step: int, metrics: dict[str, float], at: int | None = None) -> None:
        """Record a finished step (pending until commit). `at`: the MLflow step to log the
        metrics at, when it is not `step` (the held-out evaluation after a run's last step,
        at total_steps updates); the row is committed and resumed with `step`."""
        clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        row: dict[str, Any] = {"step": step, "time": int(time.time() * 1000), "metrics": clean}
        if at is not None:
            row["at"] = at
        with open(self.pending, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _pending(self) -> list[dict]:
        return read_pending_rows(self.pending)

    def commit(self, step: int) -> None:
        """A checkpoint covering `step` exists: send pending metrics up to it to MLflow.

        `<run>/metrics.sending` marks a send in flight. A crash inside it (MLflow has taken
        some or all of the batch, metrics.committed does not say so) leaves the mark, and the
        next commit sends only the (metric, step) points MLflow does not hold yet.
        """
        from mlflow.entities import Metric

        done = self.committed
        pending = self._pending()
        rows = [r for r in pending if done < r["step"] <= step]
        metrics = [
            Metric(k, v, r.get("time", 0), r.get("at", r["step"]))
            for r in rows
            for k, v in r["metrics"].items()
        ]
        if self.sending_file.exists():
            held = {
                (key, m.step)
                for key in {m.key for m in metrics}
                for m in self.client.get_metric_history(self.run_id, key)
                if done < m.step <= step + 1  # the last evaluation is logged one step on
            }
            metrics = [m for m in metrics if (m.key, m.step) not in held]
        _atomic_write(self.sending_file, str(step))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        crash_point("mlflow_sent", step)
        _atomic_write(self.committed_file, str(step))
        self.sending_file.unlink()
        keep = [r for r in pending if r["step"] > step]
        _atomic_write(self.pending, "".join(json.dumps(r) + "\n" for r in keep))

    def resume(self, checkpoint_step: int) -> None:
        """Reconcile after a restart from the checkpoint of `checkpoint_step` (-1: none)."""
        if checkpoint_step > self.committed:
            self.commit(checkpoint_step)
        else:
            if checkpoint_step < self.committed:
                self._supersede(checkpoint_step)
            self.sending_file.unlink(missing_ok=True)  # nothing of it is left to send
        keep = [r for r in self._pending() if r["step"] <= checkpoint_step]
        _atomic_write(self.pending, "".join(json.dumps(r) + "\n" for r in keep))

    def _supersede(self, step: int) -> None:
        """Continue in a new MLflow run holding the old one's params and metrics up to `step`
        (see the module docstring)."""
        from mlflow.entities import Metric, Param

        old = self.client.get_run(self.run_id)
        new_id = self.client.create_run(
            old.info.experiment_id,
            run_name=old.info.run_name,
            tags={"keeprl.resumed_from_run": self.run_id, "keeprl.resumed_from_step": str(step)},
        ).info.run_id
        params = [Param(k, v) for k, v in old.data.params.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(new_id, params=params[i : i + 100])
        metrics = [
            Metric(key, m.value, m.timestamp, m.step)
            for key in old.data.metrics
            for m in self.client.get_metric_history(self.run_id, key)
            if m.step <= step
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(new_id, metrics=metrics[i : i + 1000])
        self.client.set_tag(self.run_id, "keeprl.superseded_by", new_id)
        self.client.set_terminated(self.run_id, status="FAILED")
        _atomic_write(self.id_file, new_id)
        _atomic_write(self.committed_file, str(step))
        self.run_id = new_id

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric as MLflow holds it, in step order."""
        points = self.client.get_metric_history(self.run_id, key)
        return sorted((m.step, m.value) for m in points)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run as FINISHED, FAILED or KILLED (Ctrl-C)."""
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
