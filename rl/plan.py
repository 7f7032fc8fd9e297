"""`keeprl plan CONFIG --gpus N --gpu h100|h200`: what a config needs on a GPU cluster, before
anyone books one: memory per GPU (training states, FSDP2's working set, activations, the
rollout engines' weights and KV cache) and the expected step time and throughput, flagging what
cannot fit.

The model is what keeprl runs today: the learner data parallel under FSDP2 per block over its
GPUs (rl/sharded.py; one process on one GPU), the rollout engines tensor parallel over
rollout.engine_kwargs' tensor_parallel_size GPUs each, weights synchronised through the
learner's first rank, and placement either colocated (every GPU samples, then every GPU
trains; the engines release their memory during the learner step) or disaggregated
(--rollout-gpus R of the N sample, the rest train; with rollout.max_staleness 1 the two
overlap). Every constant below says where it comes from; the figures are estimates, not
measurements:

- learner memory: the training states, plus the one-process learner's transient gradient (its
  peak measured on one H200 at DeepSeek-V3.2's layer dims, docs/benchmarks.md) or FSDP2's
  buffers for the largest layer (counted in make_plan; measured at one rank only);

- compute: the bf16 matmul rate measured on the H200 (docs/benchmarks.md, 789 TFLOP/s); the
  H100 SXM has the same GH100 compute (132 SMs at the same clocks), so the same rate;
- the learner's efficiency: the MFU benchmarks/learner.py measured on one H200 (moe-4k, 26.9%),
  applied to the model FLOPs of model_flops_per_token;
- communication: FSDP moves 3 x the parameters' bytes through each GPU per micro-batch
  (all-gather forward and backward, reduce-scatter of gradients), overlapped with compute (the
  larger of the two counts), over NVLink within a node of 8 (450 GB/s a GPU, one direction) and
  400 Gb/s InfiniBand (50 GB/s a GPU) across nodes;
- decoding: memory-bound, each step reading the engine's weights that the batch's tokens touch
  (the MoE experts any of them routes to) and the KV entries DSA reads (the top-k latent rows,
  and every indexer key), at the spec-sheet HBM bandwidth: an optimistic bound;
- weight sync: the full bf16 state through one 50 GB/s link per rollout engine (today's sync
  streams it bucket by bucket from the learner's first rank through Ray's object store).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policy import ModelArgs, Transformer, preset

from .config import ConfigError, ExperimentConfig, load_config

GIB = 1 << 30
MATMUL_TFLOPS = 789.0  # bf16 8192^3, measured on an H200 (docs/benchmarks.md)
LEARNER_MFU = 0.269  # benchmarks/learner.py moe-4k on one H200 (docs/benchmarks.md)
NVLINK_GBS = 450.0  # a GPU's NVLink 4 bandwidth, one direction
IB_GBS = 50.0  # a GPU's 400 Gb/s InfiniBand
GPUS_PER_NODE = 8
LOGITS_CHUNK_BYTES = 256 << 20  # rl.logprobs' vocabulary block


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # as the driver reports it
    hbm_tbs: float  # spec-sheet HBM bandwidth


GPU_KINDS = {
    "h100": GPU("NVIDIA H100 SXM 80GB", 79.6, 3.35),
    "h200": GPU("NVIDIA H200 141GB", 140.4, 4.8),
}


def model_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token of a sequence of seq_len tokens: 6 x the matmul parameters a
    token uses (attention and indexer projections, the dense FFN or the shared + active routed
    experts, the gate, the LM head), plus attention 3 x 2 x heads x (qk + v head dims) x the
    keys DSA lets it see, min(position + 1, index_topk), plus the indexer's scores 2 x its heads
    x its dim x (position + 1), forward only (nothing trains it in a policy-gradient step)."""
    d, h = args.hidden_size, args.num_attention_heads
    attn = (
        d * args.q_lora_rank
        + args.q_lora_rank * h * args.qk_head_dim
        + d * (args.kv_lora_rank + args.qk_rope_head_dim)
        + args.kv_lora_rank * h * (args.qk_nope_head_dim + args.v_head_dim)
        + h * args.v_head_dim * d
    )
    indexer = (
        args.q_lora_rank * args.index_n_heads * args.index_head_dim
        + d * args.index_head_dim
        + d * args.index_n_heads
    )
    moe_ffn = (
        3 * d * args.moe_intermediate_size * (args.n_shared_experts + args.num_experts_per_tok)
        + d * args.n_routed_experts
    )
    n_moe = args.n_moe_layers
    params = (
        args.num_hidden_layers * (attn + indexer)
        + (args.num_hidden_layers - n_moe) * 3 * d * args.intermediate_size
        + n_moe * moe_ffn
        + d * args.vocab_size
    )
    pos = torch.arange(seq_len, dtype=torch.float64) + 1
    keys = pos.clamp(max=args.index_topk).mean().item()
    per_layer = 3 * 2 * h * (args.qk_head_dim + args.v_head_dim) * keys
    per_layer += 2 * args.index_n_heads * args.index_head_dim * pos.mean().item()
    return 6 * params + args.num_hidden_layers * per_layer


