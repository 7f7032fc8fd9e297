"""Where the learner ranks and rollout workers run: one Ray placement group reserves all their
resources before any of them starts, so a run either gets its whole cluster share at once or
says at start what it cannot get (rather than leaving actors pending forever), and a
replacement actor lands in the bundle its predecessor held.

`ray.placement` chooses the layout:
- "disaggregated": a bundle per learner rank ({CPU: learner_cpus, GPU: learner_gpus}) and one
  per rollout worker ({CPU: rollout_cpus, GPU: rollout_gpus}); learner and sampling never share
  a device.
- "colocated": max(learner ranks, rollout workers) bundles, learner rank i and rollout worker i
  sharing bundle i and its GPU (each actor asks half of it, so the two fit in the bundle). The
  trainer releases the rollout engines' device memory while the learner steps
  (RolloutPool.release / resume), so sampling and training take turns on the same GPUs;
  colocated runs are on-policy (rollout.max_staleness 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, ExperimentConfig

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """A ready placement group and which bundle each actor goes to."""

    group: Any  # ray.util.placement_group.PlacementGroup
    learner_bundles: list[int]
    rollout_bundles: list[int]
    colocated: bool
    learner_gpus: float  # what each learner rank asks (halved when colocated)
    rollout_gpus: float

    def _in(self, bundle: int) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle
        )
        return {"scheduling_strategy": strategy}

    def learner(self, rank: int) -> dict[str, Any]:
        """`.options(...)` for learner rank `rank`'s actor (resources and its bundle)."""
        return {"num_gpus": self.learner_gpus, **self._in(self.learner_bundles[rank])}

    def rollout(self, slot: int) -> dict[str, Any]:
        """`.options(...)` for rollout worker `slot` (resources and its bundle)."""
        return {"num_gpus": self.rollout_gpus, **self._in(self.rollout_bundles[slot])}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


def bundles_for(cfg: ExperimentConfig) -> tuple[list[dict[str, float]], list[int], list[int]]:
    """The placement group's bundles and the learner ranks' and rollout workers' indices."""
    r = cfg.ray
    ranks, workers = r.learner_workers, cfg.rollout.workers

    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    if r.placement == "colocated":
        n = max(ranks, workers)
        shared = bundle(r.learner_cpus + r.rollout_cpus, max(r.learner_gpus, r.rollout_gpus))
        return [dict(shared) for _ in range(n)], list(range(ranks)), list(range(workers))
    learner = [bundle(r.learner_cpus, r.learner_gpus) for _ in range(ranks)]
    rollout = [bundle(r.rollout_cpus, r.rollout_gpus) for _ in range(workers)]
    return learner + rollout, list(range(ranks)), list(range(ranks, ranks + workers))


def reserve(cfg: ExperimentConfig) -> Placement:
    """Reserve the run's resources in one placement group (Ray must be initialised); a
    ConfigError naming what was asked and what the cluster has if it is not ready within
    ray.reserve_timeout_s."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles, learner_idx, rollout_idx = bundles_for(cfg)
    group = placement_group(bundles, strategy=cfg.ray.placement_strategy)
    try:
        ray.get(group.ready(), timeout=cfg.ray.reserve_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        total: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0) + v
        have = {k: v for k, v in ray.cluster_resources().items() if k in total}
        raise ConfigError(
            f"ray: could not reserve {len(bundles)} bundles ({cfg.ray.placement}, "
            f"{cfg.ray.placement_strategy}) totalling {total} within "
            f"{cfg.ray.reserve_timeout_s:g} s; the cluster has {have}"
        ) from None
    colocated = cfg.ray.placement == "colocated"
    share = 0.5 if colocated and cfg.ray.learner_gpus and cfg.ray.rollout_gpus else 1.0
    log.info("placement group ready: %d bundles, %s", len(bundles), cfg.ray.placement)
    return Placement(
        group,
        learner_idx,
        rollout_idx,
        colocated,
        cfg.ray.learner_gpus * share,
        cfg.ray.rollout_gpus * share,
    )
