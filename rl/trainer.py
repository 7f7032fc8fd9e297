"""`keeprl train`: the GRPO loop over Ray actors.

One step, always in this order: prompts -> rollout workers -> reward worker -> advantages
and learner step (learner actor) -> weight sync to the rollout workers -> Parquet rollouts,
metrics -> checkpoint every `checkpoint.every` steps. A checkpoint records the last completed
step; resuming deletes rollouts logged after it and keeps MLflow to the committed steps
(rl.tracking), so a run killed at any point and resumed neither loses nor duplicates a step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

import rewards as rewards_pkg
from policy import Transformer, load_pretrained, preset, save_pretrained
from rewards.worker import remote_worker
from rollout import Sampling
from rollout.store import RolloutStore

from . import checkpoint as ckpt
from .batch import Batch
from .config import ConfigError, ExperimentConfig, to_dict
from .learner import Learner, LearnerConfig
from .loss import LossConfig
from .tasks import TaskStream
from .tokenizer import CharTokenizer
from .tracking import Tracker
from .warm_start import warm_start

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LearnerService:
    """The learner as a Ray actor: owns the policy and optimizer; hands out weights."""

    def __init__(
        self,
        policy_dir: str,
        cfg: LearnerConfig,
        dtype: str,
        device: str,
        state: dict | None = None,
    ) -> None:
        self.policy = load_pretrained(policy_dir, device=device, dtype=DTYPES[dtype])
        self.learner = Learner(self.policy, cfg)
        if state is not None:
            self.learner.load_state_dict(state)

    def step(self, batch: Batch) -> dict[str, float]:
        return self.learner.step(batch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def save_checkpoint(self, run_dir: str, state: ckpt.RunState, keep_last: int) -> str:
        return str(ckpt.save(run_dir, self.policy, self.learner.state_dict(), state, keep_last))


def learner_config(cfg: ExperimentConfig) -> LearnerConfig:
    a, o = cfg.algorithm, cfg.optim
    loss = LossConfig(
        eps_low=a.eps_low,
        eps_high=a.eps_high,
        beta=a.beta,
        kl_estimator=a.kl_estimator,
        opsm=a.opsm,
        opsm_delta=a.opsm_delta,
        aggregation=a.aggregation,
    )
    return LearnerConfig(
        lr=o.lr,
        weight_decay=o.weight_decay,
        grad_clip=o.grad_clip,
        warmup_steps=o.warmup_steps,
        lr_schedule=o.lr_schedule,
        total_steps=cfg.trainer.total_steps * a.updates_per_batch,
        micro_batch_tokens=o.micro_batch_tokens,
        keep_routing=a.keep_routing,
        keep_sampling_mask=a.keep_sampling_mask,
        std_normalize=a.std_normalize,
        loss=loss,
    )


def initial_policy(cfg: ExperimentConfig, run: Path, tok: CharTokenizer) -> Path:
    """The checkpoint directory RL starts from: given, warm-started (cached) or fresh."""
    if cfg.model.checkpoint:
        return Path(cfg.model.checkpoint).expanduser()
    args = preset(cfg.model.preset, **cfg.model.overrides)
    if args.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"model: vocab_size {args.vocab_size} < the tokenizer's "
            f"{tok.vocab_size}; raise model.overrides.vocab_size"
        )
    torch.manual_seed(cfg.trainer.seed)
    model = Transformer(args)
    w = cfg.warm_start
    if w.enabled:
        stream = TaskStream(
            cfg.data.task, cfg.data.path, cfg.data.seed + 10_000, cfg.data.task_kwargs
        )
        # warm_start() adds the stage settings (w) to the cache key itself.
        settings = {"model": args.to_dict(), "seed": cfg.trainer.seed, "data": asdict(cfg.data)}
        return warm_start(model, stream, tok, config=w, settings=settings)
    path = run / "initial_policy"
    if not (path / "config.json").exists():
        save_pretrained(model, path)
    return path


def _prepare_run_dir(cfg: ExperimentConfig, resume: bool) -> Path:
    run = Path(cfg.trainer.output_dir)
    resolved = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    cfg_file = run / "config.yaml"
    if ckpt.latest(run) is not None and not resume:
        raise ConfigError(
            f"{run} already holds checkpoints: pass --resume to continue it, or "
            "set trainer.output_dir to a new directory"
        )
    if resume and cfg_file.exists():
        old = yaml.safe_load(cfg_file.read_text())
        old["trainer"]["total_steps"] = cfg.trainer.total_steps  # extending a run is fine
        if old != to_dict(cfg):
            raise ConfigError(
                f"--resume: the config differs from {cfg_file}; resume with the "
                "same config (only trainer.total_steps may change)"
            )
    run.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(resolved)
    return run


def _seed(cfg: ExperimentConfig, step: int) -> int:
    digest = hashlib.sha256(f"{cfg.trainer.seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _reward_stats(scores: list[dict], lengths: list[int]) -> dict[str, float]:
    rewards = [s["reward"] for s in scores]
    out = {
        "reward_mean": sum(rewards) / len(rewards),
        "accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
        "response_length": sum(lengths) / len(lengths),
        "verifier_failures": sum(s["failure"] is not None for s in scores) / len(scores),
    }
    keys = {k for s in scores for k in s["subscores"]}
    for k in sorted(keys):
        vals = [s["subscores"][k] for s in scores if s["subscores"].get(k) is not None]
        if vals:
            out[f"reward/{k}"] = sum(vals) / len(vals)
    return out


def train(cfg: ExperimentConfig, resume: bool = False) -> Path:
    """Run (or resume) the experiment; returns the run directory."""
    import ray

    run = _prepare_run_dir(cfg, resume)
    tok = CharTokenizer()
    last = ckpt.latest(run) if resume else None
    state, learner_state = ckpt.load_state(last) if last else (ckpt.RunState(-1, 0, 0, {}), None)
    policy_dir = last / "policy" if last else initial_policy(cfg, run, tok)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address=cfg.ray.address,
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    store = RolloutStore(run / "rollouts")
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
    pool = None
    try:
        learner, pool, scorer = _actors(cfg, policy_dir, learner_state, state.weight_version)
        stream = TaskStream(
            cfg.data.task,
            cfg.data.path,
            cfg.data.seed,
            cfg.data.task_kwargs,
            position=state.data_position,
        )
        for step in range(state.step + 1, cfg.trainer.total_steps):
            metrics = _step(cfg, step, tok, stream, pool, scorer, learner, store)
            tracker.log_step(step, metrics)
            _progress(step, cfg.trainer.total_steps, metrics)
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.trainer.total_steps:
                run_state = ckpt.RunState(step, stream.position, step + 1, {})
                ray.get(
                    learner.save_checkpoint.remote(str(run), run_state, cfg.checkpoint.keep_last)
                )
                tracker.commit(step)
        tracker.log_artifact(run / "config.yaml")
        tracker.log_artifact(store.directory, "rollouts")
        try:  # the curves are a convenience: failing to draw them must not fail a finished run
            from .plot import plot_run

            tracker.log_artifact(plot_run(run, history=tracker.history), "plots")
        except Exception as e:
            log.warning("could not plot the run's curves: %s", e)
    finally:
        tracker.close()
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    return run


def _actors(
    cfg: ExperimentConfig, policy_dir: Path, learner_state: dict | None, version: int
) -> tuple[Any, Any, Any]:
    """The learner actor, the rollout pool (at weight `version`) and the reward worker."""
    import ray

    from rollout.worker import RolloutPool

    learner = (
        ray.remote(LearnerService)
        .options(num_cpus=cfg.ray.learner_cpus, num_gpus=cfg.ray.learner_gpus)
        .remote(
            str(policy_dir), learner_config(cfg), cfg.model.dtype, cfg.optim.device, learner_state
        )
    )
    pool = RolloutPool(
        (cfg.rollout.engine, str(policy_dir), cfg.rollout.engine_kwargs),
        cfg.rollout.workers,
        num_cpus=cfg.ray.rollout_cpus,
        num_gpus=cfg.ray.rollout_gpus,
    )
    if version:
        pool.update_weights(str(policy_dir), version)
    scorer = remote_worker(cfg.rewards.verifiers, num_cpus=0, timeout_s=cfg.rewards.timeout_s)
    return learner, pool, scorer


def _step(
    cfg: ExperimentConfig,
    step: int,
    tok: CharTokenizer,
    stream: TaskStream,
    pool: Any,
    scorer: Any,
    learner: Any,
    store: RolloutStore,
) -> dict[str, float]:
    import ray

    tasks = stream.take(cfg.data.prompts_per_step)
    s = cfg.rollout.sampling
    sampling = Sampling(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_tokens=s.max_tokens,
        seed=_seed(cfg, step),
        stop_token_ids=(tok.eos_id,),
    )
    start = time.perf_counter()
    trajs = pool.generate(
        [[tok.bos_id, *tok.encode(t.prompt)] for t in tasks],
        sampling,
        n=cfg.rollout.samples_per_prompt,
    )
    rollout_s = time.perf_counter() - start
    for t in trajs:  # stored with the rollouts, so `keeprl replay --verifier` can re-score
        t.extra["reference"] = tasks[t.prompt_index].reference
    samples = [
        rewards_pkg.Sample(
            tasks[t.prompt_index].prompt,
            tok.decode(t.response_ids),
            tasks[t.prompt_index].reference,
            tasks[t.prompt_index].metadata,
        )
        for t in trajs
    ]
    scores = ray.get(scorer.score.remote(samples))
    rewards = [s["reward"] for s in scores]
    groups = [step * cfg.data.prompts_per_step + t.prompt_index for t in trajs]
    batch = Batch.from_trajectories(trajs, rewards, groups)
    # The first update's metrics measure the sampler against the weights it sampled with;
    # later updates (algorithm.updates_per_batch) add their loss and clipping only.
    updates = ray.get([learner.step.remote(batch) for _ in range(cfg.algorithm.updates_per_batch)])
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
    pool.update_weights(learner.state_dict.remote(), step + 1)
    store.write_step(
        step,
        trajs,
        rewards=rewards,
        subscores=[s["subscores"] for s in scores],
        failures=[s["failure"] for s in scores],
        group_ids=groups,
        overwrite=True,
    )
    generated = sum(len(t.response_ids) for t in trajs)
    return {
        **metrics,
        **_reward_stats(scores, [len(t.response_ids) for t in trajs]),
        "rollout_tokens_per_s": generated / rollout_s,
        "weight_version": step + 1,
    }


def _progress(step: int, total: int, m: dict[str, float]) -> None:
    line = (
        f"step {step + 1}/{total}  reward {m['reward_mean']:.3f}  "
        f"acc {m['accuracy']:.2f}  kl {m.get('kl', 0.0):.4f}  "
        f"gap {m['logp_gap_max']:.2e}  rollout {m['rollout_tokens_per_s']:.0f} tok/s"
    )
    if sys.stdout.isatty():
        print("\r" + line, end="\n" if step + 1 == total else "", flush=True)
    else:
        print(line, flush=True)


def main(args: Any) -> int:
    """The `keeprl train CONFIG [key=value ...] [--resume]` handler."""
    from .config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        print(
            json.dumps(to_dict(cfg), indent=1)
            if args.print_config
            else f"keeprl train: {args.config} -> {cfg.trainer.output_dir}"
        )
        run = train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"keeprl train: config error: {e}", file=sys.stderr)
        return 2
    print(f"run directory: {run}")
    if (run / "curves.png").exists():
        print(f"reward and KL curves: {run / 'curves.png'}")
    return 0
