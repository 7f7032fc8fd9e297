"""Multi-turn episodes (rollout/episode.py) driven by a scripted engine: token-exact records
(the trained ids are the template's rendering of the conversation, the loss mask exactly the
generated spans, routing and pi_old for every position), one engine call a turn for all
episodes, and every way an episode can go wrong ending it with a reason and reward 0."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rewards.agent import Environment, Tool, ToolError, format_tool_call
from rewards.agent.spec import lookup_family, solution_text
from rl.tokenizer import CharTokenizer
from rollout import Sampling
from rollout.episode import TextChatTemplate, run_episodes
from rollout.trajectory import Trajectory

TOK = CharTokenizer()
TEMPLATE = TextChatTemplate()
LAYERS, TOPK = 2, 3


class ScriptedEngine:
    """Replays fixed turns: each episode's script is found by its first prompt; routing of a
    position p is (p, p + 1, p + 2) in every layer, pi_old of a response token -0.5."""

    name, weight_version = "scripted", 4

    def __init__(self, scripts: dict[tuple[int, ...], list[str]]) -> None:
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.calls = 0

    def generate(self, prompts, sampling, n=1):
        self.calls += 1
        out = []
        for prompt in prompts:
            key = next(k for k in self.scripts if tuple(prompt[: len(k)]) == k)
            text = self.scripts[key].pop(0)
            ids = TOK.encode(text) + ([TOK.eos_id] if not text.endswith("...") else [])
            total = len(prompt) + len(ids)
            routing = np.array([[[p, p + 1, p + 2]] * LAYERS for p in range(total - 1)])
            out.append(
                Trajectory(
                    prompt_ids=list(prompt),
                    response_ids=ids,
                    logprobs=np.full(len(ids), -0.5, np.float32),
                    routing=routing,
                    kept_ids=[np.zeros(0, np.int32)] * len(ids),
                    sampling=sampling,
                    finish_reason="stop" if ids[-1] == TOK.eos_id else "length",
                    engine=self.name,
                    weight_version=self.weight_version,
                )  # fmt: skip
            )
        return out


def _lookup(seed):
    spec = lookup_family(seed)
    task, calls = spec.generate(seed)
    env = spec.environment()
    first = TEMPLATE.first(TOK, spec.environment().reset(task))
    return spec, env, task, calls, first


def test_an_episode_is_token_exact_and_masked_to_its_generated_spans():
    spec, env, task, calls, first = _lookup(1)
    turns = solution_text(calls)
    engine = ScriptedEngine({tuple(first): turns})
    [ep] = run_episodes(engine, [env], [task], TOK, Sampling(max_tokens=200), token_budget=4096)
    assert ep.end_reason == "done" and ep.reward == 1.0 and ep.num_turns == len(calls) >= 4
    # The template's rendering of the conversation, token for token.
    replay = spec.environment()
    want, mask = list(first), [False] * len(first)
    replay.reset(task)
    for i, (text, call) in enumerate(zip(turns, calls, strict=True)):
        generated = TOK.encode(text) + [TOK.eos_id]
        want += generated
        mask += [True] * len(generated)
        observation, done = replay.step(call)
        if i < len(turns) - 1:
            obs = TEMPLATE.observation(TOK, observation)
            want += obs
            mask += [False] * len(obs)
    assert ep.token_ids == want and ep.loss_mask == mask
    assert [r for r, _, _ in ep.spans] == ["prompt"] + ["assistant", "tool"] * (len(calls) - 1) + [
        "assistant"
    ]
    # pi_old on exactly the generated tokens; routing for every position but the last, each
    # from the turn that processed it first (the scripted routing names the position).
    assert np.array_equal(np.array(ep.logprobs) != 0, np.array(mask))
    assert ep.routing.shape == (len(want) - 1, LAYERS, TOPK)
    assert np.array_equal(ep.routing[:, 0, 0], np.arange(len(want) - 1))
    assert ep.weight_versions == {4}


def test_all_running_episodes_share_one_engine_call_a_turn():
    scripts, envs, tasks, turns = {}, [], [], []
    for seed in (1, 2, 3):
        _, env, task, calls, first = _lookup(seed)
        scripts[tuple(first)] = solution_text(calls)
        envs.append(env)
        tasks.append(task)
        turns.append(len(calls))
    engine = ScriptedEngine(scripts)
    episodes = run_episodes(engine, envs, tasks, TOK, Sampling(max_tokens=200), token_budget=4096)
    assert [e.reward for e in episodes] == [1.0] * 3
    assert engine.calls == max(turns)


class Flaky(Environment):
    """A hand-written environment whose tools misbehave on purpose."""

    tools = {
        "ok": Tool("answers", {}),
        "boom": Tool("raises", {}),
        "hang": Tool("sleeps", {}),
        "refuse": Tool("refuses", {}),
    }

    def reset(self, task):
        self.state = {"n": 0}
        return "use the tools"

    def verify(self, state):
        return 1.0

    def tool_ok(self):
        return "fine"

    def tool_refuse(self):
        raise ToolError("not today")

    def step(self, call):
        if getattr(call, "name", None) == "boom":
            raise RuntimeError("the environment's own bug")
        if getattr(call, "name", None) == "hang":
            time.sleep(3)
        return super().step(call)


@pytest.mark.parametrize(
    ("turns", "kwargs", "reason", "reward"),
    [
        (["<tool_call>{not json</tool_call>"], {}, "malformed_call", 0.0),
        ([format_tool_call("nope", {})], {}, "unknown_tool", 0.0),
        ([format_tool_call("boom", {})], {}, "env_error", 0.0),
        ([format_tool_call("hang", {})], {"step_timeout_s": 0.2}, "env_timeout", 0.0),
        (["thinking..."], {}, "length", 0.0),
        ([format_tool_call("ok", {})] * 3, {"max_turns": 3}, "max_turns", 0.0),
        ([format_tool_call("ok", {})] * 9, {"token_budget": 120}, "token_budget", 0.0),
        ([format_tool_call("refuse", {}), "all done"], {}, "answer", 1.0),
    ],
    ids=["malformed", "unknown-tool", "raises", "hangs", "no-eos", "turns", "budget", "answer"],
)
def test_every_way_an_episode_ends_is_recorded(turns, kwargs, reason, reward):
    env = Flaky()
    first = TEMPLATE.first(TOK, Flaky().reset({}))
    engine = ScriptedEngine({tuple(first): turns})
    start = time.monotonic()
    [ep] = run_episodes(engine, [env], [{}], TOK, Sampling(max_tokens=64), **kwargs)
    assert (ep.end_reason, ep.reward) == (reason, reward)
    assert time.monotonic() - start < 2.5  # a hung tool is not waited for
    assert len(ep.token_ids) == len(ep.loss_mask) == len(ep.logprobs) == len(ep.kept_ids)


def test_native_engine_episodes_replay_to_the_samplers_logprobs():
    """The native engine on the tiny policy (float64): every turn's generated tokens carry
    pi_old and kept ids, every position a routing row, and one teacher-forced forward over the
    whole episode with that routing replayed gives back pi_old at every generated position."""
    import torch

    from policy.testing import tiny_policy
    from rewards.agent import ToolCall
    from rollout.native import NativeEngine
    from rollout.sampling import truncate_logits

    engine = NativeEngine(tiny_policy(0, index_topk=8, vocab_size=128), dtype=torch.float64)
    # Short turns: most tokens end one (stop ids), and every turn "calls" the ok tool.
    sampling = Sampling(
        temperature=0.8, top_k=40, top_p=0.9, max_tokens=4, seed=3,
        stop_token_ids=tuple(range(2, 100)),
    )  # fmt: skip
    envs = [Flaky() for _ in range(3)]
    episodes = run_episodes(
        engine, envs, [{}] * 3, TOK, sampling, max_turns=4, token_budget=4096,
        parse=lambda text: ToolCall("ok", {}),
    )  # fmt: skip
    for ep in episodes:
        assert ep.num_turns >= 2, ep.end_reason
        # The record ends at the model's own last token (no unread tool answer after it),
        # and every position but that one has its routing.
        assert ep.spans[-1][0] == "assistant"
        assert ep.routing.shape[0] == len(ep.token_ids) - 1
        ids = torch.tensor([ep.token_ids])
        rec = torch.from_numpy(ep.routing.astype(np.int64))
        pad = torch.arange(rec.shape[-1]).expand(ids.shape[1] - rec.shape[0], *rec.shape[1:])
        with torch.no_grad():
            logits = engine.model(ids, replay_routing=torch.cat([rec, pad])[None]).logits[0]
        mask = np.array(ep.loss_mask)
        positions = np.flatnonzero(mask)
        z = truncate_logits(logits[positions - 1].double() / 0.8, 40, 0.9)
        lp = z.log_softmax(-1).gather(1, ids[0, positions][:, None])[:, 0]
        np.testing.assert_allclose(lp.numpy(), np.array(ep.logprobs)[mask], rtol=1e-6, atol=1e-7)
        assert all(len(ep.kept_ids[p]) > 0 for p in positions)  # top-k/top-p truncated
        assert all(len(ep.kept_ids[p]) == 0 for p in np.flatnonzero(~mask))


def test_episodes_train_with_the_loss_on_the_models_own_turns():
    """Batch.from_episodes: the learner's log-probs under Keep Routing and Keep Sampling Mask
    reproduce pi_old on exactly the generated turns (ratio 1), and a GRPO step on the
    episodes runs with the tool answers outside the loss."""
    import torch

    from policy.testing import tiny_policy
    from rewards.agent import ToolCall
    from rl.batch import Batch
    from rl.learner import Learner, LearnerConfig, OptimConfig
    from rollout.native import NativeEngine

    policy = tiny_policy(0, index_topk=8, vocab_size=128, dtype=torch.float64)
    engine = NativeEngine(policy, dtype=torch.float64)
    sampling = Sampling(
        temperature=0.8, top_k=40, top_p=0.9, max_tokens=4, seed=5,
        stop_token_ids=tuple(range(2, 100)),
    )  # fmt: skip
    episodes = run_episodes(
        engine, [Flaky() for _ in range(4)], [{}] * 4, TOK, sampling, max_turns=3,
        token_budget=4096, parse=lambda text: ToolCall("ok", {}),
    )  # fmt: skip
    for ep, reward in zip(episodes, [1.0, 0.0, 1.0, 0.0], strict=True):
        ep.reward = reward  # a spread of rewards: non-zero advantages
    batch = Batch.from_episodes(episodes, [0, 0, 0, 0], temperature=0.8)
    mask = batch.response_mask
    assert mask.sum() == sum(sum(ep.loss_mask) for ep in episodes)
    assert mask.sum() < (batch.input_ids.shape[1] - batch.prompt_lens).clamp_min(0).sum()
    learner = Learner(policy, LearnerConfig(optim=OptimConfig(lr=1e-3)))
    with torch.no_grad():
        logp, _, _ = learner.token_logprobs(policy, batch)
    torch.testing.assert_close(logp[mask], batch.old_logprobs[mask].double(), rtol=1e-6, atol=1e-6)
    assert (logp[~mask] == 0).all()
    metrics = learner.step(batch)
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-6 and metrics["loss"] == metrics["loss"]
