"""Small seeded policies and reference data for tests, benchmarks and examples.

`tiny_policy(seed)` is the `tiny` preset built under `torch.manual_seed(seed)` with its MoE
selection bias (`e_score_correction_bias`) drawn non-zero, so that routing exercises the
split between the biased top-k selection and the unbiased gate weights: with the bias left at
zero, as a fresh model has it, a bug that mixed the two would go unseen.

`RELEASED_CONFIG` is the released DeepSeek-V3.2 config.json, key for key, for checking that
what keeprl reads and writes matches the real checkpoint layout without downloading it.
"""

from __future__ import annotations

from typing import Any

import torch

from .args import preset
from .model import Transformer


def tiny_policy(
    seed: int = 0,
    *,
    bias_std: float = 0.05,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Transformer:
    """The tiny preset (with `overrides`), seeded, its MoE selection bias ~ N(0, bias_std),
    in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **overrides)).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.normal_(0, bias_std)
    return model.eval()


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
