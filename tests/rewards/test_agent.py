"""Agent environments: scripted correct trajectories earn 1, wrong ones 0, malformed tool
calls get a clear observation and never an exception."""

import copy

import pytest

import rewards
from rewards import Sample
from rewards.agent import (
    AgentVerifier,
    ToolCall,
    ToolCallError,
    find_tool_calls,
    format_tool_call,
    parse_tool_call,
    run_episode,
)
from rewards.agent.calculator import CalculatorEnv, evaluate
from rewards.agent.trip import TripEnv, violations

SEEDS = range(25)


def scripted(turns):
    """A policy that plays back fixed model turns, whatever it observes."""
    queue = list(turns)
    return lambda observation: queue.pop(0) if queue else "I am done."


def score(name, task, transcript):
    return rewards.get(name).score(Sample("", transcript, {"task": task}))


# --- tool-call format --------------------------------------------------------------------


def test_parse_round_trip():
    text = "thinking...\n" + format_tool_call("calculate", {"expression": "1+2"})
    assert parse_tool_call(text) == ToolCall("calculate", {"expression": "1+2"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no call at all", "no tool call found"),
        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
        ('<tool_call>["calculate"]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'needs a string "name"'),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '"arguments" must be'),
        ('<tool_call>{"name": "f", "args": {}}</tool_call>', "unexpected key"),
        ('<tool_call>{"name": "f", "arguments": {}}', "not closed"),
        (format_tool_call("a", {}) + format_tool_call("b", {}), "one tool call per turn"),
    ],
)
def test_malformed_calls_become_observations(text, message):
    call = parse_tool_call(text)
    assert isinstance(call, ToolCallError) and message in call.message
    env = CalculatorEnv()
    task, _ = CalculatorEnv.generate(0)
    env.reset(task)
    observation, done = env.step(text)
    assert message in observation and not done


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (format_tool_call("sqrt", {"x": 4}), "unknown tool 'sqrt'; available: calculate, submit"),
        (format_tool_call("calculate", {}), "missing ['expression']"),
        (format_tool_call("calculate", {"expression": "1", "x": 2}), "unexpected ['x']"),
        (format_tool_call("calculate", {"expression": "__import__('os')"}), "unsupported"),
        (format_tool_call("calculate", {"expression": "1/0"}), "division by zero"),
        (format_tool_call("calculate", {"expression": "9**9**9"}), "exponent"),
        (format_tool_call("calculate", {"expression": "(10**60)**7"}), "too large"),
        (format_tool_call("calculate", {"expression": ["1"]}), "must be a string"),
    ],
)
def test_bad_calculator_calls(call, message):
    env = CalculatorEnv()
    env.reset(CalculatorEnv.generate(1)[0])
    observation, done = env.step(call)
    assert observation.startswith("error") and message in observation and not done


def test_bad_trip_calls_never_raise():
    env = TripEnv()
    env.reset(TripEnv.generate(3)[0])
    for args in ({"city": "Atlantis"}, {"city": ["Oslo"]}, {"city": {"a": 1}}):
        observation, done = env.step(format_tool_call("get_hotels", args))
        assert observation.startswith("error") and not done


def test_step_limit_and_after_the_end():
    env = CalculatorEnv()
    env.reset(CalculatorEnv.generate(2)[0])
    for _ in range(env.max_steps - 1):
        assert env.step("nonsense")[1] is False
    observation, done = env.step("nonsense")
    assert done and "step limit" in observation
    assert env.step(format_tool_call("submit", {"answer": "1"})) == (
        "error: the episode is over",
        True,
    )


# --- calculator --------------------------------------------------------------------------


def test_safe_evaluator():
    assert evaluate("(1 + 2) * 3 / 4") == pytest.approx(9 / 4)
    assert str(evaluate("0.1 + 0.2")) == "3/10"  # exact, not binary floating point
    assert evaluate("2^10") == 1024 and evaluate("-(3 % 2)") == -1


