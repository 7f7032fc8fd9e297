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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chat import ChatTemplate, TextChatTemplate, TextTokenizer
from .trajectory import Engine, Sampling, Trajectory, compact_routing

__all__ = ["Episode", "TextChatTemplate", "episode_loss_mask", "run_episodes"]

FAILURES = ("malformed_call", "unknown_tool", "env_error", "env_timeout", "length")
FAILURES += ("token_budget", "max_turns")


@dataclass
class Episode:
    """One episode's token-exact record (positions index token_ids)."""

    task: dict
    env: Any
    token_ids: list[int]
    loss_mask: list[bool]
    logprobs: list[float]  # pi_old at generated positions, 0 elsewhere
    kept_ids: list[np.ndarray]  # per position; empty where nothing was truncated
    routing_rows: list[np.ndarray] = field(default_factory=list)  # per position, from its turn
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (role, start, end)
    end_reason: str | None = None
    reward: float | None = None
    weight_versions: set[int] = field(default_factory=set)

    @property
    def routing(self) -> np.ndarray:
        """[positions routed, n_moe_layers, top_k]: every position, or all but the last."""
        return np.stack(self.routing_rows) if self.routing_rows else np.zeros((0, 0, 0))

    @property
    def num_turns(self) -> int:
        return sum(role == "assistant" for role, _, _ in self.spans)

    def to_trajectory(self, sampling: Sampling, engine: str) -> Trajectory:
        """The episode as a stored Trajectory: the first prompt, then everything after it as
        the "response" (pi_old and kept ids 0 / empty at the tool answers), with the turns,
        the end reason and the reward in `extra` (episode_loss_mask reads the mask back)."""
        n = self.spans[0][2]
        return Trajectory(
            prompt_ids=self.token_ids[:n],
            response_ids=self.token_ids[n:],
            logprobs=np.asarray(self.logprobs[n:], np.float32),
            routing=compact_routing(self.routing),
            kept_ids=self.kept_ids[n:],
            sampling=sampling,
            finish_reason=self.end_reason or "unfinished",
            engine=engine,
            weight_version=min(self.weight_versions, default=0),
            extra={
                "episode": {
                    "turns": [[role, a, b] for role, a, b in self.spans],
                    "end_reason": self.end_reason,
                }
            },
        )

    def _append(self, role: str, ids: Sequence[int], generated: bool) -> None:
        start = len(self.token_ids)
        self.token_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([generated] * len(ids))
        if not generated:
            self.logprobs.extend([0.0] * len(ids))
            self.kept_ids.extend(np.zeros(0, np.int32) for _ in ids)
        self.spans.append((role, start, len(self.token_ids)))


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
        ep = Episode(task, env, [], [], [], [])
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
                         step_timeout_s, last=turn == max_turns - 1)  # fmt: skip
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
) -> None:
    """Run the turn's tool call in the environment and append its observation (not after the
    last turn: the model would never read it, so the record ends at its own last token)."""
    _, start, end = ep.spans[-1]
    call = parse(template.turn_text(tokenizer, ep.token_ids[start:end]))
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
        _end(ep, "token_budget")
        return
    ep._append("tool", ids, generated=False)


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
