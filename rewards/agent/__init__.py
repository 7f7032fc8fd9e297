"""Agent environments for tool-use tasks, the tool-call text format, and a reward adapter.

The model calls a tool by writing

    <tool_call>{"name": "calculate", "arguments": {"expression": "2 * (3 + 4)"}}</tool_call>

and the environment answers with an observation (a rollout engine wraps it in
<tool_response>...</tool_response>). A malformed call is answered with an observation that
says what is wrong and how to fix it; parsing never raises.

An Environment: `reset(task) -> observation`, `step(tool_call) -> (observation, done)`,
`verify(final_state) -> reward in [0, 1]`, and a seeded `generate(seed) -> (task, solution)`
whose solutions verify. `AgentVerifier` turns an environment into a reward: it replays the
tool calls of a full transcript in a fresh environment (environments are deterministic, so
the replay sees what the model saw) and verifies the final state. `spec.py` describes
environments as data (tools with JSON-schema arguments, state, task generator, verifier), so
families of them can be synthesized; its environments speak this same protocol.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..contract import Sample

_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
FORMAT_HINT = 'call a tool as <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolCallError:
    """A call that could not be parsed; `message` is the observation to show the model."""

    message: str


def format_tool_call(name: str, arguments: dict) -> str:
    """The text a model should emit to call `name` with `arguments`."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def _parse_body(body: str) -> ToolCall | ToolCallError:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        return ToolCallError(f"error: tool call is not valid JSON ({exc}); {FORMAT_HINT}")
    if not isinstance(obj, dict):
        return ToolCallError(f"error: tool call must be a JSON object; {FORMAT_HINT}")
    extra = sorted(set(obj) - {"name", "arguments"})
    if extra:
        return ToolCallError(f"error: unexpected key(s) {extra} in tool call; {FORMAT_HINT}")
    if not isinstance(obj.get("name"), str) or not obj["name"]:
        return ToolCallError(f'error: tool call needs a string "name"; {FORMAT_HINT}')
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return ToolCallError(f'error: "arguments" must be a JSON object; {FORMAT_HINT}')
    return ToolCall(obj["name"], arguments)


def find_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """Every tool call in `text`, in order; malformed ones as ToolCallError."""
    calls: list[ToolCall | ToolCallError] = []
    for body, close in _CALL.findall(text):
        if not close:
            calls.append(ToolCallError("error: <tool_call> is not closed with </tool_call>"))
        else:
            calls.append(_parse_body(body.strip()))
    return calls


def parse_tool_call(text: str) -> ToolCall | ToolCallError:
    """The single tool call in one model turn."""
    calls = find_tool_calls(text)
    if not calls:
        return ToolCallError(f"error: no tool call found; {FORMAT_HINT}")
    if len(calls) > 1:
        return ToolCallError("error: one tool call per turn, found " + str(len(calls)))
    return calls[0]


@dataclass(frozen=True)
class Tool:
    description: str
    params: dict[str, str]  # argument name -> description; all required


