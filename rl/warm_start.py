"""Supervised warm-start: a short run of next-token training on reference answers.

RL needs a policy that already earns some reward: a randomly initialised tiny model never
answers right, so every group has zero advantage. The warm-start trains on
`<bos> prompt answer <eos>` with the loss on the answer tokens only, and caches the resulting
checkpoint under a key of everything that determines it (model, task, settings, seed), so the
quickstart pays for it once per machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from policy import Transformer, save_pretrained

from .tasks import Task, TaskStream
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def sft_batch(tasks: list[Task], tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [B, T] and targets [B, T] (-100 outside the answer + EOS tokens)."""
    seqs, starts = [], []
    for t in tasks:
        prompt = [tok.bos_id, *tok.encode(t.prompt)]
        seqs.append(prompt + tok.encode(t.reference["answer"]) + [tok.eos_id])
        starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.eos_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        targets[i, start - 1 : len(s) - 1] = torch.tensor(s[start:])  # token p from p - 1
    return ids, targets


def train_sft(
    model: Transformer,
    stream: TaskStream,
    tok: Tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
) -> list[float]:
    """Train `model` in place; returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    device = model.lm_head.weight.device
    model.train()
    losses = []
    for _ in range(steps):
        ids, targets = sft_batch(stream.take(batch_size), tok)
        logits = model(ids.to(device)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def warm_start(
    model: Transformer,
    stream: TaskStream,
    tok: Tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    cache_dir: str | Path,
    settings: dict,
) -> Path:
    """The warm-started checkpoint directory: from the cache when `settings` (everything
    that determines the result, including the initial model's seed) were seen before."""
    cache = Path(cache_dir).expanduser() / cache_key(settings)
    if (cache / "config.json").exists():
        log.info("warm-start: using cached %s", cache)
        return cache
    losses = train_sft(model, stream, tok, steps=steps, batch_size=batch_size, lr=lr)
    log.info("warm-start: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    save_pretrained(model, tmp)
    (tmp / "warm_start.json").write_text(json.dumps({"settings": settings, "losses": losses}))
    try:
        tmp.rename(cache)  # atomic: a concurrent or killed run never sees a half cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return cache
