"""rollout: generation engines, the Trajectory record, the Parquet rollout store, Ray workers.

Every engine returns the same `Trajectory`: token ids, the sampler's log-probs (pi_old), the
MoE routing of every token and the top-k/top-p kept ids of every sampled position.
"""

from .trajectory import Engine, Sampling, Trajectory, compact_routing

__all__ = ["Engine", "Sampling", "Trajectory", "compact_routing"]
