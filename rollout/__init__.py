"""rollout: generation engines, the Trajectory record, the Parquet rollout store, Ray workers.

Every engine returns the same `Trajectory`: token ids, the sampler's log-probs (pi_old), the
MoE routing of every token and the top-k/top-p kept ids of every sampled position.
"""

from .native import NativeEngine
from .trajectory import Engine, Sampling, Trajectory, compact_routing

__all__ = ["Engine", "NativeEngine", "Sampling", "Trajectory", "VLLMEngine", "compact_routing"]


def __getattr__(name: str):  # VLLMEngine imports vllm, which is heavy: only on first use
    if name == "VLLMEngine":
        from .vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
