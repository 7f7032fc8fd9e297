"""A small tool-use environment for the agent quickstart: three dependent calls whose arguments
are words read from the previous tool answer.

Tools: `look()` says which box holds the treasure; `open(box)` opens a box and names the gem
inside (or says it is empty); `submit(gem)` ends the episode. A task hides one gem in one of
six coloured boxes; the solution is look, open the named box, submit the gem found. Each
argument must be read from the answer just before it, which a tiny policy can learn in
minutes on a CPU (unlike copying digits), so the quickstart's reward has room to rise from
its warm start.
"""

from __future__ import annotations

import random

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
)
