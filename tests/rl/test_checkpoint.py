"""Run checkpoints: a digest per file verified on every load, the newest intact one found
past damaged ones, keep_last honoured (0 keeps all), and a failed write (a full disk) that
leaves one line and no partial directory."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from policy import Transformer, preset
from rl import checkpoint as ckpt


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=64))


def _save(run, model, step, keep_last=0):
    state = ckpt.RunState(step, 10 * step, step + 1, {})
    return ckpt.save(run, model, {"optimizer": {"step": step}}, state, keep_last=keep_last)


def test_checkpoints_verify_and_load(tmp_path, model):
    path = _save(tmp_path, model, 3)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert {"state.json", "learner.pt", "policy/config.json"} <= set(manifest)
    assert any(name.endswith(".safetensors") for name in manifest)
    ckpt.verify(path)
    state, learner = ckpt.load_state(path, restore_rng=False)
    assert (state.step, state.data_position, state.weight_version) == (3, 30, 4)
    assert learner == {"optimizer": {"step": 3}}


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_damage_is_named_and_resume_falls_back_to_the_newest_intact(tmp_path, model):
    for step in (1, 3, 5):
        _save(tmp_path, model, step)
    weights = next((tmp_path / "checkpoints/step_000005/policy").glob("*.safetensors"))
    _flip_a_byte(weights)
    with pytest.raises(ckpt.CheckpointError, match=r"safetensors: damaged \(SHA-256"):
        ckpt.verify(weights.parents[1])
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load_state(weights.parents[1])
    (tmp_path / "checkpoints/step_000003/learner.pt").unlink()
    found, skipped = ckpt.latest_intact(tmp_path)
    assert found.name == "step_000001"
    assert len(skipped) == 2 and "damaged" in skipped[0] and "learner.pt: missing" in skipped[1]
    assert "\n" not in "".join(skipped)


def test_a_truncated_file_and_a_missing_manifest_are_damage(tmp_path, model):
    path = _save(tmp_path, model, 0)
    state = path / "state.json"
    state.write_text(state.read_text()[:-5])
    with pytest.raises(ckpt.CheckpointError, match=r"state\.json: \d+ bytes, the manifest says"):
        ckpt.verify(path)
    (path / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json: incomplete"):
        ckpt.verify(path)
    assert ckpt.latest(tmp_path) is None


@pytest.mark.parametrize(("keep_last", "kept"), [(0, [0, 1, 2, 3]), (1, [3]), (2, [2, 3])])
def test_keep_last(tmp_path, model, keep_last, kept):
    for step in range(4):
        _save(tmp_path, model, step, keep_last=keep_last)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"step_{s:06d}" for s in kept]


def test_negative_keep_last_is_refused_before_anything_is_deleted(tmp_path, model):
    _save(tmp_path, model, 0)
    with pytest.raises(ValueError, match="keep_last must be >= 0"):
        _save(tmp_path, model, 1, keep_last=-1)
    assert ckpt.latest(tmp_path).name == "step_000000"


def test_a_full_disk_leaves_one_line_and_no_partial_checkpoint(tmp_path, model, monkeypatch):
    _save(tmp_path, model, 0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(ckpt.CheckpointError) as err:
        _save(tmp_path, model, 1)
    assert str(err.value).endswith("No space left on device") and "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000"]


def test_orphaned_temp_directories_are_cleaned(tmp_path, model):
    _save(tmp_path, model, 0)
    orphan = tmp_path / "checkpoints" / ".tmp-abc123"
    (orphan / "policy").mkdir(parents=True)
    assert ckpt.clean_temp(tmp_path) == [orphan] and not orphan.exists()
    assert ckpt.latest(tmp_path).name == "step_000000"
