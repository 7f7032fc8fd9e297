"""A small tool-use environment for the agent quickstart: three dependent calls whose arguments
are words read from the previous tool answer.

Tools: `look()` says which box holds the treasure; `open(box)` opens a box and names the gem
inside (or says it is empty); `submit(gem)` ends the episode. A task hides one gem in one of
six coloured boxes; the solution is look, open the named box, submit the gem found. Each
argument must be read from the answer just before it, which a tiny policy can learn in
minutes on a CPU (unlike copying digits).

The warm start imitates a `Scout`, not the solution: a demonstrator that reads the look answer
only half the time and otherwise opens another box, then submits a guess. The warm-started
policy so learns the whole call format, including what to do after an empty box, but not
that the look answer is worth reading; GRPO has that left to learn, and the agent quickstart's
reward rises as it does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import ToolCall, ToolError
from .spec import EnvSpec, ToolSpec

COLORS = ("red", "blue", "green", "yellow", "white", "black")
GEMS = ("ruby", "pearl", "opal", "jade", "amber", "topaz")


def _look(state: dict) -> str:
    return f"The treasure is in the {state['box']} box."


def _open(state: dict, box: str) -> str:
    if box not in COLORS:
        raise ToolError(f"there is no {box!r} box; the boxes are {', '.join(COLORS)}")
    state["opened"] = box
    return f"You found the {state['gem']}." if box == state["box"] else f"The {box} box is empty."


def _submit(state: dict, gem: str) -> str:
    state["submitted"], state["_done"] = gem, True
    return "submitted"


def _make_task(rng: random.Random) -> tuple[dict, list[ToolCall]]:
    box, gem = rng.choice(COLORS), rng.choice(GEMS)
    calls = [ToolCall("look", {}), ToolCall("open", {"box": box}), ToolCall("submit", {"gem": gem})]
    return {"box": box, "gem": gem}, calls


@dataclass(frozen=True)
class Scout:
    """The warm start's demonstrator: looks, opens the box the answer names with probability
    `read_rate` (another box otherwise), submits the gem found or, after an empty box, a
    guess. Its successes are the solution's calls; its failures are well-formed ones."""

    read_rate: float = 0.5

    def __call__(self, task: dict, rng: random.Random) -> list[ToolCall]:
        box = task["box"]
        if rng.random() >= self.read_rate:
            box = rng.choice([c for c in COLORS if c != task["box"]])
        gem = task["gem"] if box == task["box"] else rng.choice(GEMS)
        return [
            ToolCall("look", {}),
            ToolCall("open", {"box": box}),
            ToolCall("submit", {"gem": gem}),
        ]


def _word(name: str, description: str) -> dict:
    props = {name: {"type": "string", "description": description}}
    return {"type": "object", "properties": props, "required": [name]}


spec = EnvSpec(
    name="treasure",
    tools=(
        ToolSpec("look", "where the treasure is", {"type": "object", "properties": {}}, _look),
        ToolSpec("open", "open a box and see what is inside", _word("box", "a colour"), _open),
        ToolSpec("submit", "submit the gem found and end", _word("gem", "the gem"), _submit),
    ),
    make_task=_make_task,
    initial_state=lambda task: {"box": task["box"], "gem": task["gem"], "submitted": None},
    prompt=lambda task: "Find the treasure and submit its gem.",
    verify=lambda state, task: float(state.get("submitted") == task["gem"]),
    max_steps=6,
    demonstrate=Scout(read_rate=0.5),
)
