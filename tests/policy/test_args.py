"""ModelArgs: presets, the HF config.json reader's strictness, and derived quantities."""

from __future__ import annotations

import json
import math

import pytest

from policy import ModelArgs, preset

# The released DeepSeek-V3.2 config.json, key for key (values from the model card).
RELEASED_CONFIG = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v32",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.2",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


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
