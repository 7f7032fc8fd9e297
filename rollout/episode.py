"""Multi-turn tool-use episodes over any rollout engine, token in, token out.

Each turn, every running episode's whole context goes to the engine in one batched
`generate` call; the model's turn ends at EOS. Its text is parsed for one tool call
(rewards.agent's format); the environment runs it (in a worker thread, bounded by
`step_timeout_s`) and the observation is appended through the chat template as tokens. The
trained sequence is exactly the concatenation of the first prompt's tokens, each turn's
generated tokens and the tokens appended between turns: nothing is re-tokenized from text.
`loss_mask` covers exactly the generated spans; pi_old and the kept ids are recorded for
every generated token, and routing for every position from the turn that first processed it
(a generated token's from its decode step, an appended token's from the next turn's
prefill), so Keep Routing and Keep Sampling Mask hold across turns.

An episode ends with a recorded reason: "done" (the environment ended it, e.g. a submit
tool), "answer" (a turn without a tool call), or, with reward 0, "malformed_call",
"unknown_tool", "env_error" (the environment raised), "env_timeout", "length" (a turn hit
max_tokens without EOS), "token_budget" (the context would pass `token_budget`) and
"max_turns". Nothing in an episode raises out of `run_episodes`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chat import ChatTemplate, TextChatTemplate, TextTokenizer
from .trajectory import Engine, Sampling, Trajectory, compact_routing

__all__ = ["Episode", "Segment", "TextChatTemplate", "episode_loss_mask", "run_episodes"]

FAILURES = ("malformed_call", "unknown_tool", "env_error", "env_timeout", "length")
FAILURES += ("token_budget", "max_turns")


@dataclass
class Segment:
    """One trajectory segment's token-exact record (positions index token_ids). `notes` runs
    beside `spans`: an assistant turn's ToolCall, a tool answer's text (the summary
    strategy's input), else None."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # pi_old where generated, else 0
    kept_ids: list[np.ndarray] = field(default_factory=list)  # per position; empty: untruncated
    routing_rows: list[np.ndarray] = field(default_factory=list)  # per position, from its turn
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (role, start, end)
    notes: list[Any] = field(default_factory=list)

    @property
    def routing(self) -> np.ndarray:
        """[positions routed, n_moe_layers, top_k]: every position, or all but the last."""
        return np.stack(self.routing_rows) if self.routing_rows else np.zeros((0, 0, 0))

    @property
    def num_turns(self) -> int:
        return sum(role == "assistant" for role, _, _ in self.spans)

    def _append(self, role: str, ids: Sequence[int], generated: bool, note: Any = None) -> None:
        start = len(self.token_ids)
        self.token_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([generated] * len(ids))
        if not generated:
            self.logprobs.extend([0.0] * len(ids))
            self.kept_ids.extend(np.zeros(0, np.int32) for _ in ids)
        self.spans.append((role, start, len(self.token_ids)))
        self.notes.append(note)


@dataclass
class Episode(Segment):
    """One episode: its current segment's record (the inherited fields), the segments an
    overflow strategy closed before it (`earlier`), and one end reason and reward for all."""

    task: dict = field(default_factory=dict)
    env: Any = None
    earlier: list[Segment] = field(default_factory=list)
    end_reason: str | None = None
    reward: float | None = None
    weight_versions: set[int] = field(default_factory=set)

    @property
    def segments(self) -> list[Segment]:
        return [*self.earlier, self]

    @property
    def num_turns(self) -> int:
        return sum(Segment.num_turns.fget(seg) for seg in self.segments)  # type: ignore[attr-defined]

    def to_trajectories(self, sampling: Sampling, engine: str) -> list[Trajectory]:
        """A stored Trajectory per segment: the segment's first span as the prompt, the rest
        as the "response" (pi_old and kept ids 0 / empty where not generated), with its
        spans, its index, the episode's end reason and reward in `extra` (episode_loss_mask
        reads the mask back)."""
        out = []
        segments = self.segments
        for i, seg in enumerate(segments):
            n = seg.spans[0][2]
            out.append(
                Trajectory(
                    prompt_ids=seg.token_ids[:n],
                    response_ids=seg.token_ids[n:],
                    logprobs=np.asarray(seg.logprobs[n:], np.float32),
                    routing=compact_routing(seg.routing),
                    kept_ids=seg.kept_ids[n:],
                    sampling=sampling,
                    finish_reason=self.end_reason or "unfinished",
                    engine=engine,
                    weight_version=min(self.weight_versions, default=0),
                    extra={
                        "episode": {
                            "turns": [[role, a, b] for role, a, b in seg.spans],
                            "end_reason": self.end_reason,
                            "segment": i,
                            "segments": len(segments),
                        }
                    },
                )
            )
        return out


def _end(ep: Episode, reason: str) -> None:
    ep.end_reason = reason
    if reason in FAILURES:
        ep.reward = 0.0
    else:
        try:
            ep.reward = float(ep.env.verify(ep.env.state))
        except Exception:  # a verifier's bug: a zero, recorded, not a crash
            ep.end_reason, ep.reward = "env_error", 0.0


def run_episodes(
    engine: Engine,
    envs: Sequence[Any],
    tasks: Sequence[dict],
    tokenizer: TextTokenizer,
    sampling: Sampling,
    *,
    template: ChatTemplate | None = None,
    max_turns: int = 8,
    token_budget: int = 1024,
    step_timeout_s: float = 10.0,
    parse: Callable[[str], Any] | None = None,
    overflow: str | None = None,
    summarize: Callable[[list[tuple[Any, str]]], str] | None = None,
) -> list[Episode]:
    """Run one episode per (environment, task) pair, all running episodes batched into one
    engine call a turn. Environments speak rewards.agent's protocol: reset(task) -> text,
    step(call) -> (observation, done), verify(state), a `tools` mapping and tool_schemas().
    The template (rollout/chat.py; default TextChatTemplate) renders the pieces; parse(turn
    text) -> a ToolCall, a ToolCallError, or None for a turn without a call (the final
    answer), by default the template's own."""
    from rewards.agent import ToolCallError

    template = template or TextChatTemplate()
    parse = parse or template.parse

    sampling = dataclasses.replace(
        sampling, stop_token_ids=tuple({*sampling.stop_token_ids, tokenizer.eos_id})
    )
    episodes: list[Episode] = []
    for env, task in zip(envs, tasks, strict=True):
        ep = Episode(task=task, env=env)
        try:
            # The tool list in the prompt only where the template wants it there.
            env.tools_in_prompt = template.prompt_lists_tools
            first = template.first(tokenizer, env.reset(task), env.tool_schemas())
        except Exception:
            ep._append("prompt", [tokenizer.bos_id], generated=False)
            _end(ep, "env_error")
        else:
            ep._append("prompt", first, generated=False)
            if len(first) >= token_budget:
                _end(ep, "token_budget")
        episodes.append(ep)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="env-step")
    try:
        for turn in range(max_turns):
            running = [ep for ep in episodes if ep.end_reason is None]
            if not running:
                break
            trajs = engine.generate([ep.token_ids for ep in running], sampling, n=1)
            for ep, traj in zip(running, trajs, strict=True):
                _take_turn(ep, traj, token_budget)
                if ep.end_reason is None:
                    _act(ep, parse, ToolCallError, tokenizer, template, token_budget, pool,
                         step_timeout_s, last=turn == max_turns - 1, overflow=overflow,
                         summarize=summarize)  # fmt: skip
        for ep in episodes:
            if ep.end_reason is None:
                _end(ep, "max_turns")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a hung tool is not waited for
    return episodes


