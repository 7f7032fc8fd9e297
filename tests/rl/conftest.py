"""Fixtures for the learner tests: a tiny policy and GRPO batches it sampled itself."""

from __future__ import annotations

import os

import pytest
import torch

from policy import Transformer, preset
from rl.batch import Batch
from rollout.sampling import sample


@torch.no_grad()
def sample_batch(
    model: Transformer,
    prompt: list[int],
    n: int,
    rewards: list[float],
    *,
    max_new: int = 10,
    temperature: float = 1.0,
    top_k: int = 20,
    top_p: float = 0.9,
    seed: int = 0,
) -> Batch:
    """n responses to one prompt, sampled token by token from `model` (full forwards), with
    the sampler's log-probs, kept ids and the routing of a final forward over each sequence."""
    gen = torch.Generator().manual_seed(seed)
    responses, logps, kepts, routes = [], [], [], []
    for _ in range(n):
        seq, lp, kept = list(prompt), [], []
        for _ in range(max_new):
            logits = model(torch.tensor([seq])).logits[0, -1:]
            out = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            seq.append(int(out.tokens[0]))
            lp.append(float(out.logprobs[0]))
            kept.append([i for i in out.kept_ids[0].tolist() if i >= 0])
        responses.append(seq[len(prompt) :])
        logps.append(lp)
        kepts.append(kept)
        routes.append(model(torch.tensor([seq])).routing[0, :-1])  # the last token unrouted
    return Batch.from_sequences(
        [prompt] * n,
        responses,
        logps,
        rewards,
        [0] * n,
        routing=routes,
        kept_ids=kepts,
        temperature=temperature,
    )


@pytest.fixture
def sampler():
    """The batch sampler above, as a fixture (tests cannot import conftest by name)."""
    return sample_batch


@pytest.fixture
def policy() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=64, index_topk=8))


def _small_run(run, cache, steps) -> list[str]:
    """Overrides of configs/native-sparse.yaml for a run of `steps` small steps (2 prompts x 4
    samples of <= 4 tokens), a short warm-start cached in `cache`, a checkpoint every step."""
    return [
        f"trainer.output_dir={run}",
        f"trainer.total_steps={steps}",
        "checkpoint.every=1",
        f"warm_start.cache_dir={cache}",
        "warm_start.steps=20",
        "warm_start.indexer_warmup.steps=10",
        "warm_start.sparse_sft.steps=5",
        "data.prompts_per_step=2",
        "rollout.samples_per_prompt=4",
        "rollout.sampling.max_tokens=4",
        "ray.num_cpus=2",
    ]


@pytest.fixture
def small_run():
    """The small-run overrides above, as a fixture: small_run(run_dir, cache_dir, steps)."""
    return _small_run


@pytest.fixture
def fresh_run(tmp_path, monkeypatch):
    """fresh_run(config) -> (run directory, reward_mean per step): `keeprl train config` as the
    README runs it, from the repository root into tmp_path, with a warm-start cache of its
    own (so the warm start is part of what is tested)."""
    from rl.cli import main as cli
    from rl.plot import read_metrics

    def run(config: str) -> tuple:
        monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        out = tmp_path / "run"
        overrides = [f"trainer.output_dir={out}", f"warm_start.cache_dir={tmp_path / 'cache'}"]
        assert cli(["train", config, *overrides]) == 0
        return out, [v for _, v in read_metrics(out, ["reward_mean"])["reward_mean"]]

    return run
