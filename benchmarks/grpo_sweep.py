"""GRPO learning sweep on the tiny policy: how fast does mean reward rise, per setting?

In-process (no Ray): a supervised warm-start on single-digit `a+b=` / `a-b=`, then `steps`
GRPO steps with the native engine and the learner, reward = exact answer. Prints one JSON
line per run with the reward curve. One setting per process so runs can go in parallel:

    python benchmarks/grpo_sweep.py '{"sft": 200, "lr": 3e-4, "updates": 4, "P": 64}'
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from policy import Transformer, preset  # noqa: E402
from rl.batch import Batch  # noqa: E402
from rl.config import IndexerWarmupConfig, SparseSFTConfig, WarmStartConfig  # noqa: E402
from rl.learner import AlgorithmConfig, Learner, LearnerConfig, OptimConfig  # noqa: E402
from rl.tasks import TaskStream  # noqa: E402
from rl.tokenizer import CharTokenizer  # noqa: E402
from rl.warm_start import run_stages  # noqa: E402

# The warm-start of configs/native-sparse.yaml (stage 1's steps come from the sweep's `sft`).
SPARSE_WARM_START = WarmStartConfig(
    enabled=True,
    batch_size=64,
    lr=1e-3,
    indexer_warmup=IndexerWarmupConfig(steps=200, lr=1e-3),
    sparse_sft=SparseSFTConfig(steps=50, lr=3e-4, indexer_lr=1e-3),
)
MAX_SEQ_LEN = 16  # <bos> + "a+b=" (at most 6 chars for operands up to 99) + 6 new tokens
from rollout import NativeEngine, Sampling  # noqa: E402

DEFAULTS = {
    "maxop": 9,
    "sft": 200,
    "lr": 1e-4,
    "updates": 1,
    "P": 16,
    "G": 8,
    "steps": 80,
    "topk": 256,
    "beta": 0.0,
    "seed": 0,
}


def run(maxop, sft, lr, updates, P, G, steps, topk, beta, seed) -> list[float]:  # noqa: N803
    tok = CharTokenizer()
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=128, index_topk=topk))
    warm = TaskStream("arithmetic", None, 10_000 + seed, {"max_operand": maxop})
    warm_cfg = dataclasses.replace(SPARSE_WARM_START, steps=sft)
    if topk >= MAX_SEQ_LEN:  # DSA selects every key, so the indexer stages have no effect
        warm_cfg = dataclasses.replace(
            warm_cfg, indexer_warmup=IndexerWarmupConfig(), sparse_sft=SparseSFTConfig()
        )
    run_stages(model, warm, tok, warm_cfg)
    engine = NativeEngine(model)
    cfg = LearnerConfig(optim=OptimConfig(lr=lr), algorithm=AlgorithmConfig(beta=beta))
    learner = Learner(model, cfg)
    stream = TaskStream("arithmetic", None, seed, {"max_operand": maxop})
    sampling = Sampling(temperature=1.0, top_k=20, max_tokens=6, stop_token_ids=(tok.eos_id,))
    curve = []
    for _ in range(steps):
        tasks = stream.take(P)
        trajs = engine.generate([[tok.bos_id, *tok.encode(t.prompt)] for t in tasks], sampling, n=G)
        rewards = [
            float(tok.decode(t.response_ids).strip() == tasks[t.prompt_index].reference["answer"])
            for t in trajs
        ]
        batch = Batch.from_trajectories(trajs, rewards, [t.prompt_index for t in trajs])
        for _ in range(updates):
            learner.step(batch)
        curve.append(sum(rewards) / len(rewards))
    return curve


def main() -> None:
    torch.set_num_threads(1)
    cfg = {**DEFAULTS, **json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")}
    start = time.time()
    curve = run(**cfg)
    print(
        json.dumps(
            {
                "cfg": cfg,
                "first10": sum(curve[:10]) / 10,
                "last10": sum(curve[-10:]) / 10,
                "seconds": round(time.time() - start),
                "curve": [round(x, 3) for x in curve],
            }
        )
    )


if __name__ == "__main__":
    main()