@pytest.mark.parametrize("seed", SEEDS)
def test_calculator_scripted_trajectories(seed):
    task, answer = CalculatorEnv.generate(seed)
    assert task == CalculatorEnv.generate(seed)[0]  # seeded: the same task again
    good = run_episode(
        CalculatorEnv(),
        task,
        scripted(
            [
                format_tool_call("calculate", {"expression": task["expression"]}),
                format_tool_call("submit", {"answer": answer}),
            ]
        ),
    )
    assert score("agent:calculator", task, good)["reward"] == 1.0
    wrong = f"{answer} + 1"
    bad = run_episode(
        CalculatorEnv(), task, scripted([format_tool_call("submit", {"answer": wrong})])
    )
    assert score("agent:calculator", task, bad)["reward"] == 0.0
    never = run_episode(CalculatorEnv(), task, scripted(["The answer is " + answer]), max_turns=3)
    assert score("agent:calculator", task, never)["reward"] == 0.0  # never submitted


def test_calculator_equivalent_forms_accepted():
    task = {"prompt": "7/2?", "expression": "7/2", "answer": "7/2"}
    for form in ("7/2", "3.5", "14/4", "(3 + 1/2)"):
        transcript = format_tool_call("submit", {"answer": form})
        assert score("agent:calculator", task, transcript)["reward"] == 1.0


def test_replay_counts_malformed_calls():
    task, answer = CalculatorEnv.generate(5)
    transcript = "<tool_call>{oops}</tool_call>\n" + format_tool_call("submit", {"answer": answer})
    result = AgentVerifier(CalculatorEnv).score(Sample("", transcript, {"task": task}))
    assert result == {"reward": 1.0, "steps": 2.0, "malformed_calls": 1.0}
    assert len(find_tool_calls(transcript)) == 2


# --- trip planning -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_trip_generator_solutions_verify(seed):
    task, plan = TripEnv.generate(seed)
    assert violations(task, plan) == []
    assert task == TripEnv.generate(seed)[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_trip_scripted_trajectories(seed):
    task, plan = TripEnv.generate(seed)
    turns = [
        format_tool_call("list_cities", {}),
        format_tool_call("get_flights", {"city": task["start"]}),
        format_tool_call("get_hotels", {"city": plan[0]["city"]}),
        format_tool_call("submit", {"plan": plan}),
    ]
    good = run_episode(TripEnv(), task, scripted(turns))
    assert "submitted" in good
    assert score("agent:trip", task, good)["reward"] == 1.0
    for broken in _broken_plans(task, plan):
        assert violations(task, broken), broken
        bad = format_tool_call("submit", {"plan": broken})
        assert score("agent:trip", task, bad)["reward"] == 0.0


def _broken_plans(task, plan):
    """Plans that each break at least one constraint."""
    longer = copy.deepcopy(plan)
    longer[0]["days"] += 1
    no_hotel = copy.deepcopy(plan)
    no_hotel[-1]["hotel"] = "Nowhere Inn"
    pricey = copy.deepcopy(plan)
    for stop in pricey:
        stop["hotel"] = max(task["hotels"][stop["city"]], key=task["hotels"][stop["city"]].get)
    pricey[0]["days"] += 40  # also breaks the day count; the budget breaks regardless
    reversed_plan = list(reversed(copy.deepcopy(plan)))  # wrong start city
    dropped = copy.deepcopy(plan[:-1])
    return [longer, no_hotel, pricey, reversed_plan, dropped, [], "Oslo", [{"city": "Oslo"}]]


def test_trip_tools_answer_from_the_task():
    task, plan = TripEnv.generate(11)
    env = TripEnv()
    assert task["prompt"] in env.reset(task)
    hotels, _ = env.step(format_tool_call("get_hotels", {"city": plan[0]["city"]}))
    assert plan[0]["hotel"] in hotels
    flights, _ = env.step(format_tool_call("get_flights", {"city": plan[0]["city"]}))
    assert plan[1]["city"] in flights


def test_agent_verifier_does_not_apply_without_task():
    assert rewards.get("agent:trip").score(Sample("", "x", {"answer": "1"})) is None
