"""ModelArgs: presets, the HF config.json reader's strictness, and derived quantities."""

from __future__ import annotations

import json
import math

import pytest

from policy import ModelArgs, preset
from policy.testing import RELEASED_CONFIG


def test_released_config_reads_and_matches_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASED_CONFIG))
    args = ModelArgs.from_json(tmp_path)
    assert args == preset("deepseek-v3.2")
    assert "quantization_config" in args.ignored_keys and "use_cache" in args.ignored_keys
    assert args.n_moe_layers == 58 and args.qk_head_dim == 192


def test_yarn_softmax_scale():
    args = preset("deepseek-v3.2")
    mscale = 0.1 * math.log(40) + 1
    assert args.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    assert preset("tiny").softmax_scale == pytest.approx(96**-0.5)


def test_to_dict_round_trip():
    for name in ("tiny", "deepseek-v3.2"):
        args = preset(name)
        assert ModelArgs.from_dict(json.loads(json.dumps(args.to_dict()))) == args


def test_newer_rope_parameters_form():
    cfg = dict(RELEASED_CONFIG)
    scaling = cfg.pop("rope_scaling")
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": 10000, "rope_type": "yarn", **scaling}
    args = ModelArgs.from_dict(cfg)
    assert args.yarn["factor"] == 40 and args.rope_theta == 10000


def test_misspelled_key_names_the_closest_field():
    cfg = dict(RELEASED_CONFIG, index_top_k=1024)
    with pytest.raises(ValueError, match=r"index_top_k.*did you mean 'index_topk'"):
        ModelArgs.from_dict(cfg)
    assert "index_top_k" in ModelArgs.from_dict(cfg, strict=False).ignored_keys


@pytest.mark.parametrize(
    "key,value",
    [
        ("scoring_func", "softmax"),
        ("tie_word_embeddings", True),
        ("hidden_act", "gelu"),
        ("attention_bias", True),
        ("moe_layer_freq", 2),
    ],
)
def test_unsupported_values_are_errors(key, value):
    with pytest.raises(ValueError, match=key):
        ModelArgs.from_dict(dict(RELEASED_CONFIG, **{key: value}))


def test_missing_and_inconsistent_fields():
    cfg = dict(RELEASED_CONFIG)
    del cfg["kv_lora_rank"]
    with pytest.raises(ValueError, match="missing required keys: kv_lora_rank"):
        ModelArgs.from_dict(cfg)
    with pytest.raises(ValueError, match="n_group"):
        preset("tiny", n_group=3)
    with pytest.raises(ValueError, match="index_head_dim"):
        preset("tiny", index_head_dim=32)
    with pytest.raises(ValueError, match="q_lora_rank"):
        ModelArgs.from_dict(dict(RELEASED_CONFIG, q_lora_rank=None))


def test_tiny_preset_fits_vllm_cpu_mla():
    args = preset("tiny")
    assert args.kv_lora_rank + args.qk_rope_head_dim == 576
