"""The agent warm start (rl/agent_sft.py): its training sequences are exactly what the episode
runner records for the same solution turns, and training on them lowers the loss on the
assistant turns."""

from __future__ import annotations

import numpy as np
import torch

from policy.testing import tiny_policy
from rewards.agent.spec import lookup_family, solution_text
from rl.agent_sft import solution_sequence, train_agent_sft
from rl.tokenizer import CharTokenizer
from rollout import Sampling
from rollout.episode import TextChatTemplate, run_episodes
from rollout.trajectory import Trajectory

TOK = CharTokenizer()


class Replay:
    """An engine that answers each call with the next scripted turn (pi_old 0, routing 0)."""

    name, weight_version = "replay", 0

    def __init__(self, turns):
        self.turns = list(turns)

    def generate(self, prompts, sampling, n=1):
        [prompt] = prompts
        ids = [*TOK.encode(self.turns.pop(0)), TOK.eos_id]
        return [
            Trajectory(
                prompt_ids=list(prompt),
                response_ids=ids,
                logprobs=np.zeros(len(ids)),
                routing=np.zeros((len(prompt) + len(ids) - 1, 1, 2), np.uint8),
                kept_ids=[np.zeros(0, np.int32)] * len(ids),
                sampling=sampling,
                finish_reason="stop",
                engine=self.name,
                weight_version=0,
            )  # fmt: skip
        ]


def test_the_training_sequence_is_what_the_episode_runner_records():
    spec = lookup_family(4)
    ids, mask = solution_sequence(spec, 9, TOK)
    _, calls = spec.generate(9)
    [ep] = run_episodes(
        Replay(solution_text(calls)), [spec.environment()], [spec.generate(9)[0]], TOK,
        Sampling(max_tokens=200), template=TextChatTemplate(), token_budget=4096,
    )  # fmt: skip
    assert ep.end_reason == "done" and ep.reward == 1.0
    assert ids == ep.token_ids and mask == ep.loss_mask


def test_training_on_solutions_lowers_the_loss_on_the_assistant_turns():
    model = tiny_policy(0, vocab_size=128)
    torch.manual_seed(0)
    losses = train_agent_sft(
        model, lookup_family, TOK, steps=30, batch_size=4, lr=3e-3, environments=8
    )
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])  # measured: 0.65


def test_the_warm_start_renders_the_demonstrators_calls():
    """An environment with a demonstrator is warm-started on the demonstrator's episodes."""
    from rewards.agent.treasure import spec as treasure

    for seed in range(20):
        task, calls = treasure.demonstration(seed)
        ids, mask = solution_sequence(treasure, seed, TOK, TextChatTemplate(list_tools=False))
        text = TOK.decode(ids)
        assert f'"box": "{calls[1].arguments["box"]}"' in text
        assert f'"gem": "{calls[2].arguments["gem"]}"' in text
