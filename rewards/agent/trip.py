"""Trip-planning environment: a constraint-satisfaction task checked automatically.

A task: plan a trip of exactly `total_days` through a given set of cities, staying the
required number of days in each, starting in a given city, travelling only by direct
flights between consecutive cities, being in the event city on the event day, and keeping
the hotel bill within budget. Days are consecutive blocks: the first city covers days
1..d1, the next d1+1..d1+d2, and so on.

Tools: `list_cities()`, `get_hotels(city)`, `get_flights(city)`, and `submit(plan)` with a
plan such as [{"city": "Oslo", "days": 3, "hotel": "Fjord Inn"}, ...]. Reward 1 when every
constraint holds, else 0; `violations(task, plan)` names what failed. `generate(seed)`
first draws a plan, then builds the task around it, so every task has a known solution.
`spec` is the same environment in the synthesis format (rewards/agent/spec.py).
"""

from __future__ import annotations

import random

from . import AgentVerifier, Environment, Tool, ToolCall, ToolError
from .spec import EnvSpec, ToolSpec

CITIES = [
    "Oslo",
    "Lisbon",
    "Krakow",
    "Porto",
    "Vienna",
    "Seville",
    "Tallinn",
    "Bruges",
    "Split",
    "Lyon",
    "Ghent",
    "Bergen",
]
HOTEL_WORDS = ["Harbor", "Old Town", "Station", "Garden", "Bridge", "Market"]


def violations(task: dict, plan: object) -> list[str]:
    """Every constraint the plan breaks (empty when the plan is valid)."""
    if not isinstance(plan, list) or not plan:
        return ["plan must be a non-empty list of {city, days, hotel}"]
    stays = []
    for i, stop in enumerate(plan):
        if not isinstance(stop, dict) or set(stop) != {"city", "days", "hotel"}:
            return [f"stop {i} must be an object with exactly city, days, hotel"]
        if type(stop["days"]) is not int or stop["days"] < 1:
            return [f"stop {i}: days must be a positive integer"]
        if not isinstance(stop["city"], str) or not isinstance(stop["hotel"], str):
            return [f"stop {i}: city and hotel must be names"]
        stays.append((stop["city"], stop["days"], stop["hotel"]))
    out = []
    cities = [c for c, _, _ in stays]
    if sum(d for _, d, _ in stays) != task["total_days"]:
        out.append(f"total days must be {task['total_days']}")
    if sorted(cities) != sorted(task["required_days"]):
        out.append(f"must visit exactly {sorted(task['required_days'])}, each once")
    for city, days, hotel in stays:
        if task["required_days"].get(city, days) != days:
            out.append(f"{city}: stay must be {task['required_days'][city]} days")
        if hotel not in task["hotels"].get(city, {}):
            out.append(f"{city}: no hotel named {hotel!r}")
    if cities[0] != task["start"]:
        out.append(f"trip must start in {task['start']}")
    for a, b in zip(cities, cities[1:], strict=False):
        if b not in task["flights"].get(a, []):
            out.append(f"no direct flight {a} -> {b}")
    first_day = 1
    for city, days, _ in stays:
        if city == task["event"]["city"]:
            if not first_day <= task["event"]["day"] < first_day + days:
                out.append(f"must be in {city} on day {task['event']['day']}")
        first_day += days
    cost = sum(task["hotels"].get(c, {}).get(h, 0) * d for c, d, h in stays)
    if cost > task["budget"]:
        out.append(f"hotel cost {cost} exceeds budget {task['budget']}")
    return out


def known_city(task: dict, city: object) -> str:
    """`city` if the task has it, else the ToolError that tells the model where to look."""
    if not isinstance(city, str) or city not in task["hotels"]:
        raise ToolError(f"unknown city {city!r}; call list_cities")
    return city


def hotels_text(task: dict, city: object) -> str:
    hotels = task["hotels"][known_city(task, city)]
    return "; ".join(f"{name}: {price}/night" for name, price in hotels.items())


def flights_text(task: dict, city: object) -> str:
    return ", ".join(task["flights"][known_city(task, city)]) or "none"


def plan_reward(state: dict) -> float:
    """1 when a plan was submitted and breaks no constraint of the state's task, else 0."""
    plan = state.get("plan")
    return float(plan is not None and not violations(state["task"], plan))


