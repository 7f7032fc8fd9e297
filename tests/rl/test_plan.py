"""`keeprl plan` (rl/plan.py): the full model's own numbers (docs/scale.md), what cannot fit is
named, placement and staleness change the step as stated, and the command's table and JSON."""

from __future__ import annotations

import dataclasses
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
    # then attention, indexer, shared expert and gate). Its backward holds its bf16 gradients
    # and their float32 reduce-scatter input, the next MoE layer's gathered weights, and the
    # root unit's (embeddings and head, 1.85B) weights and gradients: 8 bytes a parameter of
    # the layer and 4 of the root.
    assert counts.largest_block / 1e9 == pytest.approx(11.52, abs=0.01)
    assert counts.second_block == counts.largest_block  # 58 MoE layers
    assert counts.root / 1e9 == pytest.approx(1.85, abs=0.01)
    want = (2 + 4 + 2) * counts.largest_block + 4 * counts.root
    assert plan.working_set_gib * GIB == pytest.approx(want)


# Measured on one H200 (docs/benchmarks.md, v32-2layer, one process, fused AdamW): peak GiB of
# two of DeepSeek-V3.2's layers at full width with 128 and with all 256 routed experts.
MEASURED_ONE_GPU = {128: 69.2, 256: 114.7}


@pytest.mark.parametrize("experts", sorted(MEASURED_ONE_GPU))
def test_one_gpu_learner_memory_is_the_measured_one(experts):
    """The plan's one-GPU learner (states + a transient gradient + activations) at the
    benchmark's settings against what the benchmark measured, within 5% of it."""
    args = preset("deepseek-v3.2", num_hidden_layers=2, first_k_dense_replace=1)
    args = dataclasses.replace(args, n_routed_experts=experts)
    cfg = load_config(
        os.path.join(ROOT, "configs", "quickstart.yaml"),
        [
            "model.dtype=bfloat16",
            "optim.micro_batch_tokens=4096",
            "optim.activation_checkpointing=true",
            "data.prompts_per_step=1",
            "rollout.samples_per_prompt=2",
        ],
    )
    plan = make_plan(cfg, args, gpus=1, gpu="h200", prompt_tokens=256, avg_tokens=4096)
    measured = MEASURED_ONE_GPU[experts]
    assert plan.learner_total_gib == pytest.approx(measured, rel=0.05), plan
    # the states alone are well below it: the working set and activations are what is checked
    assert plan.learner_states_gib < 0.95 * measured


def test_what_does_not_fit_is_named(full):
    args, counts = full
    cfg = load_config(FULL)
    small = make_plan(cfg, args, gpus=32, gpu="h200", counts=counts, fp8_rollout=True)
    assert not small.fits and any(p.startswith("learner needs") for p in small.problems)
    big = make_plan(cfg, args, gpus=512, gpu="h200", counts=counts, fp8_rollout=True)
    assert big.fits, big.problems
    bf16 = make_plan(cfg, args, gpus=512, gpu="h200", counts=counts)  # 168 GB a GPU at TP 8
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
