"""Checks that a run can start, made before anything is written or started.

`preflight(cfg)` checks what the config alone cannot: that the data loads, that the model
(preset and overrides, or a checkpoint in the released layout with its weights) and its
tokenizer fit together, that the learner's settings hold, and what keeprl cannot run yet.
`check_resume(cfg, config_file)` compares a `--resume` config with the run's own, naming every
key that differs. Each problem is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from policy import ModelArgs, preset
from policy.attention import triton_supported
from policy.checkpoint import weight_files

from .config import ConfigError, ExperimentConfig, to_dict
from .evaluation import held_out_prompts
from .learner import LearnerConfig
from .tasks import TaskStream
from .tokenizer import load_tokenizer


def learner_config(cfg: ExperimentConfig) -> LearnerConfig:
    """The learner's settings: the config's own `algorithm` and `optim` sections."""
    return LearnerConfig(
        algorithm=cfg.algorithm,
        optim=cfg.optim,
        total_steps=cfg.trainer.total_steps * cfg.algorithm.updates_per_batch,
    )


def preflight(cfg: ExperimentConfig) -> None:
    """Config problems that need more than the config itself (the data, the model, the
    learner's settings), found before anything is written or started: ConfigError."""
    held_out = held_out_prompts(cfg.eval, cfg.agent.environments)
    try:
        TaskStream(
            cfg.data.task, cfg.data.path, cfg.data.seed, cfg.data.task_kwargs, exclude=held_out
        ).take(1)
    except FileNotFoundError:
        raise ConfigError(f"data.path: {cfg.data.path}: no such file") from None
    except (OSError, TypeError, ValueError) as e:
        key = "data.task_kwargs" if isinstance(e, TypeError) else "data"
        raise ConfigError(f"{key}: {e}") from None
    if cfg.ray.learner_gpus > 1:
        raise ConfigError(
            f"ray.learner_gpus={cfg.ray.learner_gpus:g}: a learner rank uses one device; for "
            f"{cfg.ray.learner_gpus:g} GPUs set ray.learner_workers: {cfg.ray.learner_gpus:g} "
            "and ray.learner_gpus: 1"
        )
    if cfg.ray.learner_workers < 1:
        raise ConfigError(f"ray.learner_workers must be >= 1, got {cfg.ray.learner_workers}")
    if cfg.model.checkpoint:
        path = Path(cfg.model.checkpoint).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.checkpoint: {path} holds no config.json")
        try:  # the released DeepSeek-V3.2 layout; unknown architectural keys are named
            args = ModelArgs.from_json(path)
            weight_files(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.checkpoint: {e}") from None
    else:
        try:
            args = preset(cfg.model.preset, **cfg.model.overrides)
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
        except TypeError as e:
            names = [f.name for f in dataclasses.fields(ModelArgs)]
            bad = [k for k in cfg.model.overrides if k not in names]
            if not bad:
                raise ConfigError(f"model.overrides: {e}") from None
            close = difflib.get_close_matches(bad[0], names, n=1, cutoff=0.5)
            hint = f"; did you mean 'model.overrides.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown model field 'model.overrides.{bad[0]}'{hint}") from None
        except ValueError as e:
            raise ConfigError(f"model.overrides: {e}") from None
    if cfg.agent.environment:
        from rewards.agent.spec import load_env

        try:
            load_env(cfg.agent.environment)
        except ValueError as e:
            raise ConfigError(f"agent.environment: {e}") from None
        if cfg.agent.token_budget > args.max_position_embeddings:
            raise ConfigError(
                f"agent.token_budget {cfg.agent.token_budget} exceeds the model's "
                f"max_position_embeddings {args.max_position_embeddings}"
            )
    if cfg.model.attention == "triton":
        why = triton_supported(args)
        if why is None and not cfg.optim.device.startswith("cuda"):
            why = f"the learner runs on {cfg.optim.device!r} (optim.device)"
        if why:
            raise ConfigError(f"model.attention: 'triton' cannot run: {why}; use 'auto'")
    try:
        tok = load_tokenizer(cfg.model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: {e}") from None
    if tok.vocab_size > args.vocab_size:
        fix = "raise model.overrides.vocab_size"
        if cfg.model.checkpoint:
            fix = "the checkpoint and its tokenizer do not belong together"
        raise ConfigError(
            f"model: the tokenizer has {tok.vocab_size} tokens, the model's vocab_size is "
            f"{args.vocab_size}; {fix}"
        )
    if cfg.agent.environment:
        from .trainer import agent_template

        try:
            agent_template(cfg, tok)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        learner_config(cfg)
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None  # the cosine schedule's length


def config_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted keys whose values differ between two resolved configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new), key=str)
            for d in config_diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        ]
    return [] if old == new else [path]


def check_resume(cfg: ExperimentConfig, cfg_file: Path) -> None:
    """ConfigError unless the config equals the run's own. trainer.total_steps may change, and
    so may the `ray` section: resources and placement, such as the number of learner ranks (a
    checkpoint resumes on any number), do not change what is computed."""
    try:
        old = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume: cannot read {cfg_file}: {e}".splitlines()[0]) from None
    keys = [
        k
        for k in config_diff(old, to_dict(cfg))
        if k != "trainer.total_steps" and not k.startswith("ray.")
    ]
    if keys:
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        why = (
            " (a run directory cannot be moved: MLflow's store records its path)"
            if "trainer.output_dir" in keys
            else ""
        )
        raise ConfigError(
            f"--resume: the config differs from {cfg_file} at {shown}{why}; resume with the "
            "same config (only trainer.total_steps and the ray section may change)"
        )
