"""Run checkpoints: policy, optimizer and schedule, RNG states, step and data position.

A checkpoint is a directory `<run>/checkpoints/step_<N>/` holding the policy (in the
DeepSeek-V3.2 checkpoint layout, so any engine can load it), `learner.pt` (optimizer and
LR-schedule state; a sharded learner's optimizer state is in `optimizer/`, one file a rank,
written with torch.distributed.checkpoint between `begin` and `finish`), `state.json` (the
step it completes, the task stream position, the weight version, RNG states) and
`manifest.json`, the SHA-256 and size of every other file.
It is written under a temporary name and renamed into place, so a kill at any moment leaves
either the whole checkpoint or none; `latest()` only sees whole ones. Every load verifies the
manifest (`verify`), so flipped or truncated bytes are named instead of loaded; `--resume`
takes the newest checkpoint that verifies (`latest_intact`) and says which it skipped. The
step recorded is the last one fully done: resuming continues with the next.
"""

from __future__ import annotations

import hashlib
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

from .faults import crash_point
from .run_dir import CHECKPOINT_PREFIX, RunDir

_TEMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used, in one line naming the file."""


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


def begin(run_dir: str | Path) -> Path:
    """A new temporary checkpoint directory under the run's checkpoints (renamed into place by
    `finish`); shards written by several processes go in it first."""
    root = RunDir(run_dir).checkpoints
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root, prefix=_TEMP_PREFIX))
    except OSError as e:
        raise CheckpointError(
            f"cannot start a checkpoint under {root}: {e.strerror or e}"
        ) from None


def finish(
    run_dir: str | Path,
    tmp: Path,
    policy: Transformer,
    learner_state: dict[str, Any],
    state: RunState,
    keep_last: int = 2,
) -> Path:
    """Complete a checkpoint begun in `tmp` (whatever shards are already in it): the policy,
    learner.pt, state.json and the manifest, then rename it into place and prune all but the
    newest keep_last (0 keeps every checkpoint). A failed write leaves no partial directory
    behind and raises CheckpointError."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
    root = RunDir(run_dir).checkpoints
    final = RunDir(run_dir).checkpoint(state.step)
    try:
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
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
        crash_point("checkpoint", state.step)
        if final.exists():  # a re-run of the same step after a resume: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write the checkpoint of step {state.step} under {root}: {e.strerror or e}"
        ) from None
    if keep_last:
        for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save(
    run_dir: str | Path,
    policy: Transformer,
    learner_state: dict[str, Any],
    state: RunState,
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of `state.step` atomically (begin + finish, one process)."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
    return finish(run_dir, begin(run_dir), policy, learner_state, state, keep_last)


def clean_temp(run_dir: str | Path) -> list[Path]:
    """Remove the partial checkpoints a killed write left (run start, under the run lock)."""
    found = sorted(RunDir(run_dir).checkpoints.glob(f"{_TEMP_PREFIX}*"))
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "bytes"}} of every file under `directory`."""
    return {
        p.relative_to(directory).as_posix(): {"sha256": _digest(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify(checkpoint: str | Path) -> None:
    """CheckpointError naming the first file that is missing, resized or changed since the
    checkpoint was written (or the missing manifest)."""
    checkpoint = Path(checkpoint)
    try:
        want = json.loads((checkpoint / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint}: no {MANIFEST}: incomplete checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint}/{MANIFEST}: unreadable: {e}") from None
    for name, entry in want.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint's manifest lists it)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
        if _digest(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: damaged (SHA-256 differs from the manifest)")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in state.json")


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None (not verified: see latest_intact)."""
    root = RunDir(run_dir).checkpoints
    done = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / MANIFEST).exists())
    return done[-1] if done else None


def latest_intact(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was skipped."""
    root = RunDir(run_dir).checkpoints
    skipped = []
    for path in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
        try:
            verify(path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        return path, skipped
    return None, skipped


def load_state(
    checkpoint: Path, restore_rng: bool = True, *, verified: bool = False
) -> tuple[RunState, dict[str, Any]]:
    """(RunState, learner state dict) of a checkpoint, verified first unless the caller just
    did (`verified`, e.g. latest_intact's answer: hashing a large checkpoint twice is minutes);
    restores the RNG states by default. The policy weights are at `checkpoint / "policy"`."""
    if not verified:
        verify(checkpoint)
    meta = json.loads((checkpoint / "state.json").read_text())
    if restore_rng:
        _set_rng_state(meta["rng"])
    learner_state = torch.load(checkpoint / "learner.pt", weights_only=False)
    if learner_state.get("optimizer_format") == "dcp":  # shards in a directory beside it
        learner_state["optimizer"] = str(checkpoint / learner_state["optimizer"])
    return RunState(
        meta["step"], meta["data_position"], meta["weight_version"], meta["extra"]
    ), learner_state