@dataclass(frozen=True)
class ParamCounts:
    total: int
    routed: int  # the routed experts' stacked weights
    largest_block: int  # the largest FSDP unit below the root: one decoder layer
    second_block: int  # the next largest (the unit prefetched while the largest runs)
    root: int  # the root unit: the embeddings, the final norm and the LM head
    largest_tensor: int  # one parameter (a MoE layer's stacked expert weight)

    @property
    def dense(self) -> int:
        return self.total - self.routed


def param_counts(args: ModelArgs) -> ParamCounts:
    """Counted from the module itself, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(args)
    total = routed = root = largest = 0
    blocks: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        largest = max(largest, n)
        if ".mlp.experts." in name:
            routed += n
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            key = ".".join(parts[:3])
            blocks[key] = blocks.get(key, 0) + n
        else:
            root += n
    sizes = sorted(blocks.values(), reverse=True) + [0, 0]
    return ParamCounts(total, routed, sizes[0], sizes[1], root, largest)


@dataclass
class Plan:
    """One configuration's estimate. Bytes are per GPU; times are seconds a step."""

    gpu: str
    gpus: int
    placement: str
    rollout_gpus: int
    learner_gpus: int
    params_b: float
    active_params_b: float
    sequences: int
    train_tokens: int
    learner_states_gib: float
    working_set_gib: float  # FSDP2's buffers, or one process's transient gradient
    activations_gib: float
    learner_total_gib: float
    rollout_weights_gib: float
    kv_cache_gib: float
    concurrent_sequences: int  # an engine's, at once
    rollout_total_gib: float
    capacity_gib: float
    rollout_s: float
    learner_compute_s: float
    learner_comm_s: float
    sync_s: float
    step_s: float
    tokens_per_s_per_gpu: float
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def make_plan(
    cfg: ExperimentConfig,
    args: ModelArgs,
    *,
    gpus: int,
    gpu: str,
    rollout_gpus: int | None = None,
    prompt_tokens: int = 512,
    avg_tokens: int | None = None,
    fp8_rollout: bool = False,
    counts: ParamCounts | None = None,
) -> Plan:
    """The estimate for cfg's run on `gpus` GPUs of kind `gpu` (see the module docstring).
    rollout_gpus: disaggregated placement with that many sampling GPUs (None: colocated).
    avg_tokens: the mean trained sequence length (None: prompt + max_tokens, every response
    at its limit). fp8_rollout: the engines serve FP8 weights and KV cache (one byte an
    element, as the released checkpoint and vLLM's FlashMLA path do)."""
    spec = GPU_KINDS[gpu]
    counts = counts or param_counts(args)
    bpp = _bytes(cfg.model.dtype)
    tp = int(cfg.rollout.engine_kwargs.get("tensor_parallel_size", 1))
    max_new = cfg.rollout.sampling.max_tokens
    seq_len = avg_tokens or prompt_tokens + max_new
    sequences = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    train_tokens = sequences * seq_len
    problems: list[str] = []
    if rollout_gpus is None:
        placement, r_gpus, l_gpus = "colocated", gpus, gpus
    else:
        placement, r_gpus, l_gpus = "disaggregated", rollout_gpus, gpus - rollout_gpus
        if not 0 < rollout_gpus < gpus:
            raise ConfigError(f"--rollout-gpus {rollout_gpus} must be between 1 and {gpus - 1}")
    if r_gpus % tp:
        problems.append(f"{r_gpus} rollout GPUs are not whole engines of {tp} GPUs")
    engines = max(1, r_gpus // tp)

    # Learner memory a GPU: the training states (weights, gradients and AdamW's two moments,
    # all in the parameters' dtype), sharded over the learner's GPUs, and a working set.
    states = counts.total * 4 * bpp / l_gpus
    if l_gpus == 1:
        # One process (rl.learner.Learner, fused AdamW on CUDA): a micro-batch's new gradient
        # of one parameter before it joins the accumulated one. Measured with the states and
        # activations: docs/benchmarks.md, v32-2layer (tests/rl/test_plan.py holds the plan
        # to those figures).
        working = counts.largest_tensor * bpp
    else:
        # FSDP2 per block (rl/sharded.py). The backward through the largest unit holds its
        # gradients as autograd made them, then its reduce-scatter's input (float32 over
        # several ranks) beside them, the next unit's gathered weights (prefetched) and the
        # larger of its own gathered weights (while it computes) and that input (after it
        # reshards); the root unit's weights stay gathered and its gradients unsharded
        # until the backward ends. At one rank the gradients + buffer + root part was
        # measured (docs/benchmarks.md: 92.3 GiB at 128 experts); the gathered weights and
        # the float32 buffer of several ranks are FSDP2's design, not measured yet.
        # AdamW's step is fused (no shard-sized temporary), so the backward is the peak.
        largest = counts.largest_block
        working = largest * (bpp + max(bpp, 4)) + counts.second_block * bpp
        working += 2 * counts.root * bpp
    micro = cfg.optim.micro_batch_tokens
    h, d = args.num_attention_heads, args.hidden_size
    # One block's saved activations a token (its backward's working set): absorbed-mode q and
    # o and their gradients, the routed experts' inputs and intermediate products, the norms.
    attn_b = h * ((args.kv_lora_rank + args.qk_rope_head_dim) + args.kv_lora_rank) * bpp * 2
    moe_b = args.num_experts_per_tok * (d + 3 * args.moe_intermediate_size) * bpp * 2
    block_b = attn_b + moe_b + 8 * d * bpp
    if cfg.optim.activation_checkpointing:
        act = micro * (d * bpp * args.num_hidden_layers + block_b)
    else:
        act = micro * block_b * args.num_hidden_layers
    act += LOGITS_CHUNK_BYTES
    learner_total = states + working + act

    # Rollout memory: the engine's weights split over its GPUs, and the KV cache (the
    # [c | k_rope] latent and the indexer key, a token and layer) of as many of its sequences
    # at full length as fit beside them (continuous batching runs the rest in later waves).
    cap = spec.memory_gib * GIB
    util = float(cfg.rollout.engine_kwargs.get("gpu_memory_utilization", 0.9))
    rbpp = 1 if fp8_rollout else bpp
    r_weights = counts.total * rbpp / tp
    kv_token = args.num_hidden_layers * (
        (args.kv_lora_rank + args.qk_rope_head_dim) * rbpp + args.index_head_dim * rbpp
    )
    per_engine = math.ceil(sequences / engines)
    seq_kv = (prompt_tokens + max_new) * kv_token / tp  # one sequence's, a GPU
    concurrent = min(per_engine, max(0, int((util * cap - r_weights) // seq_kv)))
    kv = concurrent * seq_kv
    rollout_total = r_weights + kv

    if learner_total > cap:
        problems.append(
            f"learner needs {learner_total / GIB:,.0f} GiB a GPU of {spec.memory_gib:.0f}"
        )
    if concurrent == 0:
        problems.append(
            f"rollout engine: weights and one sequence's KV cache need "
            f"{(r_weights + seq_kv) / GIB:,.0f} GiB a GPU of {util:.2f} x {spec.memory_gib:.0f}"
        )
    waves = math.ceil(per_engine / max(1, concurrent))

    # Learner time: model FLOPs at the measured MFU; FSDP traffic overlapped with it.
    peak = MATMUL_TFLOPS * 1e12
    flops = model_flops_per_token(args, seq_len) * train_tokens
    if cfg.algorithm.beta > 0:  # the KL reference's forward
        flops *= 1 + 1 / 3
    flops *= cfg.algorithm.updates_per_batch
    compute = flops / (l_gpus * peak * LEARNER_MFU)
    link = NVLINK_GBS if l_gpus <= GPUS_PER_NODE else IB_GBS
    micro_batches = math.ceil(train_tokens / l_gpus / micro) * cfg.algorithm.updates_per_batch
    comm = 0.0
    if l_gpus > 1:
        comm = micro_batches * 3 * counts.total * bpp * (l_gpus - 1) / l_gpus / (link * 1e9)
    learner_s = max(compute, comm)

    # Rollout time: prefill at the learner's efficiency, then, per wave of concurrent
    # sequences, max_new memory-bound decode steps (a wave waits for its longest response).
    active = counts.dense + counts.routed * args.num_experts_per_tok / args.n_routed_experts
    prefill = sequences * prompt_tokens * 2 * active / (r_gpus * peak * LEARNER_MFU)
    batch = max(1, concurrent)
    touched = 1 - (1 - args.num_experts_per_tok / args.n_routed_experts) ** batch
    weights_read = (counts.dense + counts.routed * touched) * rbpp / tp
    ctx = prompt_tokens + max_new / 2
    kv_read = args.num_hidden_layers * (
        min(ctx, args.index_topk) * (args.kv_lora_rank + args.qk_rope_head_dim) * rbpp
        + ctx * args.index_head_dim * rbpp
    )
    step_bytes = weights_read + batch * kv_read / tp
    step_compute = batch * 2 * active / (tp * peak * LEARNER_MFU)
    decode = waves * max_new * max(step_bytes / (spec.hbm_tbs * 1e12), step_compute)
    rollout_s = prefill + decode
    sync_s = engines * counts.total * 2 / (IB_GBS * 1e9)

    if placement == "disaggregated" and cfg.rollout.max_staleness >= 1:
        step = max(rollout_s, learner_s + sync_s)
    else:
        step = rollout_s + learner_s + sync_s
    return Plan(
        gpu=gpu,
        gpus=gpus,
        placement=placement,
        rollout_gpus=r_gpus,
        learner_gpus=l_gpus,
        params_b=counts.total / 1e9,
        active_params_b=active / 1e9,
        sequences=sequences,
        train_tokens=train_tokens,
        learner_states_gib=states / GIB,
        working_set_gib=working / GIB,
        activations_gib=act / GIB,
        learner_total_gib=learner_total / GIB,
        rollout_weights_gib=r_weights / GIB,
        kv_cache_gib=kv / GIB,
        concurrent_sequences=concurrent,
        rollout_total_gib=rollout_total / GIB,
        capacity_gib=spec.memory_gib,
        rollout_s=rollout_s,
        learner_compute_s=compute,
        learner_comm_s=comm,
        sync_s=sync_s,
        step_s=step,
        tokens_per_s_per_gpu=train_tokens / step / gpus,
        problems=problems,
    )


HEADER = (
    "| GPUs | placement | learner GiB/GPU (states + working set + activations) | rollout GiB/GPU "
    "(weights + KV) | rollout s | learner s (compute / FSDP traffic) | sync s | step s | "
    "train tokens/s/GPU | fits |"
)


def render_row(p: Plan) -> str:
    """One markdown row; the times of a plan that does not fit are left out ("-")."""
    fits = "yes" if p.fits else "no: " + "; ".join(p.problems)
    learner = max(p.learner_compute_s, p.learner_comm_s)
    times = (
        f"{p.rollout_s:,.0f} | {learner:,.0f} ({p.learner_compute_s:,.0f} / "
        f"{p.learner_comm_s:,.0f}) | {p.sync_s:,.0f} | {p.step_s:,.0f} | "
        f"{p.tokens_per_s_per_gpu:,.1f}"
        if p.fits
        else "- | - | - | - | -"
    )
    return (
        f"| {p.gpus} x {p.gpu.upper()} | {p.placement} | {p.learner_total_gib:,.0f} "
        f"({p.learner_states_gib:,.0f} + {p.working_set_gib:,.0f} + {p.activations_gib:,.0f}) "
        f"| {p.rollout_total_gib:,.0f} ({p.rollout_weights_gib:,.0f} + {p.kv_cache_gib:,.0f}) "
        f"| {times} | {fits} |"
    )


def _model_args(cfg: ExperimentConfig, preset_name: str | None) -> ModelArgs:
    if preset_name:
        return preset(preset_name, **cfg.model.overrides)
    if cfg.model.checkpoint:
        path = Path(cfg.model.checkpoint).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.checkpoint: {path} holds no config.json; plan a released model "
                "without its files with --preset (e.g. --preset deepseek-v3.2)"
            )
        return ModelArgs.from_json(path)
    return preset(cfg.model.preset, **cfg.model.overrides)


def main(args: argparse.Namespace) -> int:
    """The `keeprl plan` subcommand: one table row per (GPU kind, GPU count)."""
    try:
        cfg = load_config(args.config, args.overrides)
        margs = _model_args(cfg, args.preset)
        counts = param_counts(margs)
        plans = [
            make_plan(
                cfg,
                margs,
                gpus=n,
                gpu=kind,
                rollout_gpus=args.rollout_gpus,
                prompt_tokens=args.prompt_tokens,
                avg_tokens=args.avg_tokens,
                fp8_rollout=args.fp8_rollout,
                counts=counts,
            )  # fmt: skip
            for kind in args.gpu
            for n in args.gpus
        ]
    except (ConfigError, KeyError, ValueError) as e:
        print(f"keeprl plan: {e}", file=sys.stderr)
        return 2
    first = plans[0]
    seq = args.avg_tokens or args.prompt_tokens + cfg.rollout.sampling.max_tokens
    print(
        f"{args.config}: {first.params_b:,.1f}B parameters ({first.active_params_b:,.1f}B a "
        f"token), {first.sequences} sequences a step x {seq:,} tokens = "
        f"{first.train_tokens:,} trained tokens; {cfg.model.dtype}, micro-batches of "
        f"{cfg.optim.micro_batch_tokens:,} tokens, activation checkpointing "
        f"{'on' if cfg.optim.activation_checkpointing else 'off'}, rollout engines of "
        f"{cfg.rollout.engine_kwargs.get('tensor_parallel_size', 1)} GPUs"
        f"{' in FP8' if args.fp8_rollout else ''}, max_staleness "
        f"{cfg.rollout.max_staleness}. Estimates (rl/plan.py says how), not measurements."
    )
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for p in plans:
        print(render_row(p))
    if args.json:
        from .cli import write_output

        write_output(args.json, json.dumps(to_json(plans), indent=1))
    return 0


def to_json(plans: list[Plan]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(p) | {"fits": p.fits} for p in plans]
