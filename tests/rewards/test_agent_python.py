"""The code-execution environment (rewards/agent/python_tool.py): every generated task's
solution verifies when run in the sandbox; hostile or stuck model code gets an observation
and changes nothing on the host; in an episode, code runs sandboxed between turns, and a
machine without the sandbox ends the episode with env_error instead of running code."""

from __future__ import annotations

import numpy as np
import pytest

from rewards import sandbox
from rewards.agent import ToolCall, format_tool_call
from rewards.agent.python_tool import KINDS, spec
from rl.tokenizer import CharTokenizer
from rollout import Sampling
from rollout.chat import TextChatTemplate
from rollout.episode import run_episodes
from rollout.trajectory import Trajectory

TOK = CharTokenizer()


def test_each_kind_of_task_is_solved_by_its_solution_in_the_sandbox():
    seen = set()
    for seed in range(40):
        task, calls = spec.generate(seed)
        if task["kind"] in seen:
            continue
        seen.add(task["kind"])
        env = spec.environment()
        env.reset(task)
        observation, done = env.step(calls[0])
        assert observation == f"exit 0\n{task['answer']}\n" and not done
        assert env.step(calls[1]) == ("submitted", True)
        assert env.verify(env.state) == 1.0
    assert seen == set(KINDS)


def test_hostile_and_stuck_code_gets_an_observation_and_leaves_the_host_alone(tmp_path):
    marker = tmp_path / "written-by-the-model"
    env = spec.environment()
    env.reset(spec.generate(0)[0])
    attacks = {
        "write": f"open({str(marker)!r}, 'w').write('x')",
        "network": "import socket; socket.create_connection(('8.8.8.8', 53), timeout=1)",
        "crash": "raise SystemExit(3)",
    }
    for name, code in attacks.items():
        observation, done = env.step(ToolCall("run_python", {"code": code}))
        assert observation.startswith("exit ") and not observation.startswith("exit 0"), name
        assert not done
    assert not marker.exists()
    observation, _ = env.step(ToolCall("run_python", {"code": "while True: pass"}))
    assert observation.startswith("error: timed out")
    observation, _ = env.step(ToolCall("run_python", {"code": "  "}))
    assert observation == "error: run_python needs some code"


class Scripted:
    """Answers each turn with the next scripted text, then EOS."""

    name, weight_version = "scripted", 0

    def __init__(self, turns):
        self.turns = list(turns)

    def generate(self, prompts, sampling, n=1):
        [prompt] = prompts
        ids = [*TOK.encode(self.turns.pop(0)), TOK.eos_id]
        return [
            Trajectory(
                prompt_ids=list(prompt),
                response_ids=ids,
                logprobs=np.zeros(len(ids), np.float32),
                routing=np.zeros((len(prompt) + len(ids) - 1, 1, 2), np.uint8),
                kept_ids=[np.zeros(0, np.int32)] * len(ids),
                sampling=sampling,
                finish_reason="stop",
                engine=self.name,
                weight_version=0,
            )  # fmt: skip
        ]


def _episode(turns, **kwargs):
    task, _ = spec.generate(3)
    [ep] = run_episodes(
        Scripted(turns), [spec.environment()], [task], TOK, Sampling(max_tokens=400),
        template=TextChatTemplate(), token_budget=4096, **kwargs,
    )  # fmt: skip
    return task, ep


def test_an_episode_runs_the_models_code_and_sees_its_output():
    task, calls = spec.generate(3)
    turns = [
        format_tool_call("run_python", {"code": "while True: pass"}),  # times out, goes on
        format_tool_call("run_python", calls[0].arguments),
        format_tool_call("submit", calls[1].arguments),
    ]
    task, ep = _episode(turns)
    assert (ep.end_reason, ep.reward, ep.num_turns) == ("done", 1.0, 3)
    text = TOK.decode(ep.token_ids)
    assert "<tool>error: timed out after 5 s<assistant>" in text
    assert f"<tool>exit 0 / {task['answer']}<assistant>" in text


def test_without_the_sandbox_the_episode_ends_instead_of_running_code(monkeypatch):
    def unavailable(*args, **kwargs):
        raise sandbox.SandboxUnavailable("no namespaces here")

    monkeypatch.setattr(sandbox, "run_python", unavailable)
    _, ep = _episode([format_tool_call("run_python", {"code": "print(1)"})])
    assert (ep.end_reason, ep.reward) == ("env_error", 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_solutions_render_for_the_warm_start(seed):
    from rl.agent_sft import solution_sequence

    ids, mask = solution_sequence(spec, seed, TOK)
    assert sum(mask) > 0 and len(ids) == len(mask)
