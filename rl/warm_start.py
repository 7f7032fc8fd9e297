"""Supervised warm-start: a short run of next-token training on reference answers, in stages.

RL needs a policy that already earns some reward: a randomly initialised tiny model never
answers right, so every group has zero advantage. The warm-start trains on
`<bos> prompt answer <eos>` with the loss on the answer tokens only, and caches the resulting
checkpoint under a key of everything that determines it (model, task, settings, seed), so the
quickstart pays for it once per machine.

It follows DeepSeek-V3.2's recipe for a DSA model, each stage optional (`WarmStartConfig`):
1. dense SFT: the whole model, dense attention (`dsa=False`), LM loss;
2. indexer warm-up: everything but the lightning indexers frozen, dense attention, loss = the
   indexer's KL to the main attention over every visible key (`indexer_loss="dense"`);
3. sparse SFT: DSA on, LM loss for the main model plus the indexer's KL on its selected set
   (`indexer_loss="sparse"`). The indexer's inputs are detached inside the model, so each loss
   reaches only its own parameters; their balance is the two learning rates.
Departures from the paper: it continues pre-training from a dense checkpoint, so its stage 1
is the dense model's own training; here stage 1 is a short SFT from random weights. Stages 2-3
matter only when index_topk is below the sequence length; with index_topk >= every sequence
DSA selects every key, so stage 1 alone is the whole effect (dense attention is then exactly
what DSA computes, at a lower cost).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from policy import Transformer, save_pretrained
from policy.model import freeze_all_but_indexer, indexer_parameters

from .config import WarmStartConfig
from .tasks import Task, TaskStream
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A stage's loss terms for one batch: (input ids [B, T], targets [B, T], real tokens [B, T])
# -> {name: scalar}. The optimizer steps on their sum.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def sft_batch(tasks: list[Task], tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [B, T] and targets [B, T] (-100 outside the answer + EOS tokens)."""
    seqs, starts = [], []
    for t in tasks:
        prompt = tok.prompt_ids(t.prompt)
        seqs.append(prompt + tok.encode(t.reference["answer"]) + [tok.eos_id])
        starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.eos_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        targets[i, start - 1 : len(s) - 1] = torch.tensor(s[start:])  # token p from p - 1
    return ids, targets


def _real_tokens(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, T] True up to and including each row's first EOS (the rest is right padding)."""
    eos = (ids == eos_id).long()
    return eos.cumsum(1) - eos == 0


def _answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _train(
    model: Transformer,
    stream: TaskStream,
    tok: Tokenizer,
    *,
    steps: int,
    batch_size: int,
    groups: list[dict[str, Any]],
    loss_fn: LossFn,
) -> dict[str, list[float]]:
    """`steps` AdamW steps on the sum of loss_fn's terms; the per-step value of each term."""
    opt = torch.optim.AdamW(groups)
    device = model.lm_head.weight.device
    model.train()
    history: dict[str, list[float]] = {}
    for _ in range(steps):
        ids, targets = sft_batch(stream.take(batch_size), tok)
        ids, targets = ids.to(device), targets.to(device)
        terms = loss_fn(ids, targets, _real_tokens(ids, tok.eos_id))
        opt.zero_grad(set_to_none=True)
        torch.stack(list(terms.values())).sum().backward()
        opt.step()
        for name, value in terms.items():
            history.setdefault(name, []).append(value.item())
    return history


def train_sft(
    model: Transformer,
    stream: TaskStream,
    tok: Tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
) -> list[float]:
    """Stage 1, dense SFT: every parameter on the answer loss with dense attention (the
    indexer neither runs nor trains). Trains `model` in place; returns the loss of every step."""

    def loss_fn(ids: torch.Tensor, targets: torch.Tensor, _: torch.Tensor) -> dict:
        # No attention mask: the padding sits right of every answer, so causal attention
        # already keeps it out of the loss.
        return {"lm": _answer_loss(model(ids, dsa=False).logits, targets)}

    groups = [{"params": list(model.parameters()), "lr": lr}]
    return _train(
        model, stream, tok, steps=steps, batch_size=batch_size, groups=groups, loss_fn=loss_fn
    ).get("lm", [])


def train_indexer_warmup(
    model: Transformer,
    stream: TaskStream,
    tok: Tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
) -> list[float]:
    """Stage 2, the indexer's dense warm-up: only indexer parameters train, on the KL from the
    main (dense) attention to the indexer over every visible key. Returns the KL per step."""

    def loss_fn(ids: torch.Tensor, _: torch.Tensor, real: torch.Tensor) -> dict:
        out = model(ids, attention_mask=real, dsa=False, indexer_loss="dense", return_logits=False)
        return {"indexer_kl": out.indexer_loss}

    flags = [p.requires_grad for p in model.parameters()]
    # Freezing (not just leaving them out of the optimizer) spares the backward pass
    # through the main model: only the indexers' small graph is differentiated.
    groups = [{"params": freeze_all_but_indexer(model), "lr": lr}]
    try:
        history = _train(
            model, stream, tok, steps=steps, batch_size=batch_size, groups=groups, loss_fn=loss_fn
        )
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return history.get("indexer_kl", [])


