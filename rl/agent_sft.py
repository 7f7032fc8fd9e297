"""Supervised warm start for agent RL: teach a policy the tool-call format from the solutions
that synthesized environments come with (or their demonstrator's calls, when the environment
has one), before GRPO on the same environments.

`solution_sequence` renders one demonstrated episode exactly as `rollout.episode.run_episodes` would
record it (the first prompt, each solution call as an assistant turn ending at EOS, each
observation appended through the chat template), with the loss mask on the assistant turns;
`train_agent_sft` trains on batches of such sequences from an environment or a family
(rewards/agent/spec.py), the cross-entropy on masked tokens only.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from policy import Transformer
from rollout.chat import ChatTemplate, TextChatTemplate, TextTokenizer


def solution_sequence(
    spec: Any, seed: int, tok: TextTokenizer, template: ChatTemplate | None = None
) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask) of the episode that solves `spec`'s task from `seed` (or that
    its demonstrator plays, when `spec` has one)."""
    template = template or TextChatTemplate()
    task, calls = spec.demonstration(seed)
    env = spec.environment()
    env.tools_in_prompt = template.prompt_lists_tools
    ids = template.first(tok, env.reset(task), env.tool_schemas())
    mask = [False] * len(ids)
    for call in calls:
        turn = template.assistant(tok, call)
        ids += turn
        mask += [True] * len(turn)
        observation, done = env.step(call)
        if done:
            break
        obs = template.observation(tok, observation)
        ids += obs
        mask += [False] * len(obs)
    return ids, mask


def train_agent_sft(
    model: Transformer,
    source: Any,
    tok: TextTokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    environments: int = 64,
    seed: int = 0,
    template: ChatTemplate | None = None,
    exclude: frozenset[str] = frozenset(),
) -> list[float]:
    """Train `model` in place on solved episodes of `source` (an EnvSpec, or a family: seed ->
    EnvSpec, of which `environments` are used), the loss on the assistant turns; returns the
    loss of every step. Dense attention, as DeepSeek-V3.2's first warm-start stage. `exclude`:
    the eval sets' task keys (rl.evaluation.held_out_prompts), never demonstrated."""
    from rewards.agent.spec import EnvSpec

    from .evaluation import agent_task_key as _key

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    device = model.lm_head.weight.device
    model.train()
    losses = []
    for _ in range(steps):
        rows = []
        for _ in range(batch_size):
            while True:  # an eval set's task (rl.evaluation.agent_task_key) is never shown
                spec = source
                if not isinstance(source, EnvSpec):
                    spec = source(rng.randrange(environments))
                task_seed = rng.randrange(2**31)
                if not exclude or _key(spec, spec.generate(task_seed)[0]) not in exclude:
                    break
            rows.append(solution_sequence(spec, task_seed, tok, template))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (seq, mask) in enumerate(rows):
            ids[i, : len(seq)] = torch.tensor(seq)
            # position p predicts token p + 1: the target is kept where that token is trained
            keep = torch.tensor(mask[1:])
            targets[i, : len(seq) - 1] = torch.tensor(seq[1:]).masked_fill(~keep, -100)
        ids, targets = ids.to(device), targets.to(device)
        # Right padding: causal attention keeps it out of every real position.
        logits = model(ids, dsa=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
