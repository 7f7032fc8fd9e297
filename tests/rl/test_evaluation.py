"""Held-out evaluation (rl/evaluation.py): pass@k, eval sets that never overlap the training
prompts, the metrics of one set, and the `eval` config section's checks."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from rl.config import ConfigError, load_config
from rl.evaluation import (
    EvalConfig,
    EvalSetConfig,
    eval_tasks,
    evaluate_agent_set,
    evaluate_set,
    held_out_prompts,
    pass_at_k,
)
from rl.tasks import Task, TaskStream
from rollout import Sampling
from rollout.trajectory import Trajectory

QUICKSTART = "configs/quickstart.yaml"


def test_pass_at_k_against_hand_computed_cases():
    # n=5 samples, c=2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # pass@4: every 4-subset but the 0 of C(3,4) misses both, so 1.
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(8, 0, 3) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    for n, c, k in itertools.product(range(1, 12), range(0, 12), range(1, 12)):
        if c <= n and k <= n:
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_eval_sets_never_overlap_the_training_prompts(tmp_path):
    """The quickstart's task space is small (200 prompts): its eval set's 64 prompts must be
    missing from the training stream and from the warm start's stream."""
    cfg = load_config(
        QUICKSTART,
        ["eval.sets=[{name: heldout, task: arithmetic, task_kwargs: {max_operand: 9}}]"],
    )
    [s] = cfg.eval.sets
    tasks = eval_tasks(s)
    assert len(tasks) == 64 == len({t.prompt for t in tasks})
    assert [t.prompt for t in eval_tasks(s)] == [t.prompt for t in tasks]  # deterministic
    held = held_out_prompts(cfg.eval)
    for seed in (cfg.data.seed, cfg.data.seed + 10_000):  # training, warm start
        stream = TaskStream("arithmetic", None, seed, {"max_operand": 9}, exclude=held)
        drawn = {t.prompt for t in stream.take(5000)}
        assert not drawn & held
        assert len(drawn) == 200 - 64  # everything else is still trained on
    # Without the exclusion the same stream does draw eval prompts: the check can fail.
    plain = {t.prompt for t in TaskStream("arithmetic", None, 0, {"max_operand": 9}).take(5000)}
    assert plain & held

    # A file of prompts: the training file loses the eval file's prompts.
    rows = [{"prompt": f"{a}+1=", "reference": {"answer": str(a + 1)}} for a in range(10)]
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    held = held_out_prompts(EvalConfig(sets=[EvalSetConfig(name="f", path=str(eval_file))]))
    stream = TaskStream(None, str(train_file), 0, exclude=held)
    assert {t.prompt for t in stream.take(50)} == {r["prompt"] for r in rows[3:]}


def test_an_eval_set_larger_than_its_task_space_is_an_error():
    s = EvalSetConfig(name="big", task="arithmetic", task_kwargs={"max_operand": 2}, size=30)
    with pytest.raises(ValueError, match="only 18 distinct prompts"):
        eval_tasks(s)


def test_training_on_nothing_but_eval_prompts_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"{a}+1=", "reference": {"answer": str(a + 1)}} for a in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from rl.preflight import preflight

    cfg = load_config(
        None,
        [
            "data.task=null",
            "data.path=d.jsonl",
            "eval.sets=[{name: same, path: d.jsonl}]",
        ],
    )
    with pytest.raises(ConfigError, match="every prompt is in an eval set"):
        preflight(cfg)


def _traj(prompt_index, response, temperature):
    return Trajectory(
        prompt_ids=[0],
        response_ids=list(response),
        logprobs=np.zeros(len(response), np.float32),
        routing=np.zeros((len(response), 1, 2), np.uint8),
        kept_ids=[np.zeros(0, np.int32)] * len(response),
        sampling=Sampling(temperature=temperature),
        finish_reason="stop",
        engine="scripted",
        weight_version=0,
        prompt_index=prompt_index,
    )


