"""`keeprl plot`: a run's per-step metrics as a PNG, one panel per metric, x = step.

Metrics come from two places (rl.tracking): the run's MLflow store, which holds the steps
covered by a checkpoint, and `<run>/metrics.pending.jsonl`, the steps logged since. Both are
merged by step, MLflow winning where a step is in both (a crash between sending a step and
trimming the pending file leaves it in both). The store is read with a bare MlflowClient, not
a `Tracker`: opening a Tracker marks the run RUNNING, and plotting must not change a run. The
trainer calls `plot_run` at the end of a run and logs the figure as the MLflow artifact
`plots/curves.png`.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so plotting neither
needs a display nor changes the backend of a process that uses matplotlib itself.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .run_dir import RunDir
from .tracking import local_store_uri, read_pending_rows

DEFAULT_METRICS = ("reward_mean", "accuracy", "kl")  # those a run logged; kl needs a KL term
# and the held-out evaluations' (rl/evaluation.py), drawn at the steps they were taken
EVAL_HEADLINE = re.compile(r"eval/[^/]+/(greedy/accuracy|sampled/pass_at_\d+)")

History = Callable[[str], list[tuple[int, float]]]  # metric key -> [(step, value)]


class PlotError(ValueError):
    """Nothing to plot: a missing run directory or metric; the message says what exists."""


def _mlflow_uri(run: Path) -> str | None:
    """The run's tracking URI: tracking.mlflow_uri of its config.yaml, else the default local
    store, or None when that store does not exist (opening it would create it)."""
    cfg_file = RunDir(run).config
    if cfg_file.exists():
        uri = (yaml.safe_load(cfg_file.read_text()) or {}).get("tracking", {}).get("mlflow_uri")
        if uri:
            return uri
    return local_store_uri(run) if RunDir(run).mlflow_store.exists() else None


def read_committed(run_dir: str | Path) -> tuple[list[str], History]:
    """The metric keys the run's MLflow store holds and a reader of their histories, opened
    read-only: no Tracker, so the run's status is left as it is. ([], reader of nothing) when
    the run has no MLflow store yet."""
    run = Path(run_dir)
    uri, id_file = _mlflow_uri(run), RunDir(run).mlflow_run_id
    if uri is None or not id_file.exists():
        return [], lambda key: []
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = id_file.read_text().strip()
    try:
        keys = sorted(client.get_run(run_id).data.metrics)
    except MlflowException as e:
        raise PlotError(f"{run}: cannot read MLflow run {run_id} at {uri}: {e.message}") from e
    return keys, lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def read_pending(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """step -> metrics of `<run>/metrics.pending.jsonl`; a later line for a step wins (a
    resumed run logs the steps it reruns again)."""
    rows = read_pending_rows(RunDir(run_dir).pending_metrics)
    out: dict[int, dict[str, float]] = {}
    for r in rows:  # an evaluation's row is drawn at its own step ("at"), merged with others
        out.setdefault(int(r.get("at", r["step"])), {}).update(r["metrics"])
    return out


def read_metrics(
    run_dir: str | Path, keys: Sequence[str] | None = None, *, history: History | None = None
) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] ascending by step, committed and pending steps merged (MLflow
    wins). keys None: every metric the run logged. `history` reads the committed values
    instead of the run's MLflow store (the trainer passes its Tracker's)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run}: no such run directory")
    stored: list[str] = []
    reader = history
    if history is None or keys is None:  # the store is opened only when it is needed
        stored, committed = read_committed(run)
        reader = history or committed
    pending = read_pending(run)
    if keys is None:
        keys = sorted(set(stored) | {k for m in pending.values() for k in m})
    out = {}
    for key in keys:
        by_step = {s: m[key] for s, m in pending.items() if key in m}
        by_step.update(reader(key))
        if by_step:
            out[key] = sorted(by_step.items())
    return out


def plot_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    *,
    history: History | None = None,
) -> Path:
    """Write the curves of `metrics` (default: DEFAULT_METRICS, those the run logged) to `out`
    (default `<run>/curves.png`) and return its path. A named metric the run never logged is a
    PlotError that lists those it did."""
    run = Path(run_dir)
    if metrics:
        series = read_metrics(run, metrics, history=history)
    else:  # the defaults, and each eval set's headline: accuracy of greedy, pass@k sampled
        logged = read_metrics(run, history=history)
        keys = [*DEFAULT_METRICS, *(k for k in logged if EVAL_HEADLINE.fullmatch(k))]
        series = {k: logged[k] for k in keys if k in logged}
    missing = [k for k in metrics or () if k not in series]
    if missing or not series:
        logged = sorted(read_metrics(run, history=history))
        what = f"metric {', '.join(missing)} not logged" if missing else "no metrics logged yet"
        raise PlotError(f"{run}: {what}; logged: {', '.join(logged) or 'none'}")
    path = Path(out) if out is not None else RunDir(run).curves
    _draw(series, path, title=run.resolve().name)
    return path


def _draw(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 1.2 + 2.0 * len(series)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, points) in zip(axes, series.items(), strict=True):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3)
        if len(key) > 16:  # eval/<set>/<mode>/<metric> would overrun the panel as a y label
            ax.set_title(key, loc="left", fontsize=9)
        else:
            ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    # Written next to the target and renamed, so a reader never sees half a PNG.
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def main(args: Any) -> int:
    """The `keeprl plot RUN_DIR [--out PNG] [--metrics a,b]` handler."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        path = plot_run(args.run_dir, args.out, metrics)
    except (PlotError, OSError) as e:
        print(f"keeprl plot: {e}", file=sys.stderr)
        return 2
    print(f"curves written to {path}")
    return 0
