"""Context overflow inside the episode loop (rollout/episode.py with rollout/context.py's
strategies): a tool answer that would pass the token budget rewrites the context into a new
segment whose tokens are the kept pieces' own tokens, token for token; segments share the
episode's reward and advantage; on the native engine each segment's log-probs replay to the
sampler's under Keep Routing and Keep Sampling Mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.agent import Environment, Tool, ToolCall, format_tool_call
from rl.advantage import group_advantages
from rl.batch import Batch
from rl.tokenizer import CharTokenizer
from rollout import Sampling
from rollout.chat import TextChatTemplate
from rollout.episode import episode_loss_mask, run_episodes
from rollout.trajectory import Trajectory

TOK = CharTokenizer()
T = TextChatTemplate()
CALL = format_tool_call("read", {})


class Pages(Environment):
    """Each read returns the next long page; the episode's verdict is always 1."""

    tools = {"read": Tool("the next page", {})}

    def reset(self, task):
        self.state = {"page": 0}
        return "read the pages"

    def verify(self, state):
        return 1.0

    def tool_read(self):
        self.state["page"] += 1
        return f"page {self.state['page']}: " + "lorem ipsum " * 4


class Scripted:
    """Every turn answers with the next scripted text + EOS (routing names the position)."""

    name, weight_version = "scripted", 0

    def __init__(self, turns):
        self.turns = list(turns)

    def generate(self, prompts, sampling, n=1):
        out = []
        for prompt in prompts:
            ids = [*TOK.encode(self.turns.pop(0)), TOK.eos_id]
            total = len(prompt) + len(ids)
            out.append(
                Trajectory(
                    prompt_ids=list(prompt),
                    response_ids=ids,
                    logprobs=np.full(len(ids), -0.5, np.float32),
                    routing=np.array([[[p, p + 1]] for p in range(total - 1)]),
                    kept_ids=[np.zeros(0, np.int32)] * len(ids),
                    sampling=sampling,
                    finish_reason="stop",
                    engine=self.name,
                    weight_version=0,
                )  # fmt: skip
            )
        return out


def _run(strategy, turns=(CALL,) * 6 + ("done",), budget=520):
    return run_episodes(
        Scripted(turns), [Pages()], [{}], TOK, Sampling(max_tokens=100), template=T,
        max_turns=10, token_budget=budget, overflow=strategy,
    )[0]  # fmt: skip


def _pieces(seg):
    return [(role, seg.token_ids[a:b]) for role, a, b in seg.spans]


def test_without_a_strategy_the_budget_ends_the_episode():
    ep = _run(None)
    assert (ep.end_reason, ep.reward, len(ep.segments)) == ("token_budget", 0.0, 1)


@pytest.mark.parametrize("strategy", ["discard_all", "discard_75", "summary"])
def test_a_rewritten_context_continues_in_a_token_exact_segment(strategy):
    ep = _run(strategy)
    assert (ep.end_reason, ep.reward) == ("answer", 1.0)
    first, second = ep.segments[0], ep.segments[1]
    pairs = [p for p in _pieces(first) if p[0] in ("assistant", "tool")]
    n_pairs = len(pairs) // 2 + 1  # with the answer that did not fit
    assert n_pairs == 4
    obs = T.observation(TOK, f"page {n_pairs}: " + "lorem ipsum " * 4)
    head = first.token_ids[: first.spans[0][2]]  # the first prompt, in every segment
    assert second.token_ids[: len(head)] == head
    roles = [r for r, _, _ in second.spans]
    if strategy == "discard_all":
        carried = []
    elif strategy == "discard_75":  # 4 pairs with the pending answer: the newest is kept
        carried = [*pairs[-1:], ("tool", obs)]
    else:
        summary = [("summary", second.token_ids[second.spans[1][1] : second.spans[1][2]])]
        text = TOK.decode(summary[0][1])
        assert text.startswith("<tool>Summary of earlier tool calls: / read({}) -> page 1:")
        assert text.count("read({})") == n_pairs
        carried = summary
    got = _pieces(second)[1 : 1 + len(carried)]
    rename = {"assistant": "kept_assistant", "tool": "kept_tool"}
    want = [(rename.get(r, r), ids) for r, ids in carried]
    assert got == want  # the kept pieces' own tokens
    assert roles[1 + len(carried)] == "assistant"  # then the model's next turn
    # Each segment is token-exact: its loss mask is exactly its own generated turns.
    for seg in ep.segments:
        mask = np.zeros(len(seg.token_ids), bool)
        for role, a, b in seg.spans:
            mask[a:b] = role == "assistant"
        assert list(mask) == seg.loss_mask
        assert len(seg.token_ids) == len(seg.logprobs) == len(seg.kept_ids) < 520
        assert seg.routing.shape[0] == len(seg.token_ids) - 1  # every position of the segment
        assert np.array_equal(seg.routing[:, 0, 0], np.arange(len(seg.token_ids) - 1))
    assert ep.num_turns == 7
    # Stored: a trajectory per segment, each masked to its own turns.
    trajs = ep.to_trajectories(Sampling(), "scripted")
    assert [t.extra["episode"]["segment"] for t in trajs] == list(range(len(ep.segments)))
    for t, seg in zip(trajs, ep.segments, strict=True):
        assert episode_loss_mask(t) == seg.loss_mask


def test_segments_share_their_episodes_reward_and_advantage():
    long_ep, short_ep = _run("discard_all"), _run(None, turns=("done",))
    long_ep.reward, short_ep.reward = 1.0, 0.0
    batch = Batch.from_episodes([long_ep, short_ep], [7, 7])
    n = len(long_ep.segments)
    assert n >= 2 and batch.size == n + 1
    assert batch.episode_ids.tolist() == [0] * n + [1]
    adv = group_advantages(batch.rewards, batch.group_ids, episode_ids=batch.episode_ids)
    # Two episodes in the group, whatever the segments: +0.5 on every row of the first.
    assert adv.tolist() == [0.5] * n + [-0.5]
    assert batch.response_mask.sum() == sum(sum(s.loss_mask) for s in long_ep.segments) + sum(
        short_ep.loss_mask
    )


def test_native_engine_segments_replay_to_the_samplers_logprobs():
    """The tiny policy (float64) through a discard_all overflow: in every segment, the
    learner's log-probs with the recorded routing and kept ids equal pi_old."""
    from policy.testing import tiny_policy
    from rl.learner import Learner, LearnerConfig
    from rollout.native import NativeEngine

    policy = tiny_policy(0, index_topk=8, vocab_size=128, dtype=torch.float64)
    engine = NativeEngine(policy, dtype=torch.float64)
    sampling = Sampling(
        temperature=0.8, top_k=40, top_p=0.9, max_tokens=4, seed=3,
        stop_token_ids=tuple(range(2, 100)),
    )  # fmt: skip
    episodes = run_episodes(
        engine, [Pages() for _ in range(2)], [{}] * 2, TOK, sampling, template=T, max_turns=6,
        token_budget=300, parse=lambda text: ToolCall("read", {}), overflow="discard_all",
    )  # fmt: skip
    assert all(len(ep.segments) >= 2 for ep in episodes)
    for ep in episodes:
        ep.reward = 1.0
    batch = Batch.from_episodes(episodes, [0, 0], temperature=0.8)
    mask = batch.response_mask
    learner = Learner(policy, LearnerConfig())
    with torch.no_grad():
        logp, _, _ = learner.token_logprobs(policy, batch)
    torch.testing.assert_close(logp[mask], batch.old_logprobs[mask].double(), rtol=1e-6, atol=1e-6)
