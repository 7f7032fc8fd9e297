"""`keeprl plan` (rl/plan.py): the full model's own numbers (docs/scale.md), what cannot fit is
named, placement and staleness change the step as stated, and the command's table and JSON."""

from __future__ import annotations

import json
import os

import pytest

from policy import preset
from rl.cli import main as cli
from rl.config import load_config
from rl.plan import GIB, make_plan, param_counts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
FULL = os.path.join(ROOT, "configs", "deepseek-v3.2-math.yaml")


@pytest.fixture(scope="module")
def full():
    args = preset("deepseek-v3.2")
    return args, param_counts(args)


def test_the_full_models_counts_and_training_states(full):
    args, counts = full
    assert round(counts.total / 1e9, 1) == 671.9 and round(counts.routed / 1e9, 1) == 653.9
    cfg = load_config(FULL)
    plan = make_plan(cfg, args, gpus=64, gpu="h200", counts=counts, fp8_rollout=True)
    assert round(plan.active_params_b, 1) == 38.4
    # 8 bytes a parameter (bf16 weights, gradients and both moments) over 64 GPUs: 84 GB.
    assert plan.learner_states_gib * GIB / 1e9 == pytest.approx(84.0, abs=0.1)
    # FSDP's unit is a decoder layer: a MoE layer's 11.52B parameters (11.27B routed experts,
    # then attention, indexer, shared expert and gate), gathered twice, plus its gradients.
    assert counts.largest_block / 1e9 == pytest.approx(11.52, abs=0.01)
    assert plan.fsdp_gathered_gib * GIB == pytest.approx(3 * 2 * counts.largest_block)


def test_what_does_not_fit_is_named(full):
    args, counts = full
    cfg = load_config(FULL)
    small = make_plan(cfg, args, gpus=32, gpu="h200", counts=counts, fp8_rollout=True)
    assert not small.fits and any(p.startswith("learner needs") for p in small.problems)
    big = make_plan(cfg, args, gpus=256, gpu="h200", counts=counts, fp8_rollout=True)
    assert big.fits, big.problems
    bf16 = make_plan(cfg, args, gpus=256, gpu="h200", counts=counts)  # 168 GB a GPU at TP 8
    assert any(p.startswith("rollout engine") for p in bf16.problems)


def test_staleness_overlaps_only_disaggregated_rollouts(full):
    args, counts = full
    kw = dict(gpus=256, gpu="h200", counts=counts, fp8_rollout=True)
    for staleness in (0, 1):
        cfg = load_config(FULL, [f"rollout.max_staleness={staleness}"])
        co = make_plan(cfg, args, **kw)
        assert co.step_s == pytest.approx(
            co.rollout_s + max(co.learner_compute_s, co.learner_comm_s) + co.sync_s
        )
        apart = make_plan(cfg, args, rollout_gpus=128, **kw)
        learner = max(apart.learner_compute_s, apart.learner_comm_s)
        want = (
            max(apart.rollout_s, learner + apart.sync_s)
            if staleness
            else apart.rollout_s + learner + apart.sync_s
        )
        assert apart.step_s == pytest.approx(want) and apart.learner_gpus == 128


def test_the_command_prints_a_row_per_gpu_count_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    config = os.path.join(ROOT, "configs", "quickstart.yaml")
    assert cli(["plan", config, "--gpus", "1", "8", "--gpu", "h100", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("| 1 x H100 |") == 1 and text.count("| 8 x H100 |") == 1
    rows = json.loads(out.read_text())
    assert [r["gpus"] for r in rows] == [1, 8] and all(r["fits"] for r in rows)


def test_a_missing_checkpoint_says_to_name_a_preset(capsys):
    assert cli(["plan", FULL, "--gpus", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--preset" in err
