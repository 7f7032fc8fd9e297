"""An environment format for synthesizing many tool-use environments from one description.

An environment is data plus plain functions, so a generator can build thousands of distinct
ones (DeepSeek-V3.2's agent RL trained over many synthesized environments):

- tools: `ToolSpec(name, description, parameters, fn)`, `parameters` a JSON schema of the
  arguments (an object schema: `properties`, `required`; types string, integer, number,
  boolean, array, object), `fn(state, **arguments)` returning the observation (a string, or
  anything JSON-able, shown as JSON) and raising `ToolError` for a call it refuses;
- a state: a JSON-like dict made per task by `initial_state(task)`, which tools read and change;
- a task generator: `make_task(rng) -> (task, solution)`, the solution the tool calls that
  solve it (so every generated task is known to be solvable);
- a verifier: `verify(state, task) -> reward in [0, 1]`, judging the final state;
- optionally a demonstrator: `demonstrate(task, rng) -> calls`, what the agent warm start
  (rl/agent_sft.py) imitates instead of the solution: a weaker behaviour policy than the
  solver, so that RL has something left to learn beyond its warm start.

`EnvSpec.environment()` gives a `SpecEnvironment`, which speaks the same protocol as the
hand-written environments (reset / step / verify, never raising on bad input: arguments are
checked against the schema first), so `AgentVerifier` and rollouts use either. A *family* is a
function from a seed to an `EnvSpec`; `synthesize(family, n)` makes n distinct environments.
Specs and families load by `module:attr` from YAML like verifiers do (`load_env`).

`lookup_family` is a built-in family whose tasks need several dependent tool calls: each
environment is a small world of linked records under its own vocabulary (its own entity
kinds, tool names and fields), and a question is answered only by following ids from one
record to the next.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import Environment, Tool, ToolCall, ToolError, format_tool_call

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def schema_errors(schema: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    """What is wrong with `arguments` against an object schema (empty: nothing). Checks the
    required names, unknown names (additionalProperties defaults to false here: a model that
    invents an argument should hear so) and each property's type."""
    props: dict[str, Any] = schema.get("properties", {})
    errors = [f"missing argument {n!r}" for n in schema.get("required", []) if n not in arguments]
    if not schema.get("additionalProperties", False):
        errors += [f"unexpected argument {n!r}" for n in arguments if n not in props]
    for name, value in arguments.items():
        want = props.get(name, {}).get("type")
        if want is None:
            continue
        ok = isinstance(value, _JSON_TYPES[want])
        if want in ("integer", "number") and isinstance(value, bool):
            ok = False  # JSON's true is not a number
        if not ok:
            errors.append(f"argument {name!r} must be {want}, got {type(value).__name__}")
    return errors


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]


@dataclass(frozen=True)
class EnvSpec:
    name: str
    tools: tuple[ToolSpec, ...]
    make_task: Callable[[random.Random], tuple[dict, list[ToolCall]]]
    initial_state: Callable[[dict], dict]
    prompt: Callable[[dict], str]
    verify: Callable[[dict, dict], float]
    max_steps: int = 20
    # The warm start's behaviour policy (None: the solution). Its repr enters the warm-start
    # cache key, so give it one that names its settings (a frozen dataclass does).
    demonstrate: Callable[[dict, random.Random], list[ToolCall]] | None = None

    def generate(self, seed: int) -> tuple[dict, list[ToolCall]]:
        """A task and the tool calls that solve it, from a seed."""
        return self.make_task(random.Random(seed))

    def demonstration(self, seed: int) -> tuple[dict, list[ToolCall]]:
        """A task (the one `generate(seed)` gives) and the calls the warm start imitates on it:
        the demonstrator's, or the solution."""
        rng = random.Random(seed)
        task, solution = self.make_task(rng)
        return task, solution if self.demonstrate is None else self.demonstrate(task, rng)

    def environment(self) -> SpecEnvironment:
        return SpecEnvironment(self)


class SpecEnvironment(Environment):
    """An EnvSpec run as an Environment (reset / step / verify)."""

    def __init__(self, spec: EnvSpec) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.max_steps = spec.max_steps
        self._tools = {t.name: t for t in spec.tools}
        self.tools = {
            t.name: Tool(
                t.description,
                {
                    n: p.get("description", p.get("type", ""))
                    for n, p in t.parameters.get("properties", {}).items()
                },
            )
            for t in spec.tools
        }
        self.task: dict = {}

    def reset(self, task: dict) -> str:
        self.task = task
        self.state = self.spec.initial_state(task)
        self.steps, self.done = 0, False
        return self.with_tools(self.spec.prompt(task))

    def verify(self, final_state: dict) -> float:
        return float(self.spec.verify(final_state, self.task))

    def tool_schemas(self) -> list[dict]:
        return [
            {"name": t.name, "description": t.description, "parameters": t.parameters}
            for t in self.spec.tools
        ]

    def _argument_error(self, call: ToolCall) -> str | None:
        errors = schema_errors(self._tools[call.name].parameters, call.arguments)
        return f"error: {call.name}: " + "; ".join(errors) if errors else None

    def _invoke(self, call: ToolCall) -> str:
        out = self._tools[call.name].fn(self.state, **call.arguments)
        if self.state.get("_done"):
            self.done = True
        return out if isinstance(out, str) else json.dumps(out, sort_keys=True)


def synthesize(family: Callable[[int], EnvSpec], n: int, seed: int = 0) -> list[EnvSpec]:
    """n environments of a family, from seeds seed, seed + 1, ..."""
    return [family(seed + i) for i in range(n)]