def _take_turn(ep: Episode, traj: Any, token_budget: int) -> None:
    """Record one generated turn: routing of the positions this call processed first, then the
    generated tokens with their pi_old and kept ids."""
    if list(traj.prompt_ids) != ep.token_ids:
        raise RuntimeError("the engine answered another context than the episode's")
    new_rows = traj.routing[len(ep.routing_rows) :]
    ep.routing_rows.extend(np.asarray(r) for r in new_rows)
    ep.weight_versions.add(int(traj.weight_version))
    ep._append("assistant", traj.response_ids, generated=True)
    ep.logprobs.extend(float(x) for x in traj.logprobs)
    ep.kept_ids.extend(np.asarray(k, dtype=np.int32) for k in traj.kept_ids)
    if traj.finish_reason != "stop":
        _end(ep, "length")
    elif len(ep.token_ids) > token_budget:
        _end(ep, "token_budget")


def _act(
    ep: Episode,
    parse: Callable[[str], Any],
    error_type: type,
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    token_budget: int,
    pool: concurrent.futures.ThreadPoolExecutor,
    step_timeout_s: float,
    last: bool,
    overflow: str | None = None,
    summarize: Callable[[list[tuple[Any, str]]], str] | None = None,
) -> None:
    """Run the turn's tool call in the environment and append its observation (not after the
    last turn: the model would never read it, so the record ends at its own last token)."""
    _, start, end = ep.spans[-1]
    call = parse(template.turn_text(tokenizer, ep.token_ids[start:end]))
    ep.notes[-1] = call
    if call is None:
        _end(ep, "answer")
        return
    if isinstance(call, error_type):
        _end(ep, "malformed_call")
        return
    if call.name not in getattr(ep.env, "tools", {}):
        _end(ep, "unknown_tool")
        return
    future = pool.submit(ep.env.step, call)
    try:
        observation, done = future.result(timeout=step_timeout_s)
    except concurrent.futures.TimeoutError:
        _end(ep, "env_timeout")
        return
    except Exception:
        _end(ep, "env_error")
        return
    if done:
        _end(ep, "done")
        return
    if last:
        _end(ep, "max_turns")
        return
    ids = template.observation(tokenizer, str(observation))
    if len(ep.token_ids) + len(ids) >= token_budget:
        fits = overflow is not None and _overflow(
            ep, ids, str(observation), overflow, template, tokenizer, summarize, token_budget
        )
        if not fits:
            _end(ep, "token_budget")
        return
    ep._append("tool", ids, generated=False, note=str(observation))


