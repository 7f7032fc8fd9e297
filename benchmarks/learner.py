"""The learner's GRPO step (rl.learner.Learner.step) at hardware speed: tokens/s, model FLOPs per
token, MFU, peak memory and the profile's top kernels, on one device.

Configurations (`--config`):
- `moe-4k` (CUDA): the 2.36B-parameter policy of the learner-speed issue: 4 layers (1 dense + 3
  MoE), hidden 2048, 16 heads at DeepSeek-V3.2's head dims, the real indexer (64 x 128,
  top-2048), vocab 129,280, 64 routed experts (6 active) + 1 shared, bf16; one group of 8
  sequences x 4,096 tokens (256 prompt + 3,840 response) in micro-batches of 8,192 tokens;
  AdamW, OPSM, Keep Routing and Keep Sampling Mask on (20 kept ids a token).
- `moe-16k` (CUDA): the same policy, 2 sequences x 16,384 tokens, activation checkpointing on.
- `moe-32k` (CUDA): the same policy, 1 sequence x 32,768 tokens, activation checkpointing on.
- `v32-2layer` (CUDA): two of DeepSeek-V3.2's own layers at full width (1 dense + 1 MoE with
  256 experts, 14.0B parameters with the embeddings), 2 x 4,096 tokens, activation
  checkpointing; with --fsdp, the scale-out issue's world-size-1 FSDP2 run.

--fsdp runs the learner as rl.sharded.ShardedLearner (the policy under FSDP2) in a process
group of one rank (NCCL on CUDA, gloo on the CPU), as each rank of `ray.learner_workers` does.
- `tiny` (any device, the CPU test suite runs it): the tiny policy, 4 x 64 tokens.

The batch's old log-probs and routing are the policy's own (a no-grad pass before timing), so
the ratio starts at 1 as on-policy data does. Model FLOPs per trained token, stated as computed
(`rl.plan.model_flops_per_token`): 6 x the matmul parameters a token uses (attention and indexer
projections, the dense FFN or the shared + active routed experts, the gate, the LM head), plus
attention 3 x 2 x heads x (qk + v head dims) x the keys DSA lets it see, min(position + 1,
index_topk), plus the indexer's scores 2 x its heads x its dim x (position + 1), forward only
(nothing trains it in a policy-gradient step). MFU divides the achieved FLOP/s by a matmul
measured in the same run (bf16 8192^3 on CUDA, float32 2048^3 on the CPU).

    python benchmarks/learner.py --config moe-4k [--attention reference] [--steps 3] [--json f]
    python benchmarks/learner.py --config v32-2layer --fsdp [--adamw fused|foreach]

--adamw picks AdamW's implementation for an A/B of it (default: the learner's own, fused on
CUDA, torch's default foreach on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from policy import ModelArgs, Transformer, preset  # noqa: E402
from rl.batch import Batch  # noqa: E402
from rl.learner import AlgorithmConfig, Learner, LearnerConfig, OptimConfig  # noqa: E402
from rl.plan import model_flops_per_token  # noqa: E402

CONFIGS = {
    "moe-4k": dict(seqs=8, tokens=4096, prompt=256, micro=8192, ckpt=False),
    "moe-16k": dict(seqs=2, tokens=16384, prompt=256, micro=16384, ckpt=True),
    "moe-32k": dict(seqs=1, tokens=32768, prompt=256, micro=32768, ckpt=True),
    "v32-2layer": dict(seqs=2, tokens=4096, prompt=256, micro=4096, ckpt=True),
    "tiny": dict(seqs=4, tokens=64, prompt=8, micro=128, ckpt=False),
}
KEPT = 20


def policy_args(config: str, experts: int | None = None) -> ModelArgs:
    if config == "tiny":
        return preset("tiny", index_topk=16)
    if config == "v32-2layer":  # DeepSeek-V3.2's own layers: one dense, one MoE (14.0B)
        # --experts trims the routed experts (V3.2 has 256) where the full layer does not fit.
        extra = {} if experts is None else {"n_routed_experts": experts}
        return preset("deepseek-v3.2", num_hidden_layers=2, first_k_dense_replace=1, **extra)
    return preset(
        "deepseek-v3.2",
        num_hidden_layers=4,
        first_k_dense_replace=1,
        hidden_size=2048,
        num_attention_heads=16,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=1,
        n_group=8,
        topk_group=4,
    )


def matmul_peak(device: str) -> float:
    """FLOP/s of one large matmul on the device (bf16 on CUDA, float32 on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ a
    _sync(device)
    start, reps = time.perf_counter(), 10 if device == "cuda" else 3
    for _ in range(reps):
        a @ a
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_batch(policy: Transformer, learner: Learner, cfg: dict, seed: int = 0) -> Batch:
    """One group of sequences whose old log-probs, routing and kept ids the policy itself gives:
    random tokens, KEPT kept ids a response token (its own id and random others)."""
    g = torch.Generator().manual_seed(seed)
    b, t, v = cfg["seqs"], cfg["tokens"], policy.args.vocab_size
    ids = torch.randint(0, v, (b, t), generator=g)
    kept = torch.randint(0, v, (b, t, KEPT), generator=g)
    kept[..., 0] = ids
    kept = kept.sort(-1).values
    dup = torch.zeros_like(kept, dtype=torch.bool)
    dup[..., 1:] = kept[..., 1:] == kept[..., :-1]
    kept = kept.masked_fill(dup, -1)  # distinct ids; the token itself always kept
    dev = policy.lm_head.weight.device
    batch = Batch(
        input_ids=ids,
        prompt_lens=torch.full((b,), cfg["prompt"]),
        response_lens=torch.full((b,), t - cfg["prompt"]),
        old_logprobs=torch.zeros(b, t),
        rewards=torch.rand(b, generator=g),
        group_ids=torch.zeros(b, dtype=torch.long),
        kept_ids=kept,
    ).to(dev)
    with torch.no_grad():
        logp, _, routing = learner.token_logprobs(policy, batch)
    batch.old_logprobs, batch.routing = logp.float(), routing
    return batch


def _one_rank_group(device: str) -> None:
    """A torch.distributed group of one rank on a free local port (for --fsdp)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
    )


def _with_adamw(cls: type, adamw: str) -> type:
    """The learner class with AdamW fused or foreach as asked ("learner": unchanged)."""
    if adamw == "learner":
        return cls
    return type(cls.__name__, (cls,), {"fused_adamw": adamw == "fused"})


def run(
    config: str,
    device: str,
    steps: int,
    profile: bool = True,
    attention: str = "auto",
    fsdp: bool = False,
    experts: int | None = None,
    adamw: str = "learner",
) -> dict:
    cfg = CONFIGS[config]
    args = policy_args(config, experts)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    policy = Transformer(args, attention=attention).to(device, dtype)
    learner_cfg = LearnerConfig(
        optim=OptimConfig(
            lr=1e-6, micro_batch_tokens=cfg["micro"], activation_checkpointing=cfg["ckpt"]
        ),
        algorithm=AlgorithmConfig(opsm=True),
    )
    if fsdp:
        from rl.sharded import ShardedLearner

        _one_rank_group(device)
        learner = _with_adamw(ShardedLearner, adamw)(policy, learner_cfg)
        policy = learner.policy
    else:
        learner = _with_adamw(Learner, adamw)(policy, learner_cfg)
    fused = bool(learner.optimizer.defaults.get("fused"))
    batch = make_batch(policy, learner, cfg)
    learner.step(batch)  # warm-up: allocations, kernel compilation
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        learner.step(batch)
    _sync(device)
    secs = (time.perf_counter() - start) / steps
    tokens = cfg["seqs"] * cfg["tokens"]
    flops = model_flops_per_token(args, cfg["tokens"])
    peak = matmul_peak(device)
    out = {
        "config": config,
        "attention": attention,
        "fsdp": fsdp,
        "adamw": "fused" if fused else "foreach",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": sum(p.numel() for p in policy.parameters()),
        "tokens_per_step": tokens,
        "step_s": secs,
        "tokens_per_s": tokens / secs,
        "model_flops_per_token": flops,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": flops * tokens / secs / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            learner.step(batch)
            _sync(device)
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        events = list(prof.key_averages())
        if device == "cuda":
            # Kernels only: a Triton launch inside an autograd Function is also counted as
            # that Function's own device time, which would count it twice.
            cuda = torch.autograd.DeviceType.CUDA
            events = [e for e in events if getattr(e, "device_type", None) == cuda] or events
        events.sort(key=lambda e: getattr(e, key, 0), reverse=True)
        total = sum(getattr(e, key, 0) for e in events) or 1
        out["top_kernels"] = [
            {"name": e.key[:80], "share": getattr(e, key, 0) / total} for e in events[:5]
        ]
    return out


def render(r: dict) -> str:
    lines = [
        f"{r['config']} ({r.get('attention', 'auto')} attention"
        f"{', FSDP2, 1 rank' if r.get('fsdp') else ''}, {r.get('adamw', '?')} AdamW) on "
        f"{r['device']} "
        f"(torch {r['torch']}): {r['params'] / 1e6:,.1f}M parameters, "
        f"{r['tokens_per_step']} tokens a step",
        f"step {r['step_s']:.3f} s, {r['tokens_per_s']:,.0f} tokens/s, "
        f"{r['model_flops_per_token'] / 1e9:.3g} GFLOP per token, MFU {r['mfu']:.1%} of a "
        f"matmul measured at {r['matmul_peak_tflops']:.3g} TFLOP/s",
    ]
    if r["peak_memory_gib"] is not None:
        lines.append(f"peak memory {r['peak_memory_gib']:.1f} GiB")
    for k in r.get("top_kernels", []):
        lines.append(f"  {k['share']:6.1%}  {k['name']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--attention", choices=["auto", "reference", "triton"], default="auto")
    parser.add_argument(
        "--fsdp", action="store_true", help="the learner under FSDP2 in a one-rank group"
    )
    parser.add_argument(
        "--experts", type=int, help="v32-2layer: routed experts (V3.2 has 256), to fit a device"
    )
    parser.add_argument(
        "--adamw",
        choices=["learner", "fused", "foreach"],
        default="learner",
        help="AdamW's implementation (learner: the learner class's own choice)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    a = parser.parse_args()
    result = run(
        a.config,
        a.device,
        a.steps,
        profile=not a.no_profile,
        attention=a.attention,
        fsdp=a.fsdp,
        experts=a.experts,
        adamw=a.adamw,
    )
    print(render(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
