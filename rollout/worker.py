"""Ray rollout workers: N engine actors share each batch of prompts and survive worker deaths.

`RolloutWorker` is a Ray actor that builds its engine inside its own process from a picklable
`EngineSpec` (engine name, checkpoint directory, keyword arguments), so model weights, CUDA
state and vLLM servers never cross process boundaries. `RolloutPool` is the driver side:

- it starts the actors (Ray resources per actor from `num_cpus` / `num_gpus`) on the Ray
  cluster at `address`, or on a local one it starts when none is running;
- `generate(prompts, sampling, n)` splits the prompts into contiguous shards, one per worker,
  and returns every trajectory in prompt-major order, exactly as one engine would;
- `update_weights(state_dict_or_dir, version)` broadcasts new weights (a state dict goes into
  the object store once, with `ray.put`, and every worker reads that one copy; an ObjectRef,
  say from the learner actor, is passed on as it is);
- a worker that dies (its task fails with `RayActorError` or `WorkerCrashedError`) is killed
  for good, replaced by a new actor brought to the current weight version, and its shards are
  re-issued to the replacement. More than `max_restarts` deaths in one call is a
  `WorkerDiedError` naming the prompts still missing; nothing is ever dropped silently.

Ray's own actor restarts are off: a restarted actor would come back with the checkpoint's
weights, not the pushed ones. Every returned trajectory is checked against the batch (its
prompt ids and the pushed weight version), so a reordering or a stale replacement is an error,
not a quiet off-policy sample. With a seed, shard [a, b) samples with seed + a, so shards do
not replay each other's random stream and a re-issued shard gets its own seed back.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, WorkerCrashedError

from .trajectory import Engine, Sampling, Trajectory
from .weights import WeightStaging, WeightSyncError

log = logging.getLogger(__name__)

# Engines by name; anything else is a "module:attr" path or a picklable factory.
ENGINES: dict[str, str] = {
    "native": "rollout.native:NativeEngine",
    "vllm": "rollout.vllm_engine:VLLMEngine",
}
# What a dead or unreachable actor looks like to the caller of one of its tasks.
WORKER_DEATH = (RayActorError, WorkerCrashedError)


class WorkerDiedError(RuntimeError):
    """Rollout workers kept dying: more deaths in one call than the pool may replace."""


@dataclass(frozen=True)
class EngineSpec:
    """How a worker builds its engine: `factory(checkpoint_dir, **kwargs)`.

    engine is a name from ENGINES ("native", "vllm"), a "module:attr" path, or a picklable
    callable. Only this small record travels to the actor.
    """

    engine: str | Callable[..., Engine]
    checkpoint_dir: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: EngineSpec | Sequence[Any]) -> EngineSpec:
        """Accept an EngineSpec or a tuple (engine, checkpoint_dir[, kwargs])."""
        if isinstance(spec, EngineSpec):
            return spec
        if not 2 <= len(spec) <= 3:
            raise ValueError(f"engine spec {spec!r}: expected (engine, checkpoint_dir[, kwargs])")
        return cls(spec[0], str(spec[1]), dict(spec[2]) if len(spec) == 3 else {})

    def build(self) -> Engine:
        """Construct the engine (inside the actor's process)."""
        return resolve_engine(self.engine)(self.checkpoint_dir, **self.kwargs)


def resolve_engine(engine: str | Callable[..., Engine]) -> Callable[..., Engine]:
    """The engine factory named by `engine` (see EngineSpec)."""
    if callable(engine):
        return engine
    path = ENGINES.get(engine, engine)
    module, sep, attr = path.partition(":")
    if not sep:
        raise ValueError(f"unknown engine {engine!r}: use one of {sorted(ENGINES)} or module:attr")
    return getattr(importlib.import_module(module), attr)


class RolloutWorker:
    """One engine in one Ray actor process. Created through RolloutPool, not directly."""

    def __init__(self, spec: EngineSpec, slot: int = 0) -> None:
        self.engine = spec.build()
        self.slot = slot
        self._staging: WeightStaging | None = None

    def generate(self, prompts: list[list[int]], sampling: Sampling, n: int) -> list[Trajectory]:
        return self.engine.generate(prompts, sampling, n)

    def update_weights(self, source: Any, version: int) -> str:
        return self.engine.update_weights(source, version)

    def weight_version(self) -> int:
        return self.engine.weight_version

    # A streamed sync (RolloutPool.stream_weights): announce, buckets, commit. The engine
    # keeps serving its current weights until the commit loads the complete new set.
    def begin_weights(self, version: int, names: list[str]) -> None:
        self._staging = WeightStaging(version, names)

    def add_weights(self, version: int, bucket: dict[str, torch.Tensor]) -> None:
        if self._staging is None:
            raise WeightSyncError(f"a bucket of weight version {version} arrived unannounced")
        self._staging.add(version, bucket)

    def commit_weights(self, version: int) -> str:
        if self._staging is None:
            raise WeightSyncError(f"commit of weight version {version} with nothing staged")
        state = self._staging.complete(version)
        self._staging = None  # the staged copy goes as soon as the engine holds the weights
        return self.engine.update_weights(state, version)

    def release(self) -> bool:
        """Free the engine's device memory while the learner steps on the same GPU; False
        when the engine holds none (on the CPU) or cannot."""
        release = getattr(self.engine, "release", None)
        return bool(release()) if release is not None else False

    def resume(self) -> bool:
        resume = getattr(self.engine, "resume", None)
        return bool(resume()) if resume is not None else False

    def close(self) -> None:
        """Release the engine's resources (vLLM's work directory) before the actor goes."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def info(self) -> dict[str, Any]:
        """Where this worker runs and what it serves (also a readiness probe)."""
        return {
            "slot": self.slot,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "engine": self.engine.name,
            "weight_version": self.engine.weight_version,
        }


def split_shards(num_prompts: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty [start, end) ranges covering the prompts, sizes within one."""
    num_shards = max(1, min(num_shards, num_prompts))
    bounds = [num_prompts * k // num_shards for k in range(num_shards + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


class RolloutPool:
    """N RolloutWorker actors behind one engine-like interface (generate / update_weights /
    weight_version), replacing workers that die.

    address: a Ray cluster to join (None starts a local one unless Ray is already running);
    ray_init_kwargs go to ray.init. max_restarts bounds the replacements within one call.
    """

    def __init__(
        self,
        spec: EngineSpec | Sequence[Any],
        num_workers: int = 1,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        address: str | None = None,
        max_restarts: int = 3,
        ray_init_kwargs: dict[str, Any] | None = None,
        placement: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, **(ray_init_kwargs or {}))
        self.spec = EngineSpec.of(spec)
        self.max_restarts = max_restarts
        self.restarts = 0  # replacements over the pool's life, for metrics
        # max_restarts=0: Ray must not resurrect an actor behind our back (see module doc).
        self._remote = ray.remote(RolloutWorker)
        self._options = dict(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0
        )
        # placement(slot): the slot's bundle of a placement group (rl/placement.py), which a
        # replacement takes over from the actor it replaces.
        self._placement = placement
        self._weights: tuple[Any, int] | None = None  # (object ref or directory, version)
        self.workers = [self._new_actor(slot) for slot in range(num_workers)]
        infos = ray.get([w.info.remote() for w in self.workers])  # construction errors surface
        self.name = infos[0]["engine"]
        self.weight_version: int = infos[0]["weight_version"]

    # --- weights ---------------------------------------------------------------------------

    def update_weights(self, source: Any, version: int) -> str:
        """Push a state dict, an ObjectRef to one (e.g. from the learner actor, so the weights
        never pass through this process) or a checkpoint directory (readable from every node)
        to every worker; returns the route(s) the engines took, e.g. "in-place"."""
        if isinstance(source, (str, Path)):
            payload: Any = str(source)
        elif isinstance(source, ray.ObjectRef):
            payload = source
        else:
            payload = ray.put(source)  # one copy in the object store, read by every worker
        self._weights = (payload, version)
        pending = {
            w.update_weights.remote(payload, version): slot for slot, w in enumerate(self.workers)
        }
        routes = self._await_pushes(pending, f"pushing weights version {version}")
        self.weight_version = version
        return ", ".join(sorted(routes))

    def _await_pushes(self, pending: dict[Any, int], doing: str) -> set[str]:
        """Wait for every worker's push (ref -> slot); a worker that dies is replaced, the
        replacement given the current weights as it starts, and that push awaited instead.
        The routes the engines took."""
        routes: set[str] = set()
        deaths = 0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            slot = pending.pop(ref)
            try:
                routes.add(ray.get(ref))
            except WORKER_DEATH as e:
                deaths = self._count_death(deaths, e, doing)
                pending[self._replace(slot, self.workers[slot])] = slot
        return routes

    def stream_weights(self, learner: Any, version: int, bucket_bytes: int) -> str:
        """Push the learner actor's weights bucket by bucket (`weight_bucket_names`,
        `weight_bucket`: rl.trainer.LearnerService or rl.sharded.ShardedLearnerGroup), each
        gathered from the learner's shards on its own and tagged with `version`; every worker
        stages them and loads the complete set at commit. The buckets' refs are kept until the
        next sync, so a worker replaced later gets the same weights."""
        # The learner checks the version before naming the buckets, and again for each one.
        buckets = ray.get(learner.weight_bucket_names.remote(bucket_bytes, version))
        names = [n for b in buckets for n in b]
        # Actor calls run in submission order: the learner gathers bucket after bucket while
        # the workers fetch the earlier ones; each worker's add calls precede its commit.
        refs = [learner.weight_bucket.remote(b, version) for b in buckets]
        previous, self._weights = self._weights, (("stream", names, refs), version)
        pending = {self._stream_to(w, names, refs, version): s for s, w in enumerate(self.workers)}
        try:
            routes = self._await_pushes(pending, f"streaming weights version {version}")
        except BaseException:
            self._weights = previous  # a replacement must get weights that did arrive
            raise
        self.weight_version = version
        return ", ".join(sorted(routes))

    @staticmethod
    def _stream_to(worker: Any, names: list[str], refs: list[Any], version: int) -> Any:
        """Queue a streamed sync on one worker; its commit's ref."""
        worker.begin_weights.remote(version, names)
        for ref in refs:
            worker.add_weights.remote(version, ref)
        return worker.commit_weights.remote(version)

    def weight_versions(self) -> list[int]:
        """Every worker's weight version, as the engines report it."""
        return ray.get([w.weight_version.remote() for w in self.workers])

    # --- generation ------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, n: int = 1
    ) -> list[Trajectory]:
        """n trajectories per prompt, prompt-major, prompt_index the index into `prompts`."""
        shards = split_shards(len(prompts), len(self.workers))
        results: list[list[Trajectory] | None] = [None] * len(shards)
        pending: dict[Any, tuple[int, int, Any]] = {}  # ref -> (shard, slot, actor)

        def submit(k: int, slot: int) -> None:
            a, b = shards[k]
            seeded = sampling
            if sampling.seed is not None:
                seeded = dataclasses.replace(sampling, seed=sampling.seed + a)
            actor = self.workers[slot]
            ref = actor.generate.remote([list(p) for p in prompts[a:b]], seeded, n)
            pending[ref] = (k, slot, actor)

        for k in range(len(shards)):
            submit(k, k % len(self.workers))
        deaths = 0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            k, slot, actor = pending.pop(ref)
            try:
                out = ray.get(ref)
            except WORKER_DEATH as e:
                a, b = shards[k]
                if self.workers[slot] is actor:  # first news of this death: replace once
                    missing = [list(s) for s, r in zip(shards, results, strict=True) if r is None]
                    doing = f"generating prompts [{a}, {b}) (still missing: {missing})"
                    deaths = self._count_death(deaths, e, doing)
                    self._replace(slot, actor)
                submit(k, slot)
                continue
            results[k] = self._checked(out, shards[k], prompts, n)
        return [t for shard in results for t in shard]

    def _checked(
        self, out: list[Trajectory], shard: tuple[int, int], prompts: list[list[int]], n: int
    ) -> list[Trajectory]:
        """Renumber a shard's trajectories into the batch, refusing anything out of place."""
        a, b = shard
        if len(out) != (b - a) * n:
            raise RuntimeError(
                f"worker returned {len(out)} trajectories for prompts [{a}, {b}) x n={n}"
            )
        for i, t in enumerate(out):
            index = a + i // n
            if list(t.prompt_ids) != list(prompts[index]):
                raise RuntimeError(
                    f"trajectory {i} of prompts [{a}, {b}) is not for prompt {index}: "
                    "the engine broke prompt-major order"
                )
            if self._weights is not None and t.weight_version != self._weights[1]:
                raise RuntimeError(
                    f"prompt {index} was sampled with weight version {t.weight_version}, "
                    f"but version {self._weights[1]} was pushed"
                )
            t.prompt_index = index
        return out

    # --- worker lifecycle ------------------------------------------------------------------

    def _count_death(self, deaths: int, error: Exception, doing: str) -> int:
        deaths += 1
        if deaths > self.max_restarts:
            raise WorkerDiedError(
                f"rollout workers died {deaths} times while {doing} (max_restarts="
                f"{self.max_restarts}); last death: {str(error).splitlines()[0]}"
            ) from error
        return deaths

    def _replace(self, slot: int, dead: Any) -> Any:
        """Put a new actor in `slot`, queue the current weights on it (its tasks run in
        submission order, so they land before any generate), return that push's ref."""
        # An unreachable actor must not come back later and hold on to its CPUs or GPUs.
        ray.kill(dead, no_restart=True)
        self.restarts += 1
        actor = self._new_actor(slot)
        self.workers[slot] = actor
        if self._weights is None:
            return actor.weight_version.remote()
        payload, version = self._weights
        if isinstance(payload, tuple) and payload[0] == "stream":
            return self._stream_to(actor, payload[1], payload[2], version)
        return actor.update_weights.remote(payload, version)

    def _new_actor(self, slot: int) -> Any:
        extra = self._placement(slot) if self._placement is not None else {}
        return self._remote.options(**{**self._options, **extra}).remote(self.spec, slot)

    # --- colocated placement ---------------------------------------------------------------

    def release(self) -> list[bool]:
        """Every engine frees its device memory for the learner (colocated placement); per
        worker, whether its engine had any to free."""
        return ray.get([w.release.remote() for w in self.workers])

    def resume(self) -> list[bool]:
        """Every engine takes its device memory back (after release)."""
        return ray.get([w.resume.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Close, then kill the workers (and Ray itself when this pool started it)."""
        closing = [w.close.remote() for w in self.workers]
        try:  # a clean close removes what the engines keep on disk; a dead one cannot
            ray.get(closing, timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.warning("rollout workers did not all close cleanly: %s", str(e).splitlines()[0])
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()
