"""ModelArgs: the one configuration record of the DSA policy.

Field names are the keys of the DeepSeek-V3.2 Hugging Face `config.json`, so a real checkpoint's
config reads straight into this dataclass and a config we write reads straight into HF tools and
vLLM. `ModelArgs.from_json` is strict about keys that change the computation: a key we do not
implement (or implement only for one value) is an error naming it; keys that only matter to
other tools are ignored and listed in `ModelArgs.ignored_keys`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HF keys that do not change the forward computation; read, ignored, and reported.
HARMLESS_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "initializer_range",
        "attention_dropout",
        "pretraining_tp",
        "ep_size",
        "num_key_value_heads",
        "head_dim",
        "qk_head_dim",
        "aux_loss_alpha",
        "seq_aux",
        "output_router_logits",
        "router_aux_loss_coef",
        "mlp_layer_types",
        "layer_types",
        "name_or_path",
        "_name_or_path",
        "quantization_config",  # consumed by policy.checkpoint (FP8 block dequantisation)
    }
)

# HF keys we implement for exactly one value: anything else is an error, not a silent mismatch.
FIXED_KEYS: dict[str, Any] = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "moe_layer_freq": 1,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rope_interleave": True,
}


@dataclass(kw_only=True)
class ModelArgs:
    """Architecture of a DeepSeek-V3.2-style DSA model (MLA + lightning indexer + sigmoid MoE).

    Grouped as in the paper; every name is the HF config.json key. Shapes below use
    D = hidden_size, H = num_attention_heads, E = n_routed_experts.
    """

    # Trunk.
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    intermediate_size: int  # dense SwiGLU FFN width (first_k_dense_replace blocks)
    rms_norm_eps: float = 1e-6
    # MLA.
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # Lightning indexer (DSA).
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    indexer_rope_interleave: bool = False
    # MoE.
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool = True
    # Positions.
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int
    # Multi-token prediction blocks stored after the trunk; this policy has none and skips them.
    num_nextn_predict_layers: int = 0
    # Keys read by from_json that were ignored (not part of the architecture).
    ignored_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def yarn(self) -> dict[str, float] | None:
        """The YaRN parameters, or None when RoPE is unscaled."""
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) in (None, "default"):
            return None
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
            "beta_fast": float(rs.get("beta_fast", 32)),
            "beta_slow": float(rs.get("beta_slow", 1)),
            "mscale": float(rs.get("mscale", 1)),
            "mscale_all_dim": float(rs.get("mscale_all_dim", 0)),
        }

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-0.5, times mscale^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y is not None and y["factor"] > 1:
            mscale = 0.1 * y["mscale_all_dim"] * math.log(y["factor"]) + 1.0
            scale *= mscale * mscale
        return scale

    def moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        """Cross-field checks; each message names the fix."""
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} must divide into n_group={self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ValueError(
                "group-limited routing scores a group by its top-2 experts: use >= 2 "
                f"experts per group (n_routed_experts / n_group = {per_group})"
            )
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group="
                f"{self.topk_group} groups ({self.topk_group * per_group})"
            )
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(
                f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                f"{self.qk_rope_head_dim}: the indexer ropes its first qk_rope_head_dim dims"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError("first_k_dense_replace must be in [0, num_hidden_layers]")
        if self.index_topk < 1:
            raise ValueError(f"index_topk={self.index_topk} must be >= 1")

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, strict: bool = True) -> ModelArgs:
        """Build from an HF-style config dict.

        Fields are taken by name; `rope_parameters` (newer HF) is folded into rope_theta and
        rope_scaling. Keys in FIXED_KEYS must hold the one value we implement. Any other key
        that is neither a field nor known-harmless is an error (with the closest field name)
        unless strict=False, in which case it is ignored and listed.
        """
        cfg = dict(cfg)
        names = {f.name for f in dataclasses.fields(cls) if f.name != "ignored_keys"}
        rope_params = cfg.pop("rope_parameters", None)
        if rope_params:
            cfg.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
            if rope_params.get("rope_type", "default") != "default":
                cfg.setdefault(
                    "rope_scaling", {k: v for k, v in rope_params.items() if k != "rope_theta"}
                )
        kwargs: dict[str, Any] = {}
        ignored: list[str] = []
        for key, value in cfg.items():
            if key in names:
                kwargs[key] = value
            elif key in FIXED_KEYS:
                if value != FIXED_KEYS[key]:
                    raise ValueError(
                        f"config key {key!r}={value!r} is not supported: keeprl implements only "
                        f"{key}={FIXED_KEYS[key]!r}"
                    )
            elif key in HARMLESS_KEYS or not strict:
                ignored.append(key)
            else:
                close = difflib.get_close_matches(key, sorted(names | set(FIXED_KEYS)), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown config key {key!r} may change the architecture{hint} "
                    "(pass strict=False to ignore it)"
                )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"config is missing required keys: {', '.join(missing)}")
        if kwargs.get("q_lora_rank") is None:
            raise ValueError(
                "q_lora_rank=None (uncompressed queries) is not supported: the "
                "lightning indexer reads the compressed query"
            )
        rs = kwargs.get("rope_scaling")
        if rs and rs.get("type", rs.get("rope_type")) not in (None, "default", "yarn"):
            raise ValueError(f"rope_scaling type {rs!r} is not supported: use 'yarn' or none")
        return cls(**kwargs, ignored_keys=tuple(sorted(ignored)))

    @classmethod
    def from_json(cls, path: str | Path, *, strict: bool = True) -> ModelArgs:
        """Read a DeepSeek-V3.2 style config.json (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as f:
            cfg = json.load(f)
        try:
            return cls.from_dict(cfg, strict=strict)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json content: our fields plus the fixed keys HF tools and vLLM read."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("ignored_keys")
        out.update(FIXED_KEYS)
        out.update(
            architectures=["DeepseekV32ForCausalLM"],
            model_type="deepseek_v32",
            num_key_value_heads=self.num_attention_heads,
            bos_token_id=0,
            eos_token_id=1,
        )
        return dict(sorted(out.items()))

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for 2 CPU cores; kv_lora_rank 512 and qk_rope_head_dim 64 so vLLM's CPU
    # MLA backend (which needs a 576-dim cached entry) can serve it.
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        intermediate_size=256,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=512,
        qk_nope_head_dim=32,
        qk_rope_head_dim=64,
        v_head_dim=32,
        index_n_heads=4,
        index_head_dim=64,
        index_topk=256,
        moe_intermediate_size=64,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        max_position_embeddings=2048,
    ),
    # The published DeepSeek-V3.2 values (671B parameters plus the indexers).
    "deepseek-v3.2": dict(
        vocab_size=129280,
        hidden_size=7168,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        intermediate_size=18432,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=2048,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=163840,
        num_nextn_predict_layers=1,
    ),
}


def preset(name: str, **overrides: Any) -> ModelArgs:
    """A named preset (`tiny`, `deepseek-v3.2`), optionally with fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})