# How a segment's spans read as messages for rollout/context.py, and what a piece carried into
# the next segment is called there (context, not trained again: episode_loss_mask trains
# "assistant" spans only).
_MESSAGE_ROLE = {"prompt": "user", "assistant": "assistant", "kept_assistant": "assistant"}
_MESSAGE_ROLE |= {"tool": "tool", "kept_tool": "tool", "summary": "system"}
_CARRIED = {"assistant": "kept_assistant", "tool": "kept_tool"}


def default_summary(pairs: list[tuple[Any, str]]) -> str:
    """Each replaced call and the first 40 characters of its answer, one line each."""
    lines = []
    for call, answer in pairs:
        name = getattr(call, "name", "?")
        args = json.dumps(getattr(call, "arguments", {}), sort_keys=True)
        short = " ".join(answer.split())
        lines.append(f"{name}({args}) -> {short[:40]}{'...' if len(short) > 40 else ''}")
    return "Summary of earlier tool calls:\n" + "\n".join(lines)


def _overflow(
    ep: Episode,
    obs_ids: list[int],
    obs_text: str,
    strategy: str,
    template: ChatTemplate,
    tokenizer: TextTokenizer,
    summarize: Callable[[list[tuple[Any, str]]], str] | None,
    token_budget: int,
) -> bool:
    """Close the current segment and open the next with the context `strategy` leaves (its
    pieces' tokens reused as they are, the pending tool answer included), if that fits the
    budget; False (nothing changed) if it does not."""
    from .context import Message, overflow_plan

    spans = zip(ep.spans, ep.notes, strict=True)
    pieces = [(role, ep.token_ids[a:b], note) for (role, a, b), note in spans]
    pieces.append(("tool", obs_ids, obs_text))
    messages = [
        Message(_MESSAGE_ROLE[role], "", tool_call=_MESSAGE_ROLE[role] == "assistant")
        for role, _, _ in pieces
    ]
    kept, replaced = overflow_plan(messages, strategy)
    nxt = Segment()
    for i in kept:
        role, ids, note = pieces[i]
        nxt._append(_CARRIED.get(role, role), ids, generated=False, note=note)
    if strategy == "summary" and replaced:
        text = (summarize or default_summary)([(pieces[a][2], pieces[b][2]) for a, b in replaced])
        nxt._append("summary", template.observation(tokenizer, text), generated=False, note=text)
    if len(nxt.token_ids) >= token_budget:
        return False
    ep.earlier.append(
        Segment(
            ep.token_ids,
            ep.loss_mask,
            ep.logprobs,
            ep.kept_ids,
            ep.routing_rows,
            ep.spans,
            ep.notes,
        )  # fmt: skip
    )
    for f in dataclasses.fields(Segment):
        setattr(ep, f.name, getattr(nxt, f.name))
    return True


def episode_loss_mask(traj: Trajectory) -> list[bool] | None:
    """A stored episode's loss mask over its tokens (its assistant turns), or None for a
    single-turn trajectory."""
    episode = traj.extra.get("episode")
    if episode is None:
        return None
    mask = [False] * traj.num_tokens
    for role, start, end in episode["turns"]:
        if role == "assistant":
            mask[start:end] = [True] * (end - start)
    return mask
