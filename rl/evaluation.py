"""Held-out evaluation: named eval sets scored on the rollout workers between training steps,
and on demand (`keeprl eval`).

An eval set is a built-in task with its own seed, or a JSONL/Parquet file of prompts with
references (rl.tasks), scored by the run's verifiers or its own; in an agent run, an
environment's tasks drawn with a seed of the set's own, run as episodes and judged by the
environment. Its prompts are removed from the training stream and from the warm start
(`held_out_prompts`), so an eval set never measures prompts the policy was trained on. Each
evaluation samples every prompt greedily and/or `samples` times at a temperature with a fixed
seed (the same draw at every step, so steps differ by the policy only), and reports per set
and mode (`greedy`, `sampled`):

    eval/<set>/<mode>/reward_mean, accuracy, accuracy/<verifier>, response_length,
    verifier_failures, and for `sampled` pass_at_<k> (pass@k; MLflow names allow no "@") for
    each k of `pass_k`; an agent set's add turns, and count an episode (its generated tokens
    the response length, an environment's own failure the verifier failure) as one sample

pass@k is the unbiased estimator from n samples of which c are correct (a sample is correct
when the set's first verifier gives it 1.0, as `accuracy` counts):
pass@k = 1 - C(n - c, k) / C(n, k), averaged over the set's prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.trajectory import Sampling, Trajectory

from .run_dir import RunDir
from .tasks import TASKS, Task, load_file

MODES = ("greedy", "sampled")


@dataclass(frozen=True, kw_only=True)
class EvalSetConfig:
    """One held-out eval set (an entry of `eval.sets`)."""

    name: str  # the metrics' eval/<name>/... prefix and the stored samples' folder
    task: str | None = None  # a built-in task generator (rl.tasks.TASKS) ...
    path: str | None = None  # ... or a JSONL / Parquet file of {prompt, reference} ...
    # ... or, in an agent run, an environment spec or family (module:attr, as
    # agent.environment; a family's first agent.environments members): `size` tasks
    environment: str | None = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # the generator's arguments
    seed: int = 1  # the generator's seed (the training stream's is data.seed)
    size: int = 64  # distinct prompts in the set (a file: its first `size`; 0: all of it)
    # {name, weight, label, kwargs} entries as rewards.verifiers; null: the run's verifiers
    verifiers: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty name without '/', got {self.name!r}")
        if sum(x is not None for x in (self.task, self.path, self.environment)) != 1:
            raise ValueError(f"{self.name}: set exactly one of task, path or environment")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"{self.name}: unknown task {self.task!r}; built-in: {sorted(TASKS)}")
        if self.size < 0 or (self.path is None and self.size == 0):
            raise ValueError(f"{self.name}: size must be >= 1 (0: a whole file), got {self.size}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation during training (the YAML section `eval`; docs/eval.md)."""

    sets: list[EvalSetConfig] = field(default_factory=list)  # the eval sets; none: no eval
    # steps between evaluations; the policy before the first step and after the last is
    # always evaluated, so 0 means only those two
    every: int = 0
    greedy: bool = True  # one greedy response a prompt
    samples: int = 0  # and/or this many sampled responses a prompt (pass@k needs k of them)
    pass_k: list[int] = field(default_factory=lambda: [1])  # the k of pass@k (<= samples)
    # sampling of the `samples` responses; max_tokens and the stop ids apply to greedy too.
    # null: rollout.sampling's
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"sets: two sets share a name: {names}")
        if self.every < 0 or self.samples < 0:
            raise ValueError("every and samples must be >= 0")
        if self.sets and not self.greedy and not self.samples:
            raise ValueError("greedy is false and samples is 0: nothing to evaluate")
        bad = [k for k in self.pass_k if k < 1 or (self.samples and k > self.samples)]
        if self.samples and bad:
            raise ValueError(f"pass_k: each k must be 1 .. samples ({self.samples}), got {bad}")

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the policy after `step` updates is evaluated (0: the initial policy)."""
        if not self.sets:
            return False
        return step in (0, total_steps) or (self.every > 0 and step % self.every == 0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def eval_tasks(s: EvalSetConfig) -> list[Task]:
    """The set's prompts: `size` distinct ones from its generator (in order), or its file's."""
    if s.path is not None:
        seen: dict[str, Task] = {}
        for t in load_file(s.path):
            seen.setdefault(t.prompt, t)
        tasks = list(seen.values())
        return tasks[: s.size] if s.size else tasks
    found: dict[str, Task] = {}
    it = TASKS[s.task](s.seed, **s.task_kwargs)
    for _ in range(1000 * s.size):  # a task space smaller than the set ends the search
        t = next(it)
        found.setdefault(t.prompt, t)
        if len(found) == s.size:
            return list(found.values())
    raise ValueError(
        f"eval set {s.name!r}: task {s.task!r} with {s.task_kwargs} gave only {len(found)} "
        f"distinct prompts, fewer than size {s.size}"
    )


def agent_task_key(spec: Any, task: dict) -> str:
    """What identifies an agent task: its environment and the task itself, hidden state
    included (tasks with one prompt differ in what their tools answer, as treasure's do)."""
    return f"{spec.name}\n{json.dumps(task, sort_keys=True, default=repr)}"


def _draw_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def agent_eval_tasks(s: EvalSetConfig, environments: int) -> list[tuple[Any, dict]]:
    """An environment set's (spec, task) pairs: `size` tasks with distinct keys, drawn with
    seeds of the set's own (a family's members in turn)."""
    from rewards.agent.spec import EnvSpec, load_env

    source = load_env(s.environment)
    found: dict[str, tuple[Any, dict]] = {}
    for i in range(1000 * s.size):  # a task space smaller than the set ends the search
        spec = source if isinstance(source, EnvSpec) else source(i % environments)
        task, _ = spec.generate(_draw_seed("eval", s.seed, i))
        found.setdefault(agent_task_key(spec, task), (spec, task))
        if len(found) == s.size:
            return list(found.values())
    raise ValueError(
        f"eval set {s.name!r}: environment {s.environment!r} gave only {len(found)} distinct "
        f"tasks, fewer than size {s.size}"
    )


def held_out_prompts(cfg: EvalConfig, environments: int = 64) -> frozenset[str]:
    """Every eval set's prompts (an environment set's: agent_task_key of its tasks, from a
    family's first `environments` members): the training stream and the warm start skip
    them. A set that cannot be read (a missing file or environment, an unknown task argument,
    a task space smaller than the set) is a ConfigError naming it."""
    from .config import ConfigError

    prompts: set[str] = set()
    for s in cfg.sets:
        try:
            if s.environment is not None:
                pairs = agent_eval_tasks(s, environments)
                prompts |= {agent_task_key(spec, task) for spec, task in pairs}
            else:
                prompts |= {t.prompt for t in eval_tasks(s)}
        except FileNotFoundError:
            raise ConfigError(f"eval.sets[{s.name}].path: {s.path}: no such file") from None
        except (ImportError, AttributeError, OSError, TypeError, ValueError) as e:
            raise ConfigError(f"eval.sets[{s.name}]: {e}") from None
    return frozenset(prompts)


def eval_seed(trainer_seed: int, name: str) -> int:
    """The sampled mode's seed of one set: fixed across steps (a step differs by the policy
    only) and across `keeprl eval` reruns."""
    digest = hashlib.sha256(f"eval:{trainer_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class SetResult:
    """One set's evaluation: its metrics (without the eval/<set>/ prefix) and its samples."""

    metrics: dict[str, float]
    trajectories: list[Trajectory]
    scores: list[dict]


def evaluate_set(
    tasks: Sequence[Task],
    generate: Callable[[list[list[int]], Sampling, int], list[Trajectory]],
    score: Callable[[list[Any]], list[dict]],
    labels: Sequence[str],
    prompt_ids: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    cfg: EvalConfig,
    sampling: Sampling,
    seed: int,
) -> SetResult:
    """Evaluate one set: generate (greedy and/or sampled), score, and aggregate.

    generate(prompt_ids, sampling, n) -> trajectories with prompt_index (the rollout pool's
    generate); score(samples) -> [{reward, subscores, failure}] (a RewardService's);
    `sampling`: the sampled mode's (its max_tokens and stop ids serve greedy too).
    """
    import rewards as rewards_pkg

    prompts = [prompt_ids(t.prompt) for t in tasks]
    metrics: dict[str, float] = {}
    all_trajs: list[Trajectory] = []
    all_scores: list[dict] = []
    for mode, s, n in _modes(cfg, sampling, seed):
        trajs = generate(prompts, s, n)
        samples = [
            rewards_pkg.Sample(
                tasks[t.prompt_index].prompt,
                decode(t.response_ids),
                tasks[t.prompt_index].reference,
                tasks[t.prompt_index].metadata,
            )
            for t in trajs
        ]
        scores = score(samples)
        lengths = [len(t.response_ids) for t in trajs]
        stats = reward_stats(scores, lengths, labels)
        if mode == "sampled":
            correct = [0] * len(tasks)
            for t, sc in zip(trajs, scores, strict=True):
                correct[t.prompt_index] += _correct(sc, labels[0])
            for k in cfg.pass_k:
                stats[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(tasks)
        metrics.update({f"{mode}/{k}": v for k, v in stats.items()})
        all_trajs += trajs
        all_scores += scores
    return SetResult(metrics, all_trajs, all_scores)


def evaluate_agent_set(
    pairs: Sequence[tuple[Any, dict]],
    episodes: Callable[[list[Any], list[dict], Sampling], list[Any]],
    engine: str,
    cfg: EvalConfig,
    sampling: Sampling,
    seed: int,
) -> SetResult:
    """Evaluate one environment set: its tasks as episodes (greedy and/or `samples` each),
    the environment's verdict the reward, correct at 1.0.

    episodes(envs, tasks, sampling) -> finished Episodes (rollout.episode.run_episodes on the
    rollout pool); `engine`: the pool's name, stored with the trajectories.
    """
    metrics: dict[str, float] = {}
    all_trajs: list[Trajectory] = []
    all_scores: list[dict] = []
    for mode, s, n in _modes(cfg, sampling, seed):
        index = [i for i in range(len(pairs)) for _ in range(n)]
        eps = episodes([pairs[i][0].environment() for i in index], [pairs[i][1] for i in index], s)
        correct = [0] * len(pairs)
        rewards, tokens, turns, failures = [], [], [], []
        for i, ep in zip(index, eps, strict=True):
            reward = float(ep.reward or 0.0)
            # the environment is the verifier: only its own failures are verifier failures
            failure = ep.end_reason if ep.end_reason in ("env_error", "env_timeout") else None
            correct[i] += reward >= 1.0
            rewards.append(reward)
            tokens.append(sum(sum(seg.loss_mask) for seg in ep.segments))
            turns.append(ep.num_turns)
            failures.append(failure is not None)
            # stored: its segments (one whose first prompt already passed the token budget
            # has no turn to store; it counts as a failed episode all the same)
            for t in ep.to_trajectories(s, engine) if ep.num_turns > 0 else ():
                t.prompt_index = i
                all_trajs.append(t)
                all_scores.append(
                    {"reward": reward, "subscores": {"agent": reward}, "failure": failure}
                )
        accuracy = sum(r >= 1.0 for r in rewards) / len(rewards)
        stats = {
            "reward_mean": sum(rewards) / len(rewards),
            "accuracy": accuracy,
            "accuracy/agent": accuracy,
            "response_length": sum(tokens) / len(tokens),
            "turns": sum(turns) / len(turns),
            "verifier_failures": sum(failures) / len(failures),
        }
        if mode == "sampled":
            for k in cfg.pass_k:
                stats[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(pairs)
        metrics.update({f"{mode}/{k}": v for k, v in stats.items()})
    return SetResult(metrics, all_trajs, all_scores)


def _modes(cfg: EvalConfig, sampling: Sampling, seed: int) -> list[tuple[str, Sampling, int]]:
    """(mode, its sampling, responses a prompt): greedy once, sampled `samples` times."""
    modes: list[tuple[str, Sampling, int]] = []
    if cfg.greedy:
        greedy = dataclasses.replace(sampling, temperature=0.0, top_k=0, top_p=1.0, seed=None)
        modes.append(("greedy", greedy, 1))
    if cfg.samples:
        modes.append(("sampled", dataclasses.replace(sampling, seed=seed), cfg.samples))
    return modes


def _correct(score: dict, label: str) -> bool:
    own = score["subscores"].get(label)
    return own is not None and own >= 1.0


def reward_stats(scores: list[dict], lengths: list[int], labels: Sequence[str]) -> dict[str, float]:
    """Metrics of a list of scores. Accuracy is per verifier: `accuracy/<label>` is the
    fraction of the samples that verifier applied to where its own reward reached 1.0;
    `accuracy` is the first verifier's (a weighted second verifier no longer pulls it to 0)."""
    rewards = [s["reward"] for s in scores]
    out = {
        "reward_mean": sum(rewards) / len(rewards),
        "response_length": sum(lengths) / len(lengths),
        "verifier_failures": sum(s["failure"] is not None for s in scores) / len(scores),
    }
    for label in labels:
        own = [s["subscores"][label] for s in scores if s["subscores"].get(label) is not None]
        out[f"accuracy/{label}"] = sum(r >= 1.0 for r in own) / len(own) if own else 0.0
    out["accuracy"] = out[f"accuracy/{labels[0]}"]
    keys = {k for s in scores for k in s["subscores"]}
    for k in sorted(keys):
        vals = [s["subscores"][k] for s in scores if s["subscores"].get(k) is not None]
        if vals:
            out[f"reward/{k}"] = sum(vals) / len(vals)
    return out


def eval_sampling(cfg: Any, eos_id: int) -> Sampling:
    """The sampled mode's sampling (eval.sampling, else rollout.sampling), stopping at EOS as
    training rollouts do; its seed is set per set (eval_seed)."""
    s = cfg.eval.sampling or cfg.rollout.sampling
    stops = s.stop_token_ids
    return dataclasses.replace(
        s, seed=None, stop_token_ids=stops if eos_id in stops else (*stops, eos_id)
    )


class Evaluator:
    """The eval sets of one experiment, evaluated on a rollout pool (the run's, between steps,
    or `keeprl eval`'s own) and scored by reward workers (the run's verifiers, or a set's)."""

    def __init__(self, cfg: Any, tok: Any, scorer: Any) -> None:
        from .trainer import RewardService

        self.cfg, self.tok = cfg, tok
        self.sets = []
        self.template = None
        if cfg.agent.environment:  # environment sets: episodes, as the run's own
            from .trainer import agent_template

            self.template = agent_template(cfg, tok)
        for s in cfg.eval.sets:
            if s.environment is not None:
                self.sets.append((s, agent_eval_tasks(s, cfg.agent.environments), None))
                continue
            service = scorer
            if s.verifiers is not None:
                service = RewardService(dataclasses.replace(cfg.rewards, verifiers=s.verifiers))
            self.sets.append((s, eval_tasks(s), service))
        self.sampling = eval_sampling(cfg, tok.eos_id)
        # episodes sample as the run's training episodes do (their turns' own stops)
        self.agent_sampling = dataclasses.replace(
            cfg.eval.sampling or cfg.rollout.sampling, seed=None
        )
        mode = "greedy" if cfg.eval.greedy else "sampled"
        self.headline = f"eval/{cfg.eval.sets[0].name}/{mode}/accuracy"  # one metric it logs

    def run(self, pool: Any, step: int) -> dict[str, SetResult]:
        """Evaluate the weights the pool holds (the policy after `step` updates)."""
        out = {}
        for s, tasks, service in self.sets:
            seed = eval_seed(self.cfg.trainer.seed, s.name)
            if s.environment is not None:
                out[s.name] = evaluate_agent_set(
                    tasks, self._episodes(pool), pool.name, self.cfg.eval, self.agent_sampling,
                    seed,
                )  # fmt: skip
                continue
            out[s.name] = evaluate_set(
                tasks, pool.generate, service.score, service.labels, self.tok.prompt_ids,
                self.tok.decode, self.cfg.eval, self.sampling, seed,
            )  # fmt: skip
            for t in out[s.name].trajectories:  # stored, so keeprl inspect shows the reference
                RunDir.attach_reference(t, tasks[t.prompt_index].reference)
        return out

    def _episodes(self, pool: Any) -> Callable[[list[Any], list[dict], Sampling], list[Any]]:
        """Episodes on the pool with the run's agent settings (rl.trainer._agent_rollout's)."""
        from rollout.episode import run_episodes

        a = self.cfg.agent

        def run(envs: list[Any], tasks: list[dict], sampling: Sampling) -> list[Any]:
            return run_episodes(
                pool, envs, tasks, self.tok, sampling, template=self.template,
                max_turns=a.max_turns, token_budget=a.token_budget,
                step_timeout_s=a.step_timeout_s,
                overflow=None if a.overflow == "none" else a.overflow,
            )  # fmt: skip

        return run


def flat_metrics(results: dict[str, SetResult]) -> dict[str, float]:
    """eval/<set>/<mode>/<metric> for MLflow."""
    return {f"eval/{name}/{k}": v for name, r in results.items() for k, v in r.metrics.items()}


def store_results(eval_dir: Any, step: int, results: dict[str, SetResult]) -> None:
    """Each set's samples as Parquet beside the rollouts: <run>/eval/<set>/step_<N>.parquet,
    N the number of updates the evaluated policy has had (`keeprl inspect --eval SET`)."""
    from rollout.store import RolloutStore

    for name, r in results.items():
        RolloutStore(Path(eval_dir) / name).write_step(
            step,
            r.trajectories,
            rewards=[s["reward"] for s in r.scores],
            subscores=[s["subscores"] for s in r.scores],
            failures=[s["failure"] for s in r.scores],
            overwrite=True,  # a resumed run evaluates that policy again
        )


def summary_table(step: int, results: dict[str, SetResult]) -> str:
    """A fixed-width table of the headline metrics, one row per set and mode."""
    cols = ["accuracy", "reward_mean", "response_length", "verifier_failures"]
    ks = sorted(
        {k for r in results.values() for k in r.metrics if k.startswith("sampled/pass_at_")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    head = ["set", "mode", *cols, *(f"pass@{k.rsplit('_', 1)[1]}" for k in ks)]
    rows = []
    for name, r in results.items():
        for mode in MODES:
            if f"{mode}/accuracy" not in r.metrics:
                continue
            vals = [r.metrics[f"{mode}/{c}"] for c in cols]
            vals += [
                r.metrics.get(k, float("nan")) if mode == "sampled" else float("nan") for k in ks
            ]
            rows.append([name, mode, *(f"{v:.3f}" if v == v else "-" for v in vals)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [f"evaluation of the policy after {step} updates", fmt.format(*head)]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


# --- keeprl eval ---------------------------------------------------------------------------


def _resolve(args: Any) -> tuple[Any, Path, int, Path | None]:
    """(config, policy directory, its weight version, the run directory or None) of `keeprl
    eval`'s source: a run directory (--step N, default its newest checkpoint), a checkpoint
    directory or a policy directory (save_pretrained)."""
    from . import checkpoint as ckpt
    from .config import ConfigError, load_config

    source = Path(args.source)
    run = RunDir(source)
    is_run = run.config.is_file()
    if args.config or is_run:  # (load_config reports a damaged YAML file in one line)
        cfg = load_config(args.config or run.config, args.overrides)
    else:
        raise ConfigError(f"{source} is not a run directory; give the experiment's --config")
    if not cfg.eval.sets:
        raise ConfigError("the config has no eval.sets to evaluate (see docs/eval.md)")
    # a set that cannot be read: one line, before Ray starts
    held_out_prompts(cfg.eval, cfg.agent.environments)
    if not is_run:
        if args.step is not None:
            raise ConfigError("--step picks a checkpoint of a run directory; give the run")
        for policy in (source, source / "policy"):
            if (policy / "config.json").is_file():
                return cfg, policy, _version_of(policy.parent / "state.json"), None
        raise ConfigError(f"{source}: neither a run, a checkpoint nor a policy directory")
    version = args.step
    if version is None:
        last, _ = ckpt.latest_intact(source)
        if last is None:
            raise ConfigError(
                f"{source}: no intact checkpoint; give --step 0 for the initial policy"
            )
        version = _version_of(last / "state.json")
    try:
        return cfg, run.weights(version, cfg.model.checkpoint), version, source
    except FileNotFoundError as e:
        if version == 0 and cfg.warm_start.enabled:  # a cached warm start: the same cache key
            from .tokenizer import load_tokenizer
            from .trainer import initial_policy

            return cfg, initial_policy(cfg, source, load_tokenizer(cfg.model)), 0, source
        raise ConfigError(str(e)) from None


def _version_of(state: Path) -> int:
    """A checkpoint's weight version (its state.json); 0 for a bare policy directory."""
    import json

    return int(json.loads(state.read_text())["weight_version"]) if state.is_file() else 0


def main(args: Any) -> int:
    """`keeprl eval`: evaluate one policy on the config's eval sets, as a run does between
    steps (the same rollout workers, seeds and verifiers), print a table and write JSON."""
    import json
    import logging
    import sys

    import ray

    from rollout.worker import RolloutPool

    from .config import ConfigError
    from .tokenizer import load_tokenizer
    from .trainer import RewardService

    try:
        cfg, policy, version, run = _resolve(args)
    except ConfigError as e:
        print(f"keeprl eval: {e}", file=sys.stderr)
        return 2
    out = Path(args.json) if args.json else (
        run / "eval" / f"report_{version:06d}.json" if run else Path("keeprl-eval.json")
    )  # fmt: skip
    tok = load_tokenizer(cfg.model)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, include_dashboard=False,
            logging_level=logging.WARNING,
        )  # fmt: skip
    pool = None
    try:
        pool = RolloutPool(
            (cfg.rollout.engine, str(policy), cfg.rollout.engine_kwargs),
            cfg.rollout.workers,
            num_cpus=cfg.ray.rollout_cpus,
            num_gpus=cfg.ray.rollout_gpus,
        )
        results = Evaluator(cfg, tok, RewardService(cfg.rewards)).run(pool, version)
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
    print(f"{policy} (weight version {version})")
    print(summary_table(version, results))
    report = {"policy": str(policy), "step": version, "metrics": flat_metrics(results)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
