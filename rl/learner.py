"""The GRPO learner: one optimizer step per batch, with every DeepSeek-V3.2 stabilizer.

`Learner.step(batch)` runs the policy forward with the sampler's recorded routing (Keep
Routing), scores tokens over the sampler's kept sets (Keep Sampling Mask), masks stale
negative sequences (OPSM), adds the unbiased KL to a frozen reference, and accumulates
gradients over micro-batches sized by a token budget before one clipped AdamW step. Each
stabilizer has a switch so its effect can be ablated; the metrics it returns say what each did.
Plain torch: the Ray actor wrapping it belongs to the trainer.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from policy import Transformer

from .advantage import group_advantages
from .batch import Batch
from .logprobs import routing_disagreement, token_logprobs
from .loss import LossConfig, grpo_token_loss, token_weights
from .masks import opsm_keep


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig(LossConfig):
    """GRPO and its stabilizers (the YAML section `algorithm`): the objective (LossConfig's
    fields) plus the two replay stabilizers, the advantage normalisation and the number of
    optimizer steps per rollout batch. Each switch can be turned off for ablations."""

    keep_routing: bool = True  # the forward replays the sampler's recorded experts
    keep_sampling_mask: bool = True  # log-probs over the sampler's top-k/top-p kept ids
    std_normalize: bool = False  # divide advantages by the group std (off: the paper's A)
    # Optimizer steps on each rollout batch (the clipped ratio keeps the later ones close to
    # the sampler); more than 1 reuses the costly rollouts.
    updates_per_batch: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {self.updates_per_batch}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW, its schedule and micro-batching (the YAML section `optim`)."""

    lr: float = 1e-6  # AdamW's peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's
    grad_clip: float = 1.0  # max global gradient norm
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up
    min_lr_ratio: float = 0.0  # cosine: the lr at the last step, as a fraction of lr
    micro_batch_tokens: int = 8192  # padded tokens per forward/backward
    # recompute each block's activations in the backward: memory for time (long sequences)
    activation_checkpointing: bool = False
    device: str = "cpu"  # where the learner runs (keeprl train's learner actor)

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}"
            )
        if self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    """What a Learner needs: the algorithm, the optimizer, and how many optimizer steps the
    run takes (for the cosine schedule; keeprl train: total_steps x updates_per_batch)."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.optim.lr_schedule == "cosine" and self.total_steps <= self.optim.warmup_steps:
            raise ValueError(
                f"lr_schedule 'cosine' needs more optimizer steps ({self.total_steps}) than "
                f"warmup_steps ({self.optim.warmup_steps})"
            )


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warm-up, then the
    schedule."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / (cfg.total_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batches(
    batch: Batch, token_budget: int, rows: list[int] | None = None
) -> list[torch.Tensor]:
    """Row indices per micro-batch: rows (default: all) sorted by length, packed while
    rows * longest <= budget (a row longer than the budget goes alone)."""
    lengths = batch.lengths.tolist()
    rows = range(len(lengths)) if rows is None else rows
    order = sorted(rows, key=lambda i: lengths[i])
    groups: list[list[int]] = [[]]
    for i in order:
        if groups[-1] and (len(groups[-1]) + 1) * lengths[i] > token_budget:
            groups.append([])
        groups[-1].append(i)
    return [torch.tensor(g) for g in groups]


class Learner:
    """Owns the policy, the frozen reference (only when beta > 0), AdamW and the LR schedule."""

    def __init__(
        self, policy: Transformer, cfg: LearnerConfig, reference: Transformer | None = None
    ) -> None:
        self.policy, self.cfg = policy, cfg
        policy.activation_checkpointing = cfg.optim.activation_checkpointing
        self.reference = None
        if cfg.algorithm.beta > 0:
            self.reference = reference if reference is not None else copy.deepcopy(policy)
            self.reference.eval().requires_grad_(False)
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            fused=(self.fused_adamw and all(p.is_cuda for p in params)) or None,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg)
        )
        self.steps = 0

    # A data-parallel learner (rl.sharded) trains on a share of the batch's rows and sums its
    # ranks' figures; one process takes every row.
    loss_scale = 1.0
    # AdamW as one fused kernel when the parameters are on CUDA: torch's default (foreach)
    # makes a parameter-sized temporary (the second moment's square root) that sets the step's
    # peak memory, and takes longer (docs/benchmarks.md: 13% faster and 8.3 GiB less at
    # v32-2layer with 128 experts). On the CPU the default stays.
    fused_adamw = True

    def rows(self, batch: Batch) -> list[int] | None:
        """The batch rows this process trains on (None: all)."""
        return None

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def token_logprobs(
        self, model: Transformer, mb: Batch, *, entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """rl.logprobs.token_logprobs with this learner's Keep Routing / Keep Sampling Mask."""
        return token_logprobs(
            model,
            mb,
            keep_routing=self.cfg.algorithm.keep_routing,
            keep_sampling_mask=self.cfg.algorithm.keep_sampling_mask,
            entropy=entropy,
        )

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on `batch`; returns its metrics (see module docstring)."""
        cfg, lcfg = self.cfg, self.cfg.algorithm
        start = time.perf_counter()
        batch = batch.to(self.policy.lm_head.weight.device)
        self.policy.train()
        adv_all = group_advantages(
            batch.rewards, batch.group_ids, lcfg.std_normalize, episode_ids=batch.episode_ids
        )
        response = batch.response_mask
        n_seqs = int(response.any(1).sum())
        n_tokens = int(response.sum())
        dev = batch.input_ids.device
        # Metrics accumulate on the device: one host synchronisation after the loop, not
        # several per micro-batch.
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=dev))
        counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=dev))
        gap_max = torch.zeros((), device=dev)
        for index in micro_batches(batch, cfg.optim.micro_batch_tokens, self.rows(batch)):
            mb = batch.select(index)
            adv = adv_all[index].to(mb.input_ids.device)
            mask = mb.response_mask
            logp, ent, routing = self.token_logprobs(self.policy, mb, entropy=True)
            ref_logp = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_logp, _, _ = self.token_logprobs(self.reference, mb)
            keep = (
                opsm_keep(logp, mb.old_logprobs, adv, mask, lcfg.opsm_delta)
                if lcfg.opsm
                else torch.ones_like(adv, dtype=torch.bool)
            )
            loss_tok, info = grpo_token_loss(logp, mb.old_logprobs, adv, keep, ref_logp, lcfg)
            w = token_weights(mask, lcfg.aggregation, n_seqs, n_tokens)
            loss = (loss_tok * w).sum()
            (loss * self.loss_scale).backward()
            # Diagnostics: token means over the batch's response tokens.
            with torch.no_grad():
                tok = mask.float() / max(n_tokens, 1)
                gap = (mb.old_logprobs - logp.detach()).abs() * mask
                sums["loss"] += loss.detach()
                sums["logp_gap_mean"] += (gap * tok).sum()
                gap_max = torch.maximum(gap_max, gap.max())
                sums["entropy"] += (ent * tok).sum()
                sums["clip_low_frac"] += (info["clip_low"] * tok).sum()
                sums["clip_high_frac"] += (info["clip_high"] * tok).sum()
                sums["ratio_mean"] += (info["ratio"] * tok).sum()
                if "kl" in info:
                    sums["kl"] += (info["kl"] * tok).sum()
                sums["opsm_masked_frac"] += (~keep & mask.any(1)).sum() / max(n_seqs, 1)
                if mb.routing is not None:  # measured with Keep Routing on too: what it overrides
                    differs, by_layer, routed = routing_disagreement(routing, mb)
                    counts["any"] += differs
                    counts["routed"] += routed
                    for i, n in enumerate(by_layer):
                        counts[f"layer_{i}"] += n
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]], cfg.optim.grad_clip
        )
        if hasattr(grad_norm, "full_tensor"):  # sharded parameters: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        # The step's one host synchronisation: every device-side figure in a single transfer
        # (which also waits for the optimizer step, so the time below is the device's too).
        names = [*sums, *(f"count/{k}" for k in counts), "logp_gap_max", "grad_norm"]
        summed = self.all_sum(torch.stack([*sums.values(), *counts.values()]))
        values = [*summed, self.all_max(gap_max), grad_norm.to(dev)]
        values = torch.stack([v.to(dev).reshape(()) for v in values]).tolist()
        secs = time.perf_counter() - start
        host = dict(zip(names, values, strict=True))
        metrics = {k: v for k, v in host.items() if not k.startswith("count/")}
        routed = host.get("count/routed", 0.0)
        if routed:  # the share of routed tokens whose experts differ, any / by layer
            metrics["routing_disagreement"] = host["count/any"] / routed
            metrics.update(
                {
                    f"routing_disagreement/{k[6:]}": v / routed
                    for k, v in host.items()
                    if k.startswith("count/layer_")
                }
            )
        return {
            **metrics,
            "lr": lr,
            "advantage_abs_mean": float(adv_all.abs().mean()),
            "response_tokens": float(n_tokens),
            "tokens_per_s": float(batch.lengths.sum()) / secs,
        }

    def state_dict(self) -> dict:
        """Optimizer (keyed by parameter name, whole tensors on the CPU: the same on any number
        of ranks), schedule and step count. Sharded: every rank calls it, rank 0's is whole."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "optimizer": get_optimizer_state_dict(self.policy, self.optimizer, options=options),
            "optimizer_format": "by-name",
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def save_optimizer_shards(self, directory: str | Path) -> dict:
        """Write the optimizer state with torch.distributed.checkpoint, each rank its own
        shards (every rank calls it), and return the learner state that points at them; it
        loads on any number of ranks (load_state_dict)."""
        dcp.save({"optimizer": get_optimizer_state_dict(self.policy, self.optimizer)},
                 checkpoint_id=str(directory))  # fmt: skip
        return {
            "optimizer": Path(directory).name,
            "optimizer_format": "dcp",
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """A state_dict's or save_optimizer_shards' state (its "optimizer" then the shards'
        directory, as rl.checkpoint.load_state resolves it), written by any number of ranks."""
        if state.get("optimizer_format") == "dcp":
            # The optimizer's own (sharded) state dict is the target the shards are read into;
            # asking for it gives a fresh optimizer zero moments to fill. Parameters the writer
            # never stepped (a loss-less indexer) have no shards: a partial load.
            target = get_optimizer_state_dict(self.policy, self.optimizer)
            dcp.load(
                {"optimizer": target},
                checkpoint_id=state["optimizer"],
                planner=DefaultLoadPlanner(allow_partial_load=True),
            )
            set_optimizer_state_dict(
                self.policy,
                self.optimizer,
                optim_state_dict=target,
                options=StateDictOptions(strict=False),
            )
        elif state.get("optimizer_format") == "by-name":
            # Parameters that never had a gradient (a frozen or loss-less indexer) have no
            # moments to restore: not strict.
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_optimizer_state_dict(
                self.policy, self.optimizer, optim_state_dict=state["optimizer"], options=options
            )
        else:  # checkpoints written before the by-name format: one process's own layout
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
