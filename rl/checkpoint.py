"""Run checkpoints: policy, optimizer and schedule, RNG states, step and data position.

A checkpoint is a directory `<run>/checkpoints/step_<N>/` holding the policy (in the
DeepSeek-V3.2 checkpoint layout, so any engine can load it), `learner.pt` (optimizer and
LR-schedule state) and `state.json` (the step it completes, the task stream position, the
weight version, RNG states). It is written under a temporary name and renamed into place, so
a kill at any moment leaves either the whole checkpoint or none; `latest()` only sees whole
ones. The step recorded is the last one fully done: resuming continues with the next.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy import Transformer, save_pretrained

_PREFIX = "step_"


@dataclass
class RunState:
    """What a resumed run needs besides the weights."""

    step: int  # the last completed step
    data_position: int
    weight_version: int
    extra: dict[str, Any]


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(
    run_dir: str | Path,
    policy: Transformer,
    learner_state: dict[str, Any],
    state: RunState,
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of `state.step` atomically; prune all but the newest keep_last."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_pretrained(policy, tmp / "policy")
    torch.save(learner_state, tmp / "learner.pt")
    meta = {
        "step": state.step,
        "data_position": state.data_position,
        "weight_version": state.weight_version,
        "extra": state.extra,
        "rng": _rng_state(),
    }
    (tmp / "state.json").write_text(json.dumps(meta, default=_jsonable))
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in state.json")


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_state(checkpoint: Path, restore_rng: bool = True) -> tuple[RunState, dict[str, Any]]:
    """(RunState, learner state dict) of a checkpoint; restores the RNG states by default.
    The policy weights are at `checkpoint / "policy"` (policy.load_pretrained)."""
    meta = json.loads((checkpoint / "state.json").read_text())
    if restore_rng:
        _set_rng_state(meta["rng"])
    learner_state = torch.load(checkpoint / "learner.pt", weights_only=False)
    return RunState(
        meta["step"], meta["data_position"], meta["weight_version"], meta["extra"]
    ), learner_state
