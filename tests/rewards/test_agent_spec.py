"""The environment format for synthesis (rewards/agent/spec.py): argument schemas, a family
that makes many distinct environments whose tasks need chains of dependent tool calls, the
runtime never raising on bad calls, and the reward adapter replaying a solved episode."""

from __future__ import annotations

import random

import pytest

from rewards import Sample
from rewards.agent import AgentVerifier, ToolCall
from rewards.agent.spec import (
    load_env,
    lookup_family,
    schema_errors,
    solution_text,
    synthesize,
)

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["id"],
}


def test_argument_schemas():
    assert schema_errors(SCHEMA, {"id": "a", "n": 3}) == []
    assert schema_errors(SCHEMA, {}) == ["missing argument 'id'"]
    assert schema_errors(SCHEMA, {"id": "a", "x": 1}) == ["unexpected argument 'x'"]
    assert schema_errors(SCHEMA, {"id": 5}) == ["argument 'id' must be string, got int"]
    assert schema_errors(SCHEMA, {"id": "a", "n": True}) == [
        "argument 'n' must be integer, got bool"
    ]


def test_a_family_synthesizes_many_distinct_environments():
    envs = synthesize(lookup_family, 200)
    assert len({e.name for e in envs}) == 200
    toolsets = {tuple(t.name for t in e.tools) for e in envs}
    assert len(toolsets) > 150  # its own vocabulary: kinds, links and fields differ


@pytest.mark.parametrize("seed", range(12))
def test_every_task_is_solved_by_its_chain_of_dependent_calls(seed):
    spec = lookup_family(seed)
    task, calls = spec.generate(seed + 100)
    assert len(calls) >= 5  # find, two or three links, the value, submit
    env = spec.environment()
    env.reset(task)
    outputs = []
    for i, call in enumerate(calls):
        observation, done = env.step(call)
        assert not observation.startswith("error"), observation
        assert done == (i == len(calls) - 1)
        outputs.append(observation)
    # Each lookup's argument is the previous lookup's answer: the calls depend on each other.
    for prev, call in zip(outputs[:-2], calls[1:-1], strict=True):
        assert call.arguments["id"] == prev
    assert env.verify(env.state) == 1.0
    wrong = spec.environment()
    wrong.reset(task)
    wrong.step(ToolCall("submit", {"answer": task["answer"] + 1}))
    assert wrong.verify(wrong.state) == 0.0


def test_bad_calls_are_observations_never_errors():
    spec = lookup_family(3)
    env = spec.environment()
    task, calls = spec.generate(0)
    env.reset(task)
    link = calls[1].name
    cases = [
        (ToolCall("no_such_tool", {}), "unknown tool"),
        (ToolCall(link, {}), "missing argument 'id'"),
        (ToolCall(link, {"id": 7}), "must be string"),
        (ToolCall(link, {"id": "nope"}), "no "),
        ("not a call at all", "no tool call found"),
        ('<tool_call>{"name": ', "not closed"),
    ]
    for call, message in cases:
        observation, done = env.step(call)
        assert observation.startswith("error") and message in observation and not done
    done, steps = False, len(cases)
    while not done:
        observation, done = env.step(ToolCall(link, {"id": "nope"}))
        steps += 1
    assert steps == spec.max_steps and "step limit" in observation
    assert env.step(calls[0]) == ("error: the episode is over", True)


def test_the_reward_adapter_replays_a_solved_transcript():
    spec = lookup_family(5)
    task, calls = spec.generate(1)
    transcript = "\n".join(solution_text(calls))
    verifier = AgentVerifier(spec.environment)
    assert verifier.score(Sample("q", transcript, {"task": task}))["reward"] == 1.0
    half = "\n".join(solution_text(calls[:2]))
    assert verifier.score(Sample("q", half, {"task": task}))["reward"] == 0.0


