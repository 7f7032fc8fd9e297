"""rollout: generation engines, the Trajectory record, the Parquet rollout store, Ray workers.

Every engine returns the same `Trajectory`: token ids, the sampler's log-probs (pi_old), the
MoE routing of every token and the top-k/top-p kept ids of every sampled position.
"""

from .native import NativeEngine
from .store import RolloutStore, StepRollouts, read_file
from .trajectory import Engine, Sampling, Trajectory, compact_routing

__all__ = [
    "Engine",
    "EngineSpec",
    "NativeEngine",
    "RolloutPool",
    "RolloutStore",
    "RolloutWorker",
    "Sampling",
    "StepRollouts",
    "Trajectory",
    "VLLMEngine",
    "WorkerDiedError",
    "compact_routing",
    "read_file",
]
_WORKER_NAMES = ("EngineSpec", "RolloutPool", "RolloutWorker", "WorkerDiedError")


def __getattr__(name: str):  # vllm and ray are heavy imports: only on first use
    if name == "VLLMEngine":
        from .vllm_engine import VLLMEngine

        return VLLMEngine
    if name in _WORKER_NAMES:
        from . import worker

        return getattr(worker, name)
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
