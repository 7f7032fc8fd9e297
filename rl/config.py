"""Experiment configuration: YAML -> typed, frozen, validated dataclasses.

One `ExperimentConfig` holds every section a run needs. `load_config(path, overrides)` reads
the YAML, applies `key.sub=value` overrides (values parsed as YAML scalars), and builds the
dataclasses strictly: an unknown key fails naming its full path and the closest valid key, a
wrong type names the key and the expected type, and cross-field checks name the fix. Every
error is one line (`ConfigError`), meant to be printed as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import rewards
from rollout.trajectory import Sampling

# The learner's own settings are the YAML sections `algorithm` and `optim`: one definition,
# documented and validated where the library uses it.
from .evaluation import EvalConfig
from .learner import AlgorithmConfig, OptimConfig


class ConfigError(ValueError):
    """A configuration problem, stated in one line that names the key and the fix."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The policy RL starts from: a preset (changed by overrides), or a checkpoint."""

    preset: str = "tiny"  # policy.PRESETS name the model starts from
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelArgs fields to change
    checkpoint: str | None = None  # start from these weights instead (save_pretrained dir)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the learner's parameters
    # "auto": model.checkpoint's own tokenizer.json if it has one, else the character
    # tokenizer of the built-in tasks; "char"; or a directory holding a tokenizer.json
    tokenizer: str = "auto"
    # How the learner runs DSA: "auto" (Triton kernels on CUDA when the shapes suit them, the
    # torch reference elsewhere), "reference" or "triton"; the native engine takes the same
    # choice as rollout.engine_kwargs.attention
    attention: Literal["auto", "reference", "triton"] = "auto"


@dataclass(frozen=True, kw_only=True)
class IndexerWarmupConfig:
    """Warm-start stage 2, the indexer's dense warm-up: everything but the lightning indexers
    frozen, dense attention, loss = KL(main attention || indexer) over every visible key.
    The paper: lr 1e-3, 1000 steps of 16 x 128K tokens."""

    steps: int = 0  # 0 skips the stage
    lr: float = 1e-3  # the indexers' learning rate


@dataclass(frozen=True, kw_only=True)
class SparseSFTConfig:
    """Warm-start stage 3, sparse SFT: DSA on (each query attends to its indexer top-k); the
    main model learns from the LM loss at `lr`, the indexer from its KL on the selected set at
    `indexer_lr`. The indexer's inputs are detached, so the two losses reach disjoint
    parameters: separate learning rates, not a loss coefficient, set their balance."""

    steps: int = 0  # 0 skips the stage
    lr: float = 3e-4  # the main model's learning rate (LM loss)
    indexer_lr: float = 1e-3  # the indexers' learning rate (their KL)