class TripEnv(Environment):
    name = "trip"
    max_steps = 30
    tools = {
        "list_cities": Tool("cities you may visit", {}),
        "get_hotels": Tool("hotels in a city with their price per night", {"city": "name"}),
        "get_flights": Tool("cities with a direct flight from a city", {"city": "name"}),
        "submit": Tool("submit the plan [{city, days, hotel}, ...] and end", {"plan": "list"}),
    }

    def reset(self, task: dict) -> str:
        self.task = task
        self.state = {"task": task, "plan": None}
        self.steps, self.done = 0, False
        return self.with_tools(task["prompt"])

    def tool_list_cities(self) -> str:
        return ", ".join(self.task["hotels"])

    def tool_get_hotels(self, city: str) -> str:
        return hotels_text(self.task, city)

    def tool_get_flights(self, city: str) -> str:
        return flights_text(self.task, city)

    def tool_submit(self, plan: list) -> str:
        self.state["plan"] = plan
        self.done = True
        return "submitted"

    def verify(self, final_state: dict) -> float:
        return plan_reward(final_state)

    @staticmethod
    def generate(seed: int) -> tuple[dict, list[dict]]:
        rng = random.Random(seed)
        names = rng.sample(CITIES, 6)
        hotels = {
            c: {f"{w} {c}": rng.randrange(40, 220, 5) for w in rng.sample(HOTEL_WORDS, 3)}
            for c in names
        }
        route = rng.sample(names, rng.randint(3, 4))
        plan = [
            {"city": c, "days": rng.randint(1, 4), "hotel": rng.choice(list(hotels[c]))}
            for c in route
        ]
        edges = {frozenset(p) for p in zip(route, route[1:], strict=False)}
        while len(edges) < 8:  # decoys, so the order still has to be worked out
            edges.add(frozenset(rng.sample(names, 2)))
        flights = {c: sorted(o for e in edges if c in e for o in e if o != c) for c in names}
        first_day, starts = 1, {}
        for stop in plan:
            starts[stop["city"]] = (first_day, first_day + stop["days"] - 1)
            first_day += stop["days"]
        event_city = rng.choice(route[1:])
        event_day = rng.randint(*starts[event_city])
        cost = sum(hotels[s["city"]][s["hotel"]] * s["days"] for s in plan)
        task = {
            "total_days": first_day - 1,
            "required_days": {s["city"]: s["days"] for s in plan},
            "start": route[0],
            "event": {"city": event_city, "day": event_day},
            "budget": cost + rng.randrange(0, 60, 5),
            "hotels": hotels,
            "flights": flights,
        }
        required = ", ".join(f"{c} ({d} days)" for c, d in sorted(task["required_days"].items()))
        task["prompt"] = (
            f"Plan a {task['total_days']}-day trip visiting {required}, each once, starting in "
            f"{task['start']}. Travel only by direct flights between consecutive cities. Be in "
            f"{event_city} on day {event_day} for an event. Hotel budget: {task['budget']} in "
            "total. Submit a list of {city, days, hotel} in travel order."
        )
        return task, plan


verifier = AgentVerifier(TripEnv)


def _spec() -> EnvSpec:
    """The trip planner in the synthesis format (rewards/agent/spec.py): the same tools,
    tasks and verdict as TripEnv."""

    def list_cities(state: dict) -> str:
        return ", ".join(state["task"]["hotels"])

    def get_hotels(state: dict, city: str) -> str:
        return hotels_text(state["task"], city)

    def get_flights(state: dict, city: str) -> str:
        return flights_text(state["task"], city)

    def submit(state: dict, plan: list) -> str:
        state["plan"], state["_done"] = plan, True
        return "submitted"

    def make_task(rng: random.Random) -> tuple[dict, list[ToolCall]]:
        task, plan = TripEnv.generate(rng.randrange(2**31))
        return task, [ToolCall("list_cities", {}), ToolCall("submit", {"plan": plan})]

    def one(name: str, kind: str, description: str) -> dict:
        props = {name: {"type": kind, "description": description}}
        return {"type": "object", "properties": props, "required": [name]}

    return EnvSpec(
        name="trip",
        tools=(
            ToolSpec("list_cities", "cities you may visit", {"type": "object"}, list_cities),
            ToolSpec(
                "get_hotels",
                "hotels in a city with their price per night",
                one("city", "string", "name"),
                get_hotels,
            ),
            ToolSpec(
                "get_flights",
                "cities with a direct flight from a city",
                one("city", "string", "name"),
                get_flights,
            ),
            ToolSpec(
                "submit",
                "submit the plan [{city, days, hotel}, ...] and end",
                one("plan", "array", "list"),
                submit,
            ),
        ),  # fmt: skip
        make_task=make_task,
        initial_state=lambda task: {"task": task, "plan": None},
        prompt=lambda task: task["prompt"],
        verify=lambda state, task: plan_reward(state),
        max_steps=TripEnv.max_steps,
    )


spec = _spec()