class Environment:
    """Base class: subclasses define `tools`, `tool_<name>` methods, `reset`, `verify`.

    `state` is a JSON-like dict that `verify` judges; `step` never raises on bad input.
    """

    name = "environment"
    tools: dict[str, Tool] = {}
    max_steps = 20
    # reset's prompt ends with the tool list; a chat template that writes the tool schemas
    # itself (rollout/chat.py) turns it off
    tools_in_prompt = True

    def __init__(self) -> None:
        self.state: dict = {}
        self.steps = 0
        self.done = False

    def tool_schemas(self) -> list[dict]:
        """The tools as function descriptions with JSON-schema arguments (name, description,
        parameters), for chat templates that render them; every argument a string."""
        return [
            {
                "name": name,
                "description": tool.description,
                "parameters": {
                    "type": "object",
                    "properties": {
                        p: {"type": "string", "description": d} for p, d in tool.params.items()
                    },
                    "required": list(tool.params),
                },
            }
            for name, tool in self.tools.items()
        ]

    def with_tools(self, prompt: str) -> str:
        """The task prompt, then the tool list when tools_in_prompt (what reset returns)."""
        return f"{prompt}\n{self.tool_list()}" if self.tools_in_prompt else prompt

    def reset(self, task: dict) -> str:
        raise NotImplementedError

    def verify(self, final_state: dict) -> float:
        raise NotImplementedError

    @staticmethod
    def generate(seed: int) -> tuple[dict, Any]:
        raise NotImplementedError

    def tool_list(self) -> str:
        lines = [f"- {n}({', '.join(t.params)}): {t.description}" for n, t in self.tools.items()]
        return "Tools:\n" + "\n".join(lines) + "\nTo use one, " + FORMAT_HINT + "."

    def step(self, tool_call: ToolCall | ToolCallError | str) -> tuple[str, bool]:
        if self.done:
            return "error: the episode is over", True
        self.steps += 1
        call = parse_tool_call(tool_call) if isinstance(tool_call, str) else tool_call
        observation = self._dispatch(call)
        if not self.done and self.steps >= self.max_steps:
            self.done = True
            observation += f"\n(step limit of {self.max_steps} reached; episode over)"
        return observation, self.done

    def _dispatch(self, call: ToolCall | ToolCallError) -> str:
        if isinstance(call, ToolCallError):
            return call.message
        if call.name not in self.tools:
            return f"error: unknown tool {call.name!r}; available: {', '.join(self.tools)}"
        problem = self._argument_error(call)
        if problem:
            return problem
        try:
            return self._invoke(call)
        except ToolError as exc:
            return f"error: {exc}"
        except EnvironmentBroken:
            raise  # not the model's doing: the episode ends (rollout/episode.py: env_error)
        except Exception as exc:  # odd argument types, a tool's bug: an observation, not a crash
            return f"error: {call.name} failed ({type(exc).__name__}: {exc})"

    def _argument_error(self, call: ToolCall) -> str | None:
        """The observation for a call whose arguments do not fit the tool, else None."""
        tool = self.tools[call.name]
        missing = [p for p in tool.params if p not in call.arguments]
        unknown = [a for a in call.arguments if a not in tool.params]
        if missing or unknown:
            expected = ", ".join(tool.params) or "no arguments"
            return f"error: {call.name} takes ({expected}); missing {missing}, unexpected {unknown}"
        return None

    def _invoke(self, call: ToolCall) -> str:
        return getattr(self, f"tool_{call.name}")(**call.arguments)


class ToolError(Exception):
    """Raised by a tool for bad arguments; shown to the model as an error observation."""


class EnvironmentBroken(RuntimeError):
    """Raised by a tool when the environment itself cannot go on (e.g. no sandbox on this
    machine): the step raises instead of answering the model."""


def run_episode(
    env: Environment, task: dict, policy: Callable[[str], str], max_turns: int = 20
) -> str:
    """Drive `policy` (observation -> model text) through an episode; return the transcript.

    The transcript interleaves model turns with <tool_response> blocks, the shape a rollout
    engine produces and `AgentVerifier` replays.
    """
    observation = env.reset(task)
    parts = []
    for _ in range(max_turns):
        text = policy(observation)
        observation, done = env.step(text)
        parts.append(f"{text}\n<tool_response>{observation}</tool_response>")
        if done:
            break
    return "\n".join(parts)


class AgentVerifier:
    """Reward adapter: replay a transcript's tool calls in a fresh environment and verify.

    Reference: {"task": <task dict from the environment's generator>}.
    """

    def __init__(self, make_env: Callable[[], Environment]):
        self.make_env = make_env

    def score(self, sample: Sample) -> dict | None:
        task = sample.reference.get("task")
        if task is None:
            return None
        env = self.make_env()
        env.reset(task)
        malformed = 0
        for call in find_tool_calls(sample.response):
            malformed += isinstance(call, ToolCallError)
            _, done = env.step(call)
            if done:
                break
        return {
            "reward": float(env.verify(env.state)),
            "steps": float(env.steps),
            "malformed_calls": float(malformed),
        }