def train_sparse_sft(
    model: Transformer,
    stream: TaskStream,
    tok: Tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    indexer_lr: float,
) -> dict[str, list[float]]:
    """Stage 3, sparse SFT: DSA on; the main model trains on the answer loss at `lr`, the
    indexer on its KL over the selected keys at `indexer_lr`. Returns both per step."""

    def loss_fn(ids: torch.Tensor, targets: torch.Tensor, real: torch.Tensor) -> dict:
        out = model(ids, attention_mask=real, dsa=True, indexer_loss="sparse")
        return {"lm": _answer_loss(out.logits, targets), "indexer_kl": out.indexer_loss}

    indexer = indexer_parameters(model)
    in_indexer = {id(p) for p in indexer}
    main = [p for p in model.parameters() if id(p) not in in_indexer]
    # Plain sum of the two losses: neither reaches the other's parameters (the indexer reads
    # detached inputs and selects without a gradient; its KL target is detached), so the
    # learning rates alone set each side's step.
    groups = [{"params": main, "lr": lr}, {"params": indexer, "lr": indexer_lr}]
    return _train(
        model, stream, tok, steps=steps, batch_size=batch_size, groups=groups, loss_fn=loss_fn
    )


def _ends(values: list[float], n: int = 10) -> tuple[float, float]:
    """Means of the first and last n values (single steps are noisy)."""
    n = max(1, min(n, len(values) // 2 or 1))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def run_stages(
    model: Transformer, stream: TaskStream, tok: Tokenizer, cfg: WarmStartConfig
) -> dict[str, dict[str, list[float]]]:
    """Run cfg's stages in recipe order on `model` (in place), skipping those with 0 steps.

    Returns {stage: {loss term: per-step values}} and logs each stage's start and end loss.
    """
    b, iw, ss = cfg.batch_size, cfg.indexer_warmup, cfg.sparse_sft
    out: dict[str, dict[str, list[float]]] = {}
    for stage, steps in [
        ("dense_sft", cfg.steps),
        ("indexer_warmup", iw.steps),
        ("sparse_sft", ss.steps),
    ]:
        if not steps:
            continue
        start = time.perf_counter()
        if stage == "dense_sft":
            out[stage] = {"lm": train_sft(model, stream, tok, steps=steps, batch_size=b, lr=cfg.lr)}
        elif stage == "indexer_warmup":
            kl = train_indexer_warmup(model, stream, tok, steps=steps, batch_size=b, lr=iw.lr)
            out[stage] = {"indexer_kl": kl}
        else:
            out[stage] = train_sparse_sft(
                model, stream, tok, steps=steps, batch_size=b, lr=ss.lr, indexer_lr=ss.indexer_lr
            )
        ends = ", ".join(
            f"{k} {_ends(v)[0]:.3f} -> {_ends(v)[1]:.3f}" for k, v in out[stage].items()
        )
        log.info(
            "warm-start %s: %d steps in %.1f s, %s (means of the first/last <= 10 steps)",
            stage,
            steps,
            time.perf_counter() - start,
            ends,
        )
    return out


def cache_key(settings: dict) -> str:
    """16 hex digits of the SHA-256 of `settings` as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def warm_start(
    model: Transformer,
    stream: TaskStream | None,
    tok: Tokenizer,
    *,
    config: WarmStartConfig,
    settings: dict,
    stages: Callable[[Transformer], dict] | None = None,
) -> Path:
    """The warm-started checkpoint directory under config.cache_dir: from the cache when
    `settings` (everything else that determines the result: model, data, the initial model's
    seed) and the stage settings were seen before. The config enters the cache key itself, so
    no stage setting can escape it. `stages(model)` replaces the recipe's stages (the agent
    warm start, rl/agent_sft.py); it returns the losses to keep beside the checkpoint."""
    settings = {**settings, "warm_start": dataclasses.asdict(config)}
    cache = Path(config.cache_dir).expanduser() / cache_key(settings)
    if (cache / "config.json").exists():
        log.info("warm-start: using cached %s", cache)
        return cache
    losses = stages(model) if stages is not None else run_stages(model, stream, tok, config)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    save_pretrained(model, tmp)
    (tmp / "warm_start.json").write_text(json.dumps({"settings": settings, "losses": losses}))
    try:
        tmp.rename(cache)  # atomic: a concurrent or killed run never sees a half cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return cache
