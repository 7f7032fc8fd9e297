"""benchmarks/learner.py stays alive: its tiny configuration runs a real learner step on the
CPU, and its GPU configuration is the 2.36B-parameter policy its figures are about."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from policy import Transformer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learner.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_learner", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_configuration_runs_on_the_cpu():
    bench = _bench()
    r = bench.run("tiny", "cpu", steps=1)
    assert r["tokens_per_step"] == 256 and r["tokens_per_s"] > 0
    assert 0 < r["mfu"] < 1 and math.isfinite(r["model_flops_per_token"])
    assert len(r["top_kernels"]) == 5
    assert "MFU" in bench.render(r)
    # the label is the optimizer's own setting: Learner fuses AdamW on CUDA only
    assert r["adamw"] == "foreach" and "foreach AdamW" in bench.render(r)


def test_gpu_configuration_is_the_issue_policy():
    bench = _bench()
    args = bench.policy_args("moe-4k")
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(args).parameters())
    assert round(n / 1e9, 2) == 2.36
    # 6 x the matmul parameters a token uses dominates; attention adds a few percent at 4K.
    flops = bench.model_flops_per_token(args, 4096)
    assert 3e9 < flops < 5e9
    assert bench.model_flops_per_token(args, 16384) > flops  # more visible keys per token


def test_the_tiny_configuration_runs_under_fsdp2_in_a_one_rank_group():
    import torch.distributed as dist

    bench = _bench()
    try:
        r = bench.run("tiny", "cpu", steps=1, profile=False, fsdp=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert r["fsdp"] and r["tokens_per_s"] > 0 and "FSDP2, 1 rank" in bench.render(r)


def test_the_full_width_configuration_is_two_of_the_models_own_layers():
    bench = _bench()
    args = bench.policy_args("v32-2layer")
    assert (args.hidden_size, args.n_routed_experts, args.n_moe_layers) == (7168, 256, 1)
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(args).parameters())
    assert round(n / 1e9, 1) == 14.0
