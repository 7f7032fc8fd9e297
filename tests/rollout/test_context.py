"""Context policies (rollout/context.py) on one fixed episode: thinking retention and each
overflow strategy give exactly the expected message list."""

from __future__ import annotations

import pytest

from rollout.context import Message, apply_overflow, retain_thinking

SYS = Message("system", "you are an agent")
U1 = Message("user", "find the rating")
A1 = Message("assistant", "call find", reasoning="first I look it up", tool_call=True)
T1 = Message("tool", "id 7")
A2 = Message("assistant", "call rating", reasoning="now the rating", tool_call=True)
T2 = Message("tool", "42")
A3 = Message("assistant", "it is 42", reasoning="done")
U2 = Message("user", "and the budget?")
A4 = Message("assistant", "call budget", reasoning="budget next", tool_call=True)
T4 = Message("tool", "900")
A5 = Message("assistant", "call more", reasoning="one more", tool_call=True)
T5 = Message("tool", "1")
EPISODE = [SYS, U1, A1, T1, A2, T2, A3, U2, A4, T4, A5, T5]


def _bare(m):
    return Message(m.role, m.content, "", m.tool_call)


def test_thinking_is_kept_across_tool_turns_and_dropped_at_a_new_user_message():
    got = retain_thinking(EPISODE)
    # Before U2: reasoning dropped (a user message follows); after U2: kept (only tools follow).
    assert got == [SYS, U1, _bare(A1), T1, _bare(A2), T2, _bare(A3), U2, A4, T4, A5, T5]
    assert retain_thinking(EPISODE[:6]) == EPISODE[:6]  # no later user message: all kept


def test_discard_all_drops_every_tool_call_pair():
    assert apply_overflow(EPISODE, "discard_all") == [SYS, U1, A3, U2]


def test_discard_75_drops_the_oldest_three_quarters_of_the_pairs():
    # 4 pairs: the oldest 3 go, the newest stays.
    assert apply_overflow(EPISODE, "discard_75") == [SYS, U1, A3, U2, A5, T5]


def test_summary_replaces_the_history_with_one_message():
    seen = []

    def summarize(history):
        seen.append(history)
        return "found id 7, rating 42, budget 900, then 1"

    got = apply_overflow(EPISODE, "summary", summarize)
    assert seen == [[A1, T1, A2, T2, A4, T4, A5, T5]]
    summary = Message("assistant", "found id 7, rating 42, budget 900, then 1")
    assert got == [SYS, U1, A3, U2, summary]


def test_bad_strategies_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        apply_overflow(EPISODE, "discard_half")
    with pytest.raises(ValueError, match="summarize callable"):
        apply_overflow(EPISODE, "summary")
    assert apply_overflow([SYS, U1], "summary") == [SYS, U1]  # nothing to summarize
