"""Context policies for agent episodes, DeepSeek-V3.2's: what of the conversation the model sees
at its next turn.

Thinking retention: an assistant turn's reasoning stays in the context while only tool
messages (and the assistant's own further turns) follow it, and is dropped once a new user
message arrives; the tool calls and their results stay either way.

Overflow strategies, for an episode whose context outgrows its budget; each keeps the system
and user messages and rewrites the tool-call history (an assistant turn that called a tool
and the tool's answer, as pairs):
- "summary": the history replaced by one assistant message at the end of the context, a
  summary of it (written by a callable; in training, the policy itself);
- "discard_75": the oldest 75% of the tool-call pairs dropped;
- "discard_all": every tool-call pair dropped (the context starts over from the task).
Every message that is not part of a tool-call pair keeps its place and order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

OVERFLOW_STRATEGIES = ("summary", "discard_75", "discard_all")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    reasoning: str = ""  # an assistant turn's thinking
    tool_call: bool = False  # an assistant turn that called a tool


def retain_thinking(messages: Sequence[Message]) -> list[Message]:
    """The messages with each assistant turn's reasoning kept only while no user message
    follows it."""
    out: list[Message] = []
    user_after = False
    for m in reversed(messages):
        if m.role == "assistant" and m.reasoning and user_after:
            m = replace(m, reasoning="")
        out.append(m)
        user_after = user_after or m.role == "user"
    return out[::-1]


def _pairs(messages: Sequence[Message]) -> list[tuple[int, int]]:
    """(assistant index, tool index) of each tool call answered by the next message."""
    return [
        (i, i + 1)
        for i, m in enumerate(messages[:-1])
        if m.role == "assistant" and m.tool_call and messages[i + 1].role == "tool"
    ]


def overflow_plan(
    messages: Sequence[Message], strategy: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """(indices of the messages kept, in order; the tool-call pairs the strategy removes)."""
    if strategy not in OVERFLOW_STRATEGIES:
        raise ValueError(
            f"overflow strategy must be one of {OVERFLOW_STRATEGIES}, not {strategy!r}"
        )
    pairs = _pairs(messages)
    if strategy == "discard_75":
        pairs = pairs[: math.ceil(0.75 * len(pairs))]  # the oldest three quarters go
    drop = {i for pair in pairs for i in pair}
    return [i for i in range(len(messages)) if i not in drop], pairs


def apply_overflow(
    messages: Sequence[Message],
    strategy: str,
    summarize: Callable[[list[Message]], str] | None = None,
) -> list[Message]:
    """The context after an overflow strategy (see the module docstring)."""
    kept, pairs = overflow_plan(messages, strategy)
    out = [messages[i] for i in kept]
    if strategy != "summary" or not pairs:
        return out
    if summarize is None:
        raise ValueError("the summary strategy needs a summarize callable")
    history = [messages[i] for pair in pairs for i in pair]
    # The rest of the conversation in order, then the summary of the tool work, from which
    # the episode continues.
    return [*out, Message("assistant", summarize(history))]