def test_environments_load_by_module_and_attribute():
    assert load_env("rewards.agent.spec:lookup_family") is lookup_family
    with pytest.raises(ValueError, match="expected 'module:attr'"):
        load_env("rewards.agent.spec")
    with pytest.raises(ValueError, match="neither an EnvSpec nor a family"):
        load_env("rewards.agent.spec:_FIELDS")


@pytest.mark.parametrize("path", ["rewards.agent.calculator:spec", "rewards.agent.trip:spec"])
@pytest.mark.parametrize("seed", range(4))
def test_the_ported_environments_solve_their_tasks_in_the_synthesis_format(path, seed):
    """calculator and trip as EnvSpecs: their known solutions earn 1, a wrong submission 0,
    bad arguments are observations, and the verdict is the hand-written environment's."""
    from rewards.agent.calculator import CalculatorEnv
    from rewards.agent.trip import TripEnv

    spec = load_env(path)
    task, calls = spec.generate(seed)
    env = spec.environment()
    env.reset(task)
    for call in calls:
        observation, done = env.step(call)
        assert not observation.startswith("error"), observation
    assert done and env.verify(env.state) == 1.0
    hand = {"calculator": CalculatorEnv, "trip": TripEnv}[spec.name]()
    hand.reset(task)
    for call in calls:
        if call.name in hand.tools:
            hand.step(call)
    assert hand.verify(hand.state) == 1.0
    wrong = spec.environment()
    wrong.reset(task)
    name = calls[0].name if calls[0].arguments else "get_hotels"
    observation, _ = wrong.step(ToolCall(name, {"nope": 1}))
    assert observation.startswith("error") and "unexpected argument 'nope'" in observation
    bad = {"answer": "0.123456"} if spec.name == "calculator" else {"plan": []}
    wrong.step(ToolCall("submit", bad))
    assert wrong.verify(wrong.state) == 0.0


def test_the_treasure_environment_needs_each_answer_for_the_next_call():
    from rewards.agent.treasure import spec as treasure

    for seed in range(5):
        task, calls = treasure.generate(seed)
        env = treasure.environment()
        env.reset(task)
        assert env.step(calls[0])[0] == f"The treasure is in the {task['box']} box."
        assert env.step(calls[1])[0] == f"You found the {task['gem']}."
        assert env.step(calls[2]) == ("submitted", True) and env.verify(env.state) == 1.0
    env = treasure.environment()
    task, _ = treasure.generate(0)
    env.reset(task)
    other = next(c for c in ("red", "blue") if c != task["box"])
    assert env.step(ToolCall("open", {"box": other}))[0] == f"The {other} box is empty."
    assert "no 'purple' box" in env.step(ToolCall("open", {"box": "purple"}))[0]
    env.step(ToolCall("submit", {"gem": "glass"}))
    assert env.verify(env.state) == 0.0


def test_the_treasure_warm_start_imitates_a_scout_that_reads_the_answer_half_the_time():
    """treasure's demonstrator: the same task as generate(seed); well-formed calls that open
    the named box in about half the demonstrations (the solution's calls then) and otherwise
    another box, followed by a guessed gem."""
    from rewards.agent.treasure import COLORS, GEMS, Scout
    from rewards.agent.treasure import spec as treasure

    read = 0
    for seed in range(400):
        task, calls = treasure.demonstration(seed)
        solved, solution = treasure.generate(seed)
        assert task == solved and [c.name for c in calls] == ["look", "open", "submit"]
        box, gem = calls[1].arguments["box"], calls[2].arguments["gem"]
        assert box in COLORS and gem in GEMS
        if box == task["box"]:
            read += 1
            assert calls == solution
    assert 160 <= read <= 240  # Binomial(400, 0.5): 8 standard deviations either side
    assert "read_rate=0.5" in repr(treasure.demonstrate)  # it enters the warm-start cache key
    # A scout that always reads the answer plays the solution.
    task, calls = treasure.generate(3)
    always = Scout(read_rate=1.0)
    assert always(task, random.Random(0)) == calls