@dataclass(frozen=True, kw_only=True)
class WarmStartConfig:
    """Supervised warm-start on reference answers before RL (cached by its settings), in the
    DeepSeek-V3.2 order: (1) dense SFT of the whole model (`steps` at `lr`; dense attention),
    (2) `indexer_warmup`, (3) `sparse_sft`. Stages with 0 steps are skipped; stages 2-3 are
    off by default and matter only when the model's index_topk is below the sequence length
    (otherwise DSA selects every key and is exactly dense attention)."""

    enabled: bool = False  # off: RL starts from the preset's random weights
    steps: int = 300  # stage 1, dense SFT; 0 skips it
    batch_size: int = 32  # sequences per step, every stage
    lr: float = 3e-3  # stage 1
    indexer_warmup: IndexerWarmupConfig = field(default_factory=IndexerWarmupConfig)
    sparse_sft: SparseSFTConfig = field(default_factory=SparseSFTConfig)
    cache_dir: str = "~/.cache/keeprl/warm_start"  # warm-started policies, keyed by settings

    def __post_init__(self) -> None:
        for name, value in [
            ("steps", self.steps),
            ("indexer_warmup.steps", self.indexer_warmup.steps),
            ("sparse_sft.steps", self.sparse_sft.steps),
        ]:
            if value < 0:
                raise ConfigError(
                    f"warm_start.{name} must be >= 0 (0 skips the stage), got {value}"
                )
        if self.batch_size < 1:
            raise ConfigError(f"warm_start.batch_size must be >= 1, got {self.batch_size}")
        for name, value in [
            ("lr", self.lr),
            ("indexer_warmup.lr", self.indexer_warmup.lr),
            ("sparse_sft.lr", self.sparse_sft.lr),
            ("sparse_sft.indexer_lr", self.sparse_sft.indexer_lr),
        ]:
            if value < 0:
                raise ConfigError(f"warm_start.{name} must be >= 0, got {value}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The prompts and their reference answers: a built-in generator or a file."""

    task: str | None = "arithmetic"  # a built-in task generator (rl.tasks.TASKS) ...
    path: str | None = None  # ... or a JSONL / Parquet file of {prompt, reference}
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # the generator's arguments
    prompts_per_step: int = 8  # prompts a step; each gets samples_per_prompt responses
    seed: int = 0  # the generator's seed, or the file's shuffling


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """The rollout workers (Ray actors) and what they generate."""

    engine: Literal["native", "vllm"] = "native"  # the policy itself, or vLLM
    workers: int = 1  # rollout worker actors; prompts are sharded across them
    samples_per_prompt: int = 8  # G, the group size
    sampling: Sampling = field(default_factory=Sampling)  # rollout.Sampling itself
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the engine
    # 1: sample the next step while the learner trains on this one (its samples then lag the
    # learner by one update, which pi_old and OPSM account for); 0: strictly on-policy
    max_staleness: Literal[0, 1] = 0
    # weight sync: the learner's weights reach the workers in buckets of this many MiB, each
    # gathered from the learner's shards on its own (no rank holds the whole model for it)
    weight_bucket_mb: int = 512


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """The verifiers and how they run (docs/rewards.md)."""

    # {name, weight, label, kwargs} entries: a registered name or module:attr, combined as a
    # weighted mean over the verifiers that apply
    verifiers: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "math"}])
    timeout_s: float = 10.0  # per sample; a verifier that overruns is killed and scores 0
    # Verifier processes scoring at once (each sample in a killable process); 0: one per CPU
    # core of the machine the reward worker runs on.
    workers: int = 0


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """The Ray cluster and what each actor asks of it."""

    address: str | None = None  # None: start a local cluster; else join this one
    num_cpus: int | None = None  # for a local cluster
    rollout_cpus: float = 1.0  # per rollout worker
    rollout_gpus: float = 0.0  # per rollout worker
    learner_cpus: float = 1.0  # the learner actor's
    learner_gpus: float = 0.0  # per learner rank (set optim.device to cuda with it)
    # disaggregated: learner ranks and rollout workers on separate devices; colocated: rank i
    # and worker i share a bundle and its GPU, taking turns (rl/placement.py; on-policy only)
    placement: Literal["disaggregated", "colocated"] = "disaggregated"
    # how Ray places the bundles of the run's placement group across nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # seconds to wait for the cluster to reserve every bundle before giving up with an error
    reserve_timeout_s: float = 120.0
    # learner ranks: one process each, the policy sharded over them with FSDP2 (rl/sharded.py)
    learner_workers: int = 1


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Where metrics go (MLflow)."""

    mlflow_uri: str | None = None  # None: SQLite <run>/mlflow.db, artifacts in <run>/mlartifacts
    experiment: str = "keeprl"  # the MLflow experiment
    run_name: str | None = None  # None: the run directory's name


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """How often the run is saved (docs/runs.md)."""

    every: int = 10  # steps between checkpoints
    keep_last: int = 2  # newest checkpoints kept; 0 keeps every one


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Multi-turn tool-use episodes instead of single-turn prompts (rollout/episode.py)."""

    # module:attr of an environment spec or a family (seed -> spec), rewards/agent/spec.py;
    # null: the single-turn tasks of the data section
    environment: str | None = None
    environments: int = 64  # a family's environments: seeds 0 .. environments - 1
    max_turns: int = 8  # model turns an episode may take
    token_budget: int = 1024  # tokens an episode's context may reach
    step_timeout_s: float = 10.0  # seconds a tool call may take before the episode ends
    # the chat format episodes are rendered in (rollout/chat.py): "text" (plain role markers,
    # the character tokenizer) or "deepseek-v3.2" (needs a tokenizer with its special tokens)
    chat_template: Literal["text", "deepseek-v3.2"] = "text"
    thinking: bool = True  # deepseek-v3.2: each turn opens with <think> (reasoning kept)
    # text: end each task prompt with the tool list; false only for one fixed environment
    # whose tools the warm start teaches
    list_tools: bool = True
    # when a tool answer would pass token_budget: end the episode ("none", reward 0) or
    # rewrite the context and continue in a new segment sharing the episode's reward
    # (rollout/context.py: "summary", "discard_75", "discard_all")
    overflow: Literal["none", "summary", "discard_75", "discard_all"] = "none"


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """The run itself."""

    total_steps: int = 20  # RL steps (rollouts, rewards, learner update)
    output_dir: str = "runs/default"  # the run directory (docs/runs.md); one run owns it
    seed: int = 0  # model init and each step's sampling seed


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        _check(self)