def test_one_sets_metrics_greedy_and_sampled():
    """Two prompts; greedy answers the first right; of 4 samples, prompt 0 has 3 right and
    prompt 1 has 1 right. The score of a response is 1.0 when its first token is 1."""
    tasks = [Task("a", {"answer": "1"}), Task("b", {"answer": "1"})]
    right = {0: [1, 1, 1, 0], 1: [0, 0, 1, 0]}
    calls = []

    def generate(prompts, sampling, n):
        calls.append((sampling.temperature, sampling.seed, n))
        if n == 1:
            return [_traj(0, [1, 5], 0.0), _traj(1, [0], 0.0)]
        return [_traj(p, [right[p][i], 7, 7], 1.0) for p in (0, 1) for i in range(n)]

    def score(samples):
        out = []
        for s in samples:
            ok = float(s.response.startswith("1"))
            out.append({"reward": ok, "subscores": {"math": ok}, "failure": None})
        return out

    cfg = EvalConfig(sets=[EvalSetConfig(name="x", task="arithmetic")], samples=4, pass_k=[1, 2])
    r = evaluate_set(
        tasks, generate, score, ["math"], lambda p: [0], lambda ids: "".join(map(str, ids)),
        cfg, Sampling(temperature=1.0, top_k=20), seed=123,
    )  # fmt: skip
    m = r.metrics
    assert calls == [(0.0, None, 1), (1.0, 123, 4)]
    assert m["greedy/accuracy"] == m["greedy/reward_mean"] == 0.5
    assert m["greedy/response_length"] == 1.5
    assert m["sampled/accuracy"] == m["sampled/accuracy/math"] == 0.5
    assert m["sampled/pass_at_1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    # pass@2: prompt 0: 1 - C(1,2)/C(4,2) = 1; prompt 1: 1 - C(3,2)/C(4,2) = 1/2
    assert m["sampled/pass_at_2"] == pytest.approx((1 + 0.5) / 2)
    assert m["sampled/response_length"] == 3 and m["sampled/verifier_failures"] == 0
    assert len(r.trajectories) == len(r.scores) == 2 + 8


def test_the_eval_sections_checks_are_one_line():
    base = ["eval.sets=[{name: h, task: arithmetic}]", "eval.every=0", "eval.samples=0"]
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.sets\[0\].tsk'"):
        load_config(QUICKSTART, ["eval.sets=[{name: h, tsk: arithmetic}]"])
    with pytest.raises(ConfigError, match="pass_k"):
        load_config(QUICKSTART, [*base, "eval.samples=4", "eval.pass_k=[1, 8]"])
    with pytest.raises(ConfigError, match="share a name"):
        load_config(
            QUICKSTART, ["eval.sets=[{name: h, task: arithmetic}, {name: h, task: digit_sum}]"]
        )
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        load_config(QUICKSTART, [*base, "eval.greedy=false"])
    with pytest.raises(ConfigError, match="eval.sets.h..verifiers"):
        load_config(
            QUICKSTART, ["eval.sets=[{name: h, task: arithmetic, verifiers: [{name: nope}]}]"]
        )
    cfg = load_config(QUICKSTART, [*base[:1], "eval.every=20"])
    assert [n for n in range(61) if cfg.eval.due(n, 60)] == [0, 20, 40, 60]
    cfg = load_config(QUICKSTART, base)
    assert [n for n in range(61) if cfg.eval.due(n, 60)] == [0, 60]
    assert not load_config(QUICKSTART, ["eval.sets=[]"]).eval.due(0, 60)  # no sets: never


def test_keeprl_eval_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    from rl.cli import main as cli

    monkeypatch.chdir(tmp_path)
    policy = tmp_path / "weights"
    policy.mkdir()
    (tmp_path / "empty").mkdir()
    (policy / "config.json").write_text("{}")
    root = __file__.rsplit("/tests/", 1)[0]
    quickstart = f"{root}/{QUICKSTART}"
    cases = [
        ([str(policy)], "not a run directory; give the experiment's --config"),
        ([str(policy), "eval.sets=[]", "--config", quickstart], "no eval.sets"),
        (
            [str(policy), "eval.sets=[{name: f, path: nope.jsonl}]", "--config", quickstart],
            "eval.sets[f]",
        ),
        ([str(tmp_path / "empty"), "--config", quickstart], "neither a run, a checkpoint nor a"),
        ([str(policy), "--config", quickstart, "--step", "3"], "--step picks a checkpoint"),
    ]
    for args, message in cases:
        assert cli(["eval", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


AGENT_QUICKSTART = "configs/agent-quickstart.yaml"
TREASURE = "rewards.agent.treasure:spec"


def test_agent_eval_sets_hold_their_tasks_out_of_training_and_the_warm_start(monkeypatch):
    """treasure has 36 tasks (box x gem, one prompt for all: the key is the task itself); an
    environment set holds 8 out. The run's task draws and the warm start's demonstrations
    never meet them; the same draws without the exclusion do."""
    import torch

    from policy import Transformer, preset
    from rewards.agent.treasure import spec
    from rl import agent_sft
    from rl.evaluation import agent_eval_tasks, agent_task_key
    from rl.trainer import _agent_task

    s = EvalSetConfig(name="h", environment=TREASURE, size=8)
    pairs = agent_eval_tasks(s, 64)
    held = held_out_prompts(EvalConfig(sets=[s]), 64)
    assert len(pairs) == 8 and held == {agent_task_key(sp, t) for sp, t in pairs}
    cfg = load_config(AGENT_QUICKSTART)
    drawn = {agent_task_key(spec, _agent_task(cfg, spec, k, held)) for k in range(400)}
    assert len(drawn) == 36 - 8 and not drawn & held
    plain = {agent_task_key(spec, _agent_task(cfg, spec, k, frozenset())) for k in range(400)}
    assert len(plain) == 36 and plain & held
    assert _agent_task(cfg, spec, 0, frozenset()) == spec.generate(int(_seed0(cfg)))[0]

    shown = []

    def record(sp, seed, tok, template=None):
        shown.append(agent_task_key(sp, sp.generate(seed)[0]))
        return [1, 2, 3], [False, True, True]

    monkeypatch.setattr(agent_sft, "solution_sequence", record)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64, index_topk=8))
    for exclude in (held, frozenset()):
        shown.clear()
        agent_sft.train_agent_sft(
            model, spec, None, steps=20, batch_size=8, lr=0.0, exclude=exclude
        )
        assert len(shown) == 160 and bool(set(shown) & held) == (not exclude)


def _seed0(cfg):
    from rl.trainer import _seed

    return _seed(cfg, 0)


class _Episode:
    """What evaluate_agent_set reads of a finished rollout.episode.Episode."""

    def __init__(self, reward, generated, turns, end="done"):
        self.reward, self.num_turns, self.end_reason = reward, turns, end
        self.segments = [type("S", (), {"loss_mask": [False] * 3 + [True] * generated})()]
        self.generated = generated

    def to_trajectories(self, sampling, engine):
        return [_traj(0, [5] * (self.generated + 2), sampling.temperature)]


def test_one_agent_sets_metrics_greedy_and_sampled():
    """Two tasks; greedy solves the first; of 3 episodes each, task 0 solves 2 and task 1
    none, one of its episodes ending in the environment's own error before its first turn."""
    pairs = [(_Spec(), {"t": 0}), (_Spec(), {"t": 1})]
    calls = []

    def episodes(envs, tasks, sampling):
        calls.append((sampling.temperature, sampling.seed, [t["t"] for t in tasks]))
        if sampling.temperature == 0.0:
            return [_Episode(1.0, 4, 2), _Episode(0.0, 6, 3)]
        return [
            _Episode(1.0, 4, 2), _Episode(0.0, 2, 1), _Episode(1.0, 4, 2),
            _Episode(0.0, 8, 4), _Episode(0.0, 0, 0, "env_error"), _Episode(0.0, 6, 3),
        ]  # fmt: skip

    cfg = EvalConfig(sets=[EvalSetConfig(name="x", environment=TREASURE)], samples=3)
    cfg = dataclasses.replace(cfg, pass_k=[1, 2])
    r = evaluate_agent_set(
        pairs, episodes, "scripted", cfg, Sampling(temperature=0.7, top_k=20), seed=9
    )
    m = r.metrics
    assert calls == [(0.0, None, [0, 1]), (0.7, 9, [0, 0, 0, 1, 1, 1])]
    assert m["greedy/accuracy"] == m["greedy/reward_mean"] == m["greedy/accuracy/agent"] == 0.5
    assert m["greedy/response_length"] == 5 and m["greedy/turns"] == 2.5
    assert m["sampled/accuracy"] == pytest.approx(2 / 6)
    assert m["sampled/verifier_failures"] == pytest.approx(1 / 6)
    assert m["sampled/pass_at_1"] == pytest.approx((2 / 3 + 0) / 2)
    # pass@2: task 0: 1 - C(1,2)/C(3,2) = 1; task 1: 0
    assert m["sampled/pass_at_2"] == pytest.approx(0.5)
    assert m["sampled/turns"] == pytest.approx(12 / 6)
    # stored: every episode with a turn (the one that failed before its first is counted
    # above, and has nothing to store)
    assert [t.prompt_index for t in r.trajectories] == [0, 1, 0, 0, 0, 1, 1]
    assert len(r.scores) == 7 and all(s["failure"] is None for s in r.scores)


class _Spec:
    def environment(self):
        return object()


def test_agent_runs_take_environment_sets_only():
    agent = ["eval.sets=[{name: h, environment: " + TREASURE + ", size: 8}]"]
    cfg = load_config(AGENT_QUICKSTART, agent)
    assert cfg.eval.sets[0].environment == TREASURE
    with pytest.raises(ConfigError, match=r"eval.sets\[h\]: an agent run .* not a task or path"):
        load_config(AGENT_QUICKSTART, ["eval.sets=[{name: h, task: arithmetic}]"])
    with pytest.raises(ConfigError, match=r"eval.sets\[h\].environment: only agent runs"):
        load_config(QUICKSTART, agent)
    with pytest.raises(ConfigError, match=r"eval.sets\[h\].verifiers: an environment set"):
        load_config(
            AGENT_QUICKSTART,
            ["eval.sets=[{name: h, environment: " + TREASURE + ", verifiers: [{name: math}]}]"],
        )
    with pytest.raises(ConfigError, match="exactly one of task, path or environment"):
        load_config(AGENT_QUICKSTART, ["eval.sets=[{name: h, task: arithmetic, environment: x:y}]"])
    with pytest.raises(ConfigError, match=r"eval.sets\[h\]: .*only 36 distinct tasks"):
        held_out_prompts(EvalConfig(sets=[EvalSetConfig(name="h", environment=TREASURE, size=40)]))