def load_env(path: str) -> EnvSpec | Callable[[int], EnvSpec]:
    """An EnvSpec or a family by `module:attr` (the verifiers' loader)."""
    from ..registry import load

    obj = load(path)
    if not isinstance(obj, EnvSpec) and not callable(obj):
        raise ValueError(f"{path!r} is neither an EnvSpec nor a family (seed -> EnvSpec)")
    return obj


# ---- a built-in family: answers that need a chain of dependent lookups -------------------

_KINDS = [
    "customer", "order", "warehouse", "supplier", "ship", "port", "patient", "doctor",
    "clinic", "student", "course", "teacher", "author", "book", "library", "team", "player",
    "stadium", "project", "engineer", "office", "farm", "crop", "market",
]  # fmt: skip
_FIELDS = ["budget", "rating", "capacity", "age", "weight", "score", "price", "distance"]
_NAMES = [
    "amber", "birch", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper",
    "kestrel", "lumen", "maple", "nimbus", "onyx", "pylon", "quartz", "raven", "sable", "tundra",
]  # fmt: skip


def lookup_family(seed: int) -> EnvSpec:
    """One environment of linked records: kinds K0 -> K1 -> ... -> Kd (d = 2 or 3 links), each
    record of K_i naming one record of K_(i+1) by id, and the last kind carrying a numeric
    field. Tools: find_<K0>(name) -> id; <K_i>_<K_(i+1)>(id) -> the linked id; <Kd>_<field>(id)
    -> the value; submit(answer). A task asks for the field at the end of the chain from a
    named K0 record: d + 2 dependent calls. Vocabulary, chain and records come from the seed."""
    rng = random.Random(seed)
    depth = rng.choice([2, 3])
    kinds = rng.sample(_KINDS, depth + 1)
    field = rng.choice(_FIELDS)
    n = 6  # records a kind
    names = rng.sample(_NAMES, n)
    # ids are unique across kinds so a wrong-kind id is an error, not a silent hit
    ids = [[f"{k[:2]}{rng.randrange(1000, 9999)}{j}" for j in range(n)] for k in kinds]
    links = [{ids[i][j]: rng.choice(ids[i + 1]) for j in range(n)} for i in range(depth)]
    values = {i: rng.randrange(1, 500) for i in ids[-1]}
    first = dict(zip(names, ids[0], strict=True))

    def find(state: dict, name: str) -> str:
        if name not in first:
            raise ToolError(f"no {kinds[0]} named {name!r}")
        return first[name]

    def link(i: int) -> Callable[..., str]:
        def follow(state: dict, id: str) -> str:
            if id not in links[i]:
                raise ToolError(f"no {kinds[i]} with id {id!r}")
            return links[i][id]

        return follow

    def value(state: dict, id: str) -> int:
        if id not in values:
            raise ToolError(f"no {kinds[-1]} with id {id!r}")
        return values[id]

    def submit(state: dict, answer: int) -> str:
        state["answer"], state["_done"] = answer, True
        return "submitted"

    def id_schema(kind: str) -> dict[str, Any]:
        props = {"id": {"type": "string", "description": f"a {kind} id"}}
        return {"type": "object", "properties": props, "required": ["id"]}

    tools = [
        ToolSpec(
            f"find_{kinds[0]}",
            f"the id of the {kinds[0]} with this name",
            {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "its name"}},
                "required": ["name"],
            },
            find,
        )
    ]
    tools += [
        ToolSpec(
            f"{kinds[i]}_{kinds[i + 1]}",
            f"the id of the {kinds[i + 1]} of a {kinds[i]}",
            id_schema(kinds[i]),
            link(i),
        )
        for i in range(depth)
    ]
    last = kinds[-1]
    tools.append(ToolSpec(f"{last}_{field}", f"the {field} of a {last}", id_schema(last), value))
    tools.append(
        ToolSpec(
            "submit",
            "give the final answer (ends the episode)",
            {
                "type": "object",
                "properties": {"answer": {"type": "integer", "description": "the answer"}},
                "required": ["answer"],
            },
            submit,
        )
    )

    def make_task(task_rng: random.Random) -> tuple[dict, list[ToolCall]]:
        name = task_rng.choice(names)
        chain = [first[name]]
        for i in range(depth):
            chain.append(links[i][chain[-1]])
        calls = [ToolCall(tools[0].name, {"name": name})]
        calls += [ToolCall(tools[i + 1].name, {"id": chain[i]}) for i in range(depth)]
        calls.append(ToolCall(tools[depth + 1].name, {"id": chain[-1]}))
        calls.append(ToolCall("submit", {"answer": values[chain[-1]]}))
        return {"name": name, "answer": values[chain[-1]]}, calls

    path = " -> ".join(kinds)
    return EnvSpec(
        name=f"lookup-{seed}",
        tools=tuple(tools),
        make_task=make_task,
        initial_state=lambda task: {"answer": None},
        prompt=lambda task: (
            f"Records link {path}. What is the {field} of the {kinds[-1]} reached from the "
            f"{kinds[0]} named {task['name']}? Follow the links with the tools, then submit."
        ),
        verify=lambda state, task: float(state.get("answer") == task["answer"]),
        max_steps=2 * (depth + 2) + 2,
    )


def solution_text(calls: list[ToolCall]) -> list[str]:
    """The model turns that make these calls, one call a turn."""
    return [format_tool_call(c.name, c.arguments) for c in calls]