def _check(cfg: ExperimentConfig) -> None:
    """Cross-field checks; each names the fix."""
    if (cfg.data.task is None) == (cfg.data.path is None):
        raise ConfigError(
            "data: set exactly one of data.task (a built-in generator) or "
            "data.path (a JSONL/Parquet file)"
        )
    s = cfg.rollout.sampling
    # On CPU the vLLM engine reads the kept set from its sampler (any size); on GPUs it reads
    # it from the top-N log-probs, which top-p alone cannot bound (rollout/vllm_engine.py).
    if cfg.rollout.engine == "vllm" and cfg.ray.rollout_gpus > 0 and s.top_p < 1 and s.top_k <= 0:
        raise ConfigError(
            "rollout.sampling: on GPUs the vLLM engine records the kept set from top-N "
            "logprobs, which top-p alone cannot bound; also set rollout.sampling.top_k"
        )
    if cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(
            "rollout.samples_per_prompt must be >= 2: GRPO's advantage compares "
            "samples of one prompt"
        )
    if s.seed is not None:
        raise ConfigError(
            "rollout.sampling.seed: each step samples with a seed derived from trainer.seed "
            "and the step; set trainer.seed instead"
        )
    if cfg.rewards.timeout_s <= 0:
        raise ConfigError(f"rewards.timeout_s must be > 0 seconds, got {cfg.rewards.timeout_s}")
    if cfg.rewards.workers < 0:
        raise ConfigError(
            f"rewards.workers must be >= 0 (0: one per CPU core), got {cfg.rewards.workers}"
        )
    if cfg.checkpoint.keep_last < 0:
        raise ConfigError(
            f"checkpoint.keep_last must be >= 0 (the newest checkpoints kept; 0 keeps all), "
            f"got {cfg.checkpoint.keep_last}"
        )
    try:  # resolve verifier plug-ins now, not at the first reward
        rewards.from_config(cfg.rewards.verifiers)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rewards.verifiers: {e}") from None
    if cfg.ray.placement == "colocated" and cfg.rollout.max_staleness:
        raise ConfigError(
            "ray.placement colocated takes turns on the same devices: rollout.max_staleness "
            f"must be 0, got {cfg.rollout.max_staleness}"
        )
    for s_ in cfg.eval.sets:
        if s_.verifiers is not None:
            try:
                rewards.from_config(s_.verifiers)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"eval.sets[{s_.name}].verifiers: {e}") from None
    if cfg.eval.sampling is not None and cfg.eval.sampling.seed is not None:
        raise ConfigError(
            "eval.sampling.seed: each eval set samples with a seed derived from trainer.seed "
            "and its name; set trainer.seed instead"
        )
    for s_ in cfg.eval.sets:
        if cfg.agent.environment and s_.environment is None:
            raise ConfigError(
                f"eval.sets[{s_.name}]: an agent run (agent.environment) evaluates held-out "
                "tasks of an environment: give the set an environment, not a task or path"
            )
        if not cfg.agent.environment and s_.environment is not None:
            raise ConfigError(
                f"eval.sets[{s_.name}].environment: only agent runs (agent.environment) run "
                "environment sets; give a task or a path"
            )
        if s_.environment is not None and s_.verifiers is not None:
            raise ConfigError(
                f"eval.sets[{s_.name}].verifiers: an environment set is judged by its "
                "environment; remove verifiers"
            )
    if cfg.agent.step_timeout_s <= 0:
        raise ConfigError(f"agent.step_timeout_s must be > 0, got {cfg.agent.step_timeout_s}")
    if cfg.ray.reserve_timeout_s <= 0:
        raise ConfigError(f"ray.reserve_timeout_s must be > 0, got {cfg.ray.reserve_timeout_s}")
    for name, value in [
        ("trainer.total_steps", cfg.trainer.total_steps),
        ("checkpoint.every", cfg.checkpoint.every),
        ("rollout.workers", cfg.rollout.workers),
        ("data.prompts_per_step", cfg.data.prompts_per_step),
        ("rollout.weight_bucket_mb", cfg.rollout.weight_bucket_mb),
        ("agent.environments", cfg.agent.environments),
        ("agent.max_turns", cfg.agent.max_turns),
        ("agent.token_budget", cfg.agent.token_budget),
    ]:
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


# ---- building dataclasses from plain data -------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """value checked (and, for dataclasses, built) against the annotation tp."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: expected a mapping of {tp.__name__} keys, got {type(value).__name__}"
            )
        return build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (dict, list):
        if not isinstance(value, origin):
            raise ConfigError(f"{path}: expected a {origin.__name__}, got {value!r}")
        if origin is list and args and dataclasses.is_dataclass(args[0]):  # eval.sets
            return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        return value
    if origin is tuple:  # optim.betas: [0.9, 0.95]; rollout.sampling.stop_token_ids: [2, 7]
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{path}: expected a list, got {value!r}")
            args = (args[0],) * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in pairs)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads `1e-5` (no dot) as a string; it is a float to any reader
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def build(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`, strictly (unknown keys, wrong types fail)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = (
                f"; did you mean '{path + '.' if path else ''}{close[0]}'?"
                if close
                else (f"; valid keys: {', '.join(names)}")
            )
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        msg = str(e)
        if path and msg.split(" ", 1)[0] in names:  # "lr must be ...": name the key in full
            raise ConfigError(f"{path}.{msg}") from None
        raise ConfigError(f"{path or 'config'}: {msg}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to nested dict data."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw else None
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config (None: all defaults) with `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: YAML syntax error{where}: {what}") from None
        if data is None:
            raise ConfigError(
                f"{path}: the config file is empty; give at least the sections you change "
                "(see configs/)"
            )
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if isinstance(data.get("rewards"), list):
            raise ConfigError(
                f"{path}: 'rewards' is a section, not a list: put the verifier list under "
                "rewards.verifiers (rewards: {verifiers: [...]})"
            )
    return build(ExperimentConfig, apply_overrides(data, overrides or []))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (for logging, MLflow params and resume); tuples
    become lists, as YAML reads them back."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
