"""`keeprl train`: the GRPO loop over Ray actors.

One step, always in this order: prompts -> rollout workers -> reward worker -> advantages
and learner step (learner actor) -> weight sync to the rollout workers -> Parquet rollouts,
metrics -> checkpoint every `checkpoint.every` steps. A checkpoint records the last completed
step; resuming deletes rollouts logged after it and keeps MLflow to the committed steps
(rl.tracking), so a run killed at any point and resumed neither loses nor duplicates a step.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import rewards as rewards_pkg
from policy import Transformer, load_pretrained, preset, save_pretrained
from rewards.worker import remote_worker
from rollout.store import RolloutStore

from . import checkpoint as ckpt
from .batch import Batch
from .config import ConfigError, ExperimentConfig, RewardConfig, to_dict
from .evaluation import (
    Evaluator,
    agent_task_key,
    flat_metrics,
    held_out_prompts,
    reward_stats,
    store_results,
    summary_table,
)
from .faults import crash_point, mark_process_group
from .learner import Learner, LearnerConfig
from .placement import Placement, reserve
from .preflight import check_resume, learner_config, preflight
from .run_dir import RunDir, RunDirError, RunLock, check_start, clear
from .tasks import TaskStream
from .tokenizer import Tokenizer, load_tokenizer
from .tracking import Tracker
from .warm_start import warm_start
from .weights import WeightVersion, bucket_names, gather_bucket

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LearnerService:
    """The learner as a Ray actor: owns the policy and optimizer; hands out its weights in
    buckets (rl/weights.py)."""

    def __init__(
        self,
        policy_dir: str,
        cfg: LearnerConfig,
        dtype: str,
        device: str,
        state: dict | None = None,
        attention: str = "auto",
        version: int = 0,
    ) -> None:
        self.policy = load_pretrained(policy_dir, device=device, dtype=DTYPES[dtype])
        self.policy.attention = attention
        self.learner = Learner(self.policy, cfg)
        if state is not None:
            self.learner.load_state_dict(state)
        self.versions = WeightVersion(version, cfg.algorithm.updates_per_batch)

    def step(self, batch: Batch) -> dict[str, float]:
        metrics = self.learner.step(batch)
        self.versions.updated()
        return metrics

    def weight_bucket_names(self, bucket_bytes: int, version: int) -> list[list[str]]:
        """The names of each bucket of a sync of `version` (checked first, so a sync of the
        wrong weights fails before anything is sent)."""
        self.versions.check(version)
        return bucket_names(self.policy, bucket_bytes)

    def weight_bucket(self, names: list[str], version: int) -> dict[str, torch.Tensor]:
        """One bucket of the weights, which must be `version` (checked: a sync of other weights
        than the ones it announces must fail, not load)."""
        self.versions.check(version)
        return gather_bucket(self.policy, names)

    def save_checkpoint(self, run_dir: str, state: ckpt.RunState, keep_last: int) -> str:
        return str(ckpt.save(run_dir, self.policy, self.learner.state_dict(), state, keep_last))


def initial_policy(cfg: ExperimentConfig, run: Path, tok: Tokenizer) -> Path:
    """The checkpoint directory RL starts from: given, warm-started (cached) or fresh."""
    if cfg.model.checkpoint:
        return Path(cfg.model.checkpoint).expanduser()
    args = preset(cfg.model.preset, **cfg.model.overrides)
    torch.manual_seed(cfg.trainer.seed)
    model = Transformer(args)
    w = cfg.warm_start
    if w.enabled and cfg.agent.environment:
        # Agent runs warm-start on their environments' own solutions, rendered as episodes.
        from rewards.agent.spec import load_env

        from .agent_sft import train_agent_sft

        source, template = load_env(cfg.agent.environment), agent_template(cfg, tok)
        held_out = held_out_prompts(cfg.eval, cfg.agent.environments)  # never demonstrated

        def stages(m: Transformer) -> dict:
            lm = train_agent_sft(
                m, source, tok, steps=w.steps, batch_size=w.batch_size, lr=w.lr,
                environments=cfg.agent.environments, seed=cfg.trainer.seed, template=template,
                exclude=held_out,
            )  # fmt: skip
            return {"agent_sft": {"lm": lm}}

        # What the demonstrations and their rendering depend on (not the RL loop's budgets).
        a = cfg.agent
        agent = {
            "environment": a.environment, "environments": a.environments,
            "chat_template": a.chat_template, "thinking": a.thinking, "list_tools": a.list_tools,
            "demonstrator": repr(getattr(source, "demonstrate", None)),
        }  # fmt: skip
        settings = {"model": args.to_dict(), "seed": cfg.trainer.seed, "agent": agent}
        if held_out:  # (a run without eval sets keeps its earlier cache key)
            settings["held_out"] = hashlib.sha256("\n".join(sorted(held_out)).encode()).hexdigest()
        return warm_start(model, None, tok, config=w, settings=settings, stages=stages)
    if w.enabled:
        held_out = held_out_prompts(cfg.eval, cfg.agent.environments)  # never trained on
        stream = TaskStream(
            cfg.data.task, cfg.data.path, cfg.data.seed + 10_000, cfg.data.task_kwargs,
            exclude=held_out,
        )  # fmt: skip
        # warm_start() adds the stage settings (w) to the cache key itself.
        data = dataclasses.asdict(cfg.data)
        settings = {"model": args.to_dict(), "seed": cfg.trainer.seed, "data": data}
        if held_out:  # (a run without eval sets keeps its earlier cache key)
            settings["held_out"] = hashlib.sha256("\n".join(sorted(held_out)).encode()).hexdigest()
        return warm_start(model, stream, tok, config=w, settings=settings)
    path = RunDir(run).initial_policy
    if not (path / "config.json").exists():
        save_pretrained(model, path)
    return path


def agent_template(cfg: ExperimentConfig, tok: Tokenizer) -> Any:
    """The chat template of cfg.agent, after checking the tokenizer can write it."""
    from rollout.chat import SPECIAL_TOKENS, chat_template

    a = cfg.agent
    template = chat_template(a.chat_template, thinking=a.thinking, list_tools=a.list_tools)
    if a.chat_template == "deepseek-v3.2":
        try:
            split = [t for t in SPECIAL_TOKENS if len(tok.encode(t)) != 1]
        except ValueError:  # the character tokenizer cannot encode them at all
            split = list(SPECIAL_TOKENS)
        if split:
            raise ValueError(
                "agent.chat_template deepseek-v3.2 needs a tokenizer with DeepSeek-V3.2's "
                f"special tokens (model.tokenizer or model.checkpoint); this one splits {split}"
            )
    return template


def _seed(cfg: ExperimentConfig, step: int) -> int:
    digest = hashlib.sha256(f"{cfg.trainer.seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _agent_task(cfg: ExperimentConfig, spec: Any, k: int, held_out: frozenset[str]) -> dict:
    """The run's k-th agent task; one an eval set holds out (agent_task_key) is drawn again
    with a seed of its own (a run without eval sets draws as it always has)."""
    seed = _seed(cfg, k)
    for attempt in range(1, 1001):
        task, _ = spec.generate(seed)
        if not held_out or agent_task_key(spec, task) not in held_out:
            return task
        digest = hashlib.sha256(f"{cfg.trainer.seed}:{k}:{attempt}".encode()).digest()
        seed = int.from_bytes(digest[:4], "little")
    raise RuntimeError(f"{spec.name}: 1000 draws of task {k} were all held out by eval sets")


class SigintLatch:
    """Ctrl-C during a run, kept until the run acts on it. Python raises KeyboardInterrupt in
    whatever the main thread runs when SIGINT arrives; when that is a weakref callback or a
    __del__ (garbage collection runs them anywhere), Python prints it as "Exception ignored"
    and drops it, and the run would go on to its end. This handler raises as the default one
    does and also records the signal, and the run's loop calls `check` at each step boundary.
    It is installed only over Python's default handler in the main thread: a SIGINT that is
    ignored, or handled by the caller, stays so. While installed, the dropped interrupt's
    "Exception ignored" report is not printed: the run stops with its one line instead."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None
        self._unraisablehook: Any = None

    def _unraisable(self, unraisable: Any) -> None:
        if not (self.seen and unraisable.exc_type is KeyboardInterrupt):
            self._unraisablehook(unraisable)

    def _handler(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def install(self) -> None:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._unraisablehook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def check(self) -> None:
        """Raise KeyboardInterrupt if a SIGINT arrived, whether or not its first raise got
        through."""
        if self.seen:
            raise KeyboardInterrupt

    def remove(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._unraisablehook
            self._previous = None


def train(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run (or resume) the experiment; returns the run directory. Every refusal (ConfigError,
    RunDirError) comes before anything is written."""
    preflight(cfg)
    run = Path(cfg.trainer.output_dir)
    check_start(run, resume=resume, overwrite=overwrite)
    with RunLock(run):
        check_start(run, resume=resume, overwrite=overwrite)  # now it counts
        cfg_file = RunDir(run).config
        state, learner_state, last = ckpt.RunState(-1, 0, 0, {}), None, None
        if resume:
            check_resume(cfg, cfg_file)
            last, skipped = ckpt.latest_intact(run)
            for reason in skipped:
                log.warning("--resume: skipping a damaged checkpoint: %s", reason)
            if last is not None:
                state, learner_state = ckpt.load_state(last, verified=True)
                log.info("--resume: continuing after step %d (%s)", state.step + 1, last.name)
            elif skipped:
                log.warning("--resume: no intact checkpoint left; starting over from step 1")
            if state.step + 1 > cfg.trainer.total_steps:
                raise ConfigError(
                    f"--resume: trainer.total_steps={cfg.trainer.total_steps}, but the run has "
                    f"completed {state.step + 1} steps; raise it to extend the run"
                )
        elif overwrite:
            clear(run)
        if state.step + 1 == cfg.trainer.total_steps:
            print(f"keeprl train: {run} has completed all {state.step + 1} steps; nothing to do")
            return run
        cfg_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        ckpt.clean_temp(run)
        _train(cfg, run, state, learner_state, last)
    return run


def _train(
    cfg: ExperimentConfig,
    run: Path,
    state: ckpt.RunState,
    learner_state: dict | None,
    last: Path | None,
) -> None:
    """The loop, in a run directory this process holds the lock of."""
    import ray

    tok = load_tokenizer(cfg.model)
    policy_dir = last / "policy" if last else initial_policy(cfg, run, tok)
    started_ray = not ray.is_initialized()
    mark_process_group()
    if started_ray:
        ray.init(
            address=cfg.ray.address,
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    store = RolloutStore(RunDir(run).rollouts)
    store.clean_temp_files()
    store.discard_after(state.step)
    tracker = Tracker(
        run,
        uri=cfg.tracking.mlflow_uri,
        experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name,
    )
    tracker.resume(state.step)
    if state.step < 0:
        tracker.log_params(to_dict(cfg))
    pool, placement, status = None, None, "FAILED"
    sigint = SigintLatch()
    sigint.install()
    try:
        placement = reserve(cfg)
        learner, pool, scorer = _actors(
            cfg, policy_dir, learner_state, state.weight_version, placement
        )
        held_out = held_out_prompts(cfg.eval, cfg.agent.environments)  # the eval sets'
        stream = TaskStream(
            cfg.data.task,
            cfg.data.path,
            cfg.data.seed,
            cfg.data.task_kwargs,
            position=state.data_position,
            exclude=held_out,
        )
        evaluator = Evaluator(cfg, tok, scorer) if cfg.eval.sets else None
        eval_store = RunDir(run).eval
        for directory in eval_store.glob("*/") if eval_store.is_dir() else ():
            # evaluations of policies after the resumed checkpoint's run again
            RolloutStore(directory).discard_after(state.step + 1)

        def evaluate(updates: int, commit_step: int) -> None:
            results = evaluator.run(pool, updates)
            store_results(eval_store, updates, results)
            crash_point("eval_stored", updates)
            tracker.log_step(commit_step, flat_metrics(results), at=updates)
            print(summary_table(updates, results), flush=True)

        # The evaluation of the policy after N updates belongs to step N's record (committed
        # with its checkpoint, redone on a resume before it); the last one, after total_steps
        # updates, to the last step's. Before the last, it waits until the learner has step N
        # queued and runs on the workers while the learner trains; with colocated placement
        # (the devices are the learner's then) it runs at once.
        deferred: list[int] = []
        overlap = not placement.colocated
        first, total = state.step + 1, cfg.trainer.total_steps
        if evaluator is not None and state.step < 0:  # the policy the run starts from
            evaluate(0, 0)
        elif (
            evaluator is not None
            and first < total
            and cfg.eval.due(first, total)
            # a run extended past its old last step has that evaluation in MLflow already
            and first not in dict(tracker.history(evaluator.headline))
        ):
            if overlap:
                deferred.append(first)
            else:
                evaluate(first, first)
        agent_source, template = None, None
        if cfg.agent.environment:
            from rewards.agent.spec import load_env

            agent_source = load_env(cfg.agent.environment)
            template = agent_template(cfg, tok)  # once: the same for every step

        def done(r: _Rollout) -> None:  # the step's learner half, then its records
            metrics = _finish(cfg, r, learner, pool, scorer, store)
            crash_point("rollouts_stored", r.step)
            tracker.log_step(r.step, metrics)
            crash_point("metrics_pending", r.step)
            _progress(r.step, cfg.trainer.total_steps, metrics)
            updates = r.step + 1  # the workers hold the weights after r.step
            if evaluator is not None and cfg.eval.due(updates, total):
                if updates == total:
                    evaluate(updates, r.step)
                elif overlap:
                    deferred.append(updates)
                else:
                    evaluate(updates, updates)
            if (r.step + 1) % cfg.checkpoint.every == 0 or r.step + 1 == cfg.trainer.total_steps:
                run_state = ckpt.RunState(r.step, r.data_position, r.step + 1, {})
                _checkpoint(learner, run, run_state, cfg.checkpoint.keep_last)
                crash_point("checkpoint_written", r.step)
                tracker.commit(r.step)

        # max_staleness 1: step s is sampled while the learner trains on step s - 1 (with the
        # weights from before that update), then s - 1 is finished before s is queued, so its
        # weight push and checkpoint see exactly its own updates. 0: one step at a time.
        in_flight: _Rollout | None = None
        for step in range(state.step + 1, cfg.trainer.total_steps):
            sigint.check()
            if in_flight is not None and cfg.rollout.max_staleness == 0:
                done(in_flight)
                in_flight = None
            if agent_source is not None:
                r = _agent_rollout(
                    cfg, step, tok, pool, agent_source, template, stream.position, held_out
                )
            else:
                r = _rollout(cfg, step, tok, stream, pool, scorer)
            if placement.colocated:  # the learner's turn on the devices
                pool.release()
            if in_flight is not None:
                done(in_flight)
            in_flight = _submit(cfg, learner, r)
            if deferred:  # the workers still hold its weights: the next push is done(step)
                evaluate(deferred.pop(), step)
        if in_flight is not None:
            done(in_flight)
        sigint.check()
        tracker.log_artifact(RunDir(run).config)
        tracker.log_artifact(store.directory, "rollouts")
        try:  # the curves are a convenience: failing to draw them must not fail a finished run
            from .plot import plot_run

            tracker.log_artifact(plot_run(run, history=tracker.history), "plots")
        except Exception as e:
            log.warning("could not plot the run's curves: %s", e)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        sigint.remove()
        try:
            tracker.close(status)
        except Exception as e:  # e.g. a full disk: the run's own error is the one to show
            log.warning("could not mark the MLflow run %s: %s", status, e)
        if pool is not None:
            pool.shutdown()
        if placement is not None and not started_ray:  # a joined cluster keeps running
            placement.remove()
        if started_ray:
            ray.shutdown()


class RewardService:
    """The reward worker actor, replaced when it dies.

    Verifiers run in killable worker processes inside the actor (`rewards.workers` of them,
    isolation="process"), so a verifier that hangs is killed at `rewards.timeout_s` and one
    that exits the process (os._exit, a segfault) costs only its sample. Should the actor
    itself die all the same, its batch is scored 0 with the failure recorded and a new actor
    takes the next batch, as a dead rollout worker is replaced.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.labels = [p.label for p in rewards_pkg.from_config(cfg.verifiers).parts]
        self.actor = self._start()

    def _start(self) -> Any:
        return remote_worker(
            self.cfg.verifiers,
            num_cpus=0,
            timeout_s=self.cfg.timeout_s,
            max_concurrency=self.cfg.workers or os.cpu_count() or 1,
            isolation="process",
        )

    def score(self, samples: list[rewards_pkg.Sample]) -> list[dict]:
        import ray

        try:
            return ray.get(self.actor.score.remote(samples))
        except ray.exceptions.RayActorError as e:
            reason = f"reward worker died: {str(e).splitlines()[0]}"
            log.warning("%s; its %d samples score 0; starting a new one", reason, len(samples))
            self.actor = self._start()
            return [{"reward": 0.0, "subscores": {}, "failure": reason} for _ in samples]


def _checkpoint(learner: Any, run: Path, state: ckpt.RunState, keep_last: int) -> None:
    """Have the learner actor write the checkpoint of `state.step`."""
    import ray

    try:
        ray.get(learner.save_checkpoint.remote(str(run), state, keep_last))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ckpt.CheckpointError):
            raise e.cause from None  # one line (a full disk, say), not Ray's traceback
        raise


def _actors(
    cfg: ExperimentConfig,
    policy_dir: Path,
    learner_state: dict | None,
    version: int,
    placement: Placement,
) -> tuple[Any, Any, Any]:
    """The learner actor, the rollout pool (at weight `version`) and the reward worker, the
    learner ranks and rollout workers each in its bundle of `placement`."""
    import ray

    from rollout.worker import RolloutPool

    args = (str(policy_dir), learner_config(cfg), cfg.model.dtype, cfg.optim.device)
    if cfg.ray.learner_workers > 1:  # ranks as actors, driven by one resource-less actor
        from .sharded import ShardedLearnerGroup

        learner = (
            ray.remote(ShardedLearnerGroup)
            .options(num_cpus=0)
            .remote(
                cfg.ray.learner_workers,
                *args,
                cfg.model.attention,
                learner_state,
                version,
                num_cpus=cfg.ray.learner_cpus,
                num_gpus=placement.learner_gpus,
                placement=placement,
            )
        )
    else:
        learner = (
            ray.remote(LearnerService)
            .options(num_cpus=cfg.ray.learner_cpus, **placement.learner(0))
            .remote(*args, learner_state, cfg.model.attention, version)
        )
    pool = RolloutPool(
        (cfg.rollout.engine, str(policy_dir), cfg.rollout.engine_kwargs),
        cfg.rollout.workers,
        num_cpus=cfg.ray.rollout_cpus,
        num_gpus=placement.rollout_gpus,
        placement=placement.rollout,
    )
    if version:
        pool.update_weights(str(policy_dir), version)
    return learner, pool, RewardService(cfg.rewards)


@dataclasses.dataclass
class _Rollout:
    """One step's sampled and scored group batch, on its way through the learner."""

    step: int
    trajs: list
    scores: list[dict]
    groups: list[int]
    batch: Batch
    rollout_s: float
    data_position: int  # the task stream's position after this step's prompts
    updates: list = dataclasses.field(default_factory=list)  # the learner's step refs
    extra_metrics: dict = dataclasses.field(default_factory=dict)  # e.g. agent episode stats


def _agent_rollout(
    cfg: ExperimentConfig,
    step: int,
    tok: Tokenizer,
    pool: Any,
    source: Any,
    template: Any,
    position: int,
    held_out: frozenset[str] = frozenset(),
) -> _Rollout:
    """Sample step `step`'s multi-turn episodes: prompts_per_step tasks (each from the next
    environment of a family, or from one environment; none an eval set's), samples_per_prompt
    episodes of each (one GRPO group), the environment's verdict as the reward."""
    from rewards.agent.spec import EnvSpec
    from rollout.episode import run_episodes

    envs, tasks, groups = [], [], []
    for i in range(cfg.data.prompts_per_step):
        k = step * cfg.data.prompts_per_step + i
        spec = source if isinstance(source, EnvSpec) else source(k % cfg.agent.environments)
        task = _agent_task(cfg, spec, k, held_out)
        for _ in range(cfg.rollout.samples_per_prompt):
            envs.append(spec.environment())
            tasks.append(task)
            groups.append(k)
    sampling = dataclasses.replace(cfg.rollout.sampling, seed=_seed(cfg, step))
    start = time.perf_counter()
    episodes = run_episodes(
        pool, envs, tasks, tok, sampling, template=template,
        max_turns=cfg.agent.max_turns, token_budget=cfg.agent.token_budget,
        step_timeout_s=cfg.agent.step_timeout_s,
        overflow=None if cfg.agent.overflow == "none" else cfg.agent.overflow,
    )  # fmt: skip
    rollout_s = time.perf_counter() - start
    # An episode whose environment failed before the first turn has nothing to train on.
    kept = [(ep, g) for ep, g in zip(episodes, groups, strict=True) if ep.num_turns > 0]
    if not kept:
        raise RuntimeError(f"agent step {step}: every environment failed before a turn")
    # A row per trajectory segment (one unless an overflow strategy continued the episode),
    # each with its episode's reward and group.
    rows = [(ep, g, t) for ep, g in kept for t in ep.to_trajectories(sampling, pool.name)]
    trajs = [t for _, _, t in rows]
    for _, g, t in rows:
        t.prompt_index = g - step * cfg.data.prompts_per_step
    scores = [
        {
            "reward": float(ep.reward or 0.0),
            "subscores": {"agent": float(ep.reward or 0.0)},
            # The environment is the verifier: only its own failures are verifier failures;
            # the model's (malformed calls, budgets) are logged as agent/end/<reason>.
            "failure": ep.end_reason if ep.end_reason in ("env_error", "env_timeout") else None,
        }
        for ep, _, _ in rows
    ]
    batch = Batch.from_episodes(
        [ep for ep, _ in kept], [g for _, g in kept], temperature=sampling.temperature
    )
    reasons: dict[str, float] = {}
    for ep in episodes:
        key = f"agent/end/{ep.end_reason}"
        reasons[key] = reasons.get(key, 0.0) + 1 / len(episodes)
    turns = sum(ep.num_turns for ep in episodes) / len(episodes)
    segments = len(rows) / len(kept)
    # Reward and accuracy per episode, not per row (an episode's segments share its reward).
    ep_rewards = [float(ep.reward or 0.0) for ep, _ in kept]
    per_episode = {
        "reward_mean": sum(ep_rewards) / len(ep_rewards),
        "accuracy/agent": sum(r >= 1.0 for r in ep_rewards) / len(ep_rewards),
    }
    per_episode["accuracy"] = per_episode["accuracy/agent"]
    return _Rollout(
        step, trajs, scores, [g for _, g, _ in rows], batch, rollout_s, position,
        extra_metrics={
            "agent/turns": turns, "agent/segments": segments, **reasons, **per_episode
        },
    )  # fmt: skip


def _rollout(
    cfg: ExperimentConfig,
    step: int,
    tok: Tokenizer,
    stream: TaskStream,
    pool: Any,
    scorer: Any,
) -> _Rollout:
    """Sample and score step `step`'s prompts with the weights the rollout workers hold."""
    tasks = stream.take(cfg.data.prompts_per_step)
    stops = cfg.rollout.sampling.stop_token_ids
    sampling = dataclasses.replace(
        cfg.rollout.sampling,
        seed=_seed(cfg, step),
        stop_token_ids=stops if tok.eos_id in stops else (*stops, tok.eos_id),
    )
    start = time.perf_counter()
    trajs = pool.generate(
        [tok.prompt_ids(t.prompt) for t in tasks],
        sampling,
        n=cfg.rollout.samples_per_prompt,
    )
    rollout_s = time.perf_counter() - start
    for t in trajs:  # stored with the rollouts, so `keeprl replay --verifier` can re-score
        RunDir.attach_reference(t, tasks[t.prompt_index].reference)
    samples = [
        rewards_pkg.Sample(
            tasks[t.prompt_index].prompt,
            tok.decode(t.response_ids),
            tasks[t.prompt_index].reference,
            tasks[t.prompt_index].metadata,
        )
        for t in trajs
    ]
    scores = scorer.score(samples)
    rewards = [s["reward"] for s in scores]
    groups = [step * cfg.data.prompts_per_step + t.prompt_index for t in trajs]
    batch = Batch.from_trajectories(trajs, rewards, groups)
    return _Rollout(step, trajs, scores, groups, batch, rollout_s, stream.position)


def _submit(cfg: ExperimentConfig, learner: Any, r: _Rollout) -> _Rollout:
    """Queue the step's updates on the learner actor. Its weights are streamed at _finish:
    the next step's updates are queued only after that, so they are exactly this step's."""
    r.updates = [learner.step.remote(r.batch) for _ in range(cfg.algorithm.updates_per_batch)]
    return r


def _finish(
    cfg: ExperimentConfig,
    r: _Rollout,
    learner: Any,
    pool: Any,
    scorer: Any,
    store: RolloutStore,
) -> dict[str, float]:
    """Wait for the step's updates, stream the weights after them to the rollout workers,
    store the rollouts; the step's metrics."""
    import ray

    # The first update's metrics measure the sampler against the weights it sampled with;
    # later updates (algorithm.updates_per_batch) add their loss and clipping only.
    updates = ray.get(r.updates)
    if cfg.ray.placement == "colocated":  # the engines' turn again: they load the new weights
        pool.resume()
    metrics = updates[0]
    if len(updates) > 1:
        last = updates[-1]
        metrics.update(
            {
                f"last_update/{k}": last[k]
                for k in ("loss", "clip_low_frac", "clip_high_frac", "ratio_mean", "kl")
                if k in last
            }
        )
    start = time.perf_counter()
    pool.stream_weights(learner, r.step + 1, cfg.rollout.weight_bucket_mb << 20)
    sync_s = time.perf_counter() - start
    store.write_step(
        r.step,
        r.trajs,
        rewards=[s["reward"] for s in r.scores],
        subscores=[s["subscores"] for s in r.scores],
        failures=[s["failure"] for s in r.scores],
        group_ids=r.groups,
        overwrite=True,
    )
    generated = sum(len(t.response_ids) for t in r.trajs)
    lengths = [len(t.response_ids) for t in r.trajs]
    return {
        **metrics,
        **reward_stats(r.scores, lengths, ["agent"] if cfg.agent.environment else scorer.labels),
        **r.extra_metrics,
        "rollout_tokens_per_s": generated / r.rollout_s,
        "weight_version": r.step + 1,
        "weight_sync_s": sync_s,
        # learner updates the sampler's weights lacked: 0 on-policy, 1 with max_staleness 1
        "staleness": r.step - min(t.weight_version for t in r.trajs),
    }


def _progress(step: int, total: int, m: dict[str, float]) -> None:
    line = (
        f"step {step + 1}/{total}  reward {m['reward_mean']:.3f}  "
        f"acc {m['accuracy']:.2f}  kl {m.get('kl', 0.0):.4f}  "
        f"gap {m['logp_gap_max']:.2e}  rollout {m['rollout_tokens_per_s']:.0f} tok/s"
    )
    if m["verifier_failures"] > 0:  # else "reward 0.000" would hide that nothing was scored
        line += f"  verifier failed on {m['verifier_failures']:.0%}"
    if sys.stdout.isatty():
        print("\r" + line, end="\n" if step + 1 == total else "", flush=True)
    else:
        print(line, flush=True)


def main(args: Any) -> int:
    """The `keeprl train CONFIG [key=value ...] [--resume | --overwrite]` handler."""
    from .config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        print(
            json.dumps(to_dict(cfg), indent=1)
            if args.print_config
            else f"keeprl train: {args.config} -> {cfg.trainer.output_dir}"
        )
        run = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"keeprl train: config error: {e}", file=sys.stderr)
        return 2
    except RunDirError as e:
        print(f"keeprl train: {e}", file=sys.stderr)
        return 2
    except ckpt.CheckpointError as e:
        print(f"keeprl train: {e}; resume with --resume once that is fixed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\nkeeprl train: interrupted; `--resume` continues {cfg.trainer.output_dir} from "
            "its last checkpoint",
            file=sys.stderr,
        )
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"keeprl train: {e.strerror}{where}; `--resume` continues from the last "
            "checkpoint once there is room",
            file=sys.stderr,
        )
        return 1
    print(f"run directory: {run}")
    curves = RunDir(run).curves
    if curves.exists():
        print(f"reward and KL curves: {curves}")
    return 0
