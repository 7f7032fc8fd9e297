"""The supervised warm-start lowers the answer loss and is cached by its settings."""

from __future__ import annotations

import json

import torch

from policy import Transformer, preset
from rl.tasks import TaskStream
from rl.tokenizer import CharTokenizer
from rl.warm_start import sft_batch, warm_start


def test_sft_batch_targets_only_the_answer():
    tok = CharTokenizer()
    stream = TaskStream("arithmetic", None, seed=0, task_kwargs={"max_operand": 9})
    ids, targets = sft_batch(stream.take(2), tok)
    for row in range(2):
        answer = targets[row][targets[row] >= 0].tolist()
        assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]).lstrip("-").isdigit()


def test_warm_start_learns_and_caches(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=128))
    tok = CharTokenizer()
    stream = TaskStream("arithmetic", None, seed=0, task_kwargs={"max_operand": 9})
    settings = {"model": "tiny", "seed": 0, "steps": 60}
    path = warm_start(
        model, stream, tok, steps=60, batch_size=32, lr=1e-3, cache_dir=tmp_path, settings=settings
    )
    losses = json.loads((path / "warm_start.json").read_text())["losses"]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    stamp = (path / "config.json").stat().st_mtime_ns
    again = warm_start(
        model, stream, tok, steps=60, batch_size=32, lr=1e-3, cache_dir=tmp_path, settings=settings
    )
    assert again == path and (path / "config.json").stat().st_mtime_ns == stamp
    assert stream.position == 60 * 32  # the cached call trained nothing
