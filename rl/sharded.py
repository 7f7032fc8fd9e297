"""The sharded learner: N processes forming one torch.distributed group, the policy sharded with
FSDP2 (`fully_shard` per block and at the root), each rank training on its share of the batch.

Data parallelism over a GRPO batch: every rank receives the whole batch, so advantages and the
loss normalisation (sequences and tokens of the whole batch) are the single-process ones; rank r
trains on rows r, r + N, ... FSDP2 averages the ranks' gradients, so each rank's partial loss is
scaled by N to make the update the single-process sum; the step's metrics are summed (maxima
maxed) over the ranks. NCCL on GPUs, gloo on CPUs.

`LearnerWorker` is one rank as a Ray actor; `ShardedLearnerGroup` drives N of them with the same
methods the trainer's single learner actor has (step, state_dict, save_checkpoint).
Checkpoints: each rank writes its optimizer shards with torch.distributed.checkpoint, rank 0 the
gathered weights in the serving layout; a checkpoint loads on any number of ranks (DCP
reshards; a single process reads the shards too).
"""

from __future__ import annotations

import copy
import datetime
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from policy import Transformer, load_pretrained

from . import checkpoint as ckpt
from .batch import Batch
from .learner import Learner, LearnerConfig
from .weights import WeightVersion, bucket_names, gather_bucket

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shard(model: Transformer) -> Transformer:
    """FSDP2 over the policy: each block its own unit (gathered for its forward and backward,
    resharded after), the embeddings, final norm and LM head in the root unit. Parameters are
    gathered and used in their own dtype; gradients are reduce-scattered in float32 (a bf16
    sum over many ranks would round away the small contributions) and kept in the
    parameters' dtype. (One rank has nothing to sum: no float32 copy of a block's gradients.)"""
    many = dist.is_initialized() and dist.get_world_size() > 1
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32 if many else None)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


class ShardedLearner(Learner):
    """A Learner on one rank of an initialised process group (see the module docstring)."""

    # AdamW fused on CUDA as in one process: under FSDP2 at one rank it measured 1.09-1.10x
    # the tokens/s of torch's default at the same peak memory (the backward's; docs/benchmarks.md)
    fused_adamw = True

    def __init__(self, policy: Transformer, cfg: LearnerConfig) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        reference = None
        if cfg.algorithm.beta > 0:  # sharded like the policy, before the policy is
            reference = shard(copy.deepcopy(policy)).eval().requires_grad_(False)
        super().__init__(shard(policy), cfg, reference)
        self.loss_scale = float(self.world)

    def rows(self, batch: Batch) -> list[int]:
        if batch.size < self.world:
            raise ValueError(f"a batch of {batch.size} rows cannot feed {self.world} ranks")
        return list(range(self.rank, batch.size, self.world))

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole policy's weights on the CPU, on rank 0 (empty elsewhere); every rank must
        call it (it gathers the shards)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.policy, options=options)


class LearnerWorker:
    """One rank of the sharded learner, as a Ray actor (created by ShardedLearnerGroup):
    `address()` (rank 0: a free port on its node for the rendezvous), then `setup(...)` on
    every rank at once, then the learner's methods."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.learner: ShardedLearner | None = None

    def address(self) -> str:
        """host:port of a free TCP port on this actor's node."""
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def setup(
        self,
        address: str,
        policy_dir: str,
        cfg: LearnerConfig,
        dtype: str,
        device: str,
        attention: str = "auto",
        state: dict | None = None,
    ) -> None:
        """Join the group, load and shard the policy, restore the learner's state (a
        checkpoint's, written by any number of ranks) if given. `address`: host:port of rank
        0's rendezvous, or "env://" under torchrun (its MASTER_ADDR / MASTER_PORT); `device`
        "cuda" is the one GPU Ray shows the actor (cuda:0), "cuda:K" a given one (torchrun's
        LOCAL_RANK)."""
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            torch.cuda.set_device(index)
            device = f"cuda:{index}"
        dist.init_process_group(
            "nccl" if device.startswith("cuda") else "gloo",
            init_method=address if address == "env://" else f"tcp://{address}",
            rank=self.rank,
            world_size=self.world,
            timeout=datetime.timedelta(minutes=10),
        )
        policy = load_pretrained(policy_dir, device=device, dtype=DTYPES[dtype])
        policy.attention = attention
        self.args, self.dtype = policy.args, DTYPES[dtype]
        self.learner = ShardedLearner(policy, cfg)
        if state is not None:
            self.learner.load_state_dict(state)

    def step(
        self, batch: Batch, capture_grads: bool = False
    ) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The learner's step; with capture_grads also the whole gradients (gathered from the
        shards before the optimizer applies them; for comparing with a single process)."""
        if not capture_grads:
            return self.learner.step(batch)
        grads: dict[str, torch.Tensor] = {}

        def record(*_: Any) -> None:
            for name, p in self.learner.policy.named_parameters():
                if p.grad is not None:  # full_tensor() is collective: every rank gathers
                    grads[name] = p.grad.full_tensor().cpu()

        hook = self.learner.optimizer.register_step_pre_hook(record)
        try:
            return self.learner.step(batch), grads
        finally:
            hook.remove()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.learner.full_state_dict()

    def weight_bucket(self, names: list[str]) -> dict[str, torch.Tensor] | None:
        """One bucket of the full weights, gathered from every rank's shards (collective);
        rank 0 returns it, the others drop their copy at once."""
        bucket = gather_bucket(self.learner.policy, names)
        return bucket if self.rank == 0 else None

    def weight_bucket_names(self, bucket_bytes: int) -> list[list[str]]:
        return bucket_names(self.learner.policy, bucket_bytes)

    def save_checkpoint(
        self, run_dir: str, state: ckpt.RunState, keep_last: int, tmp: str
    ) -> str | None:
        """Every rank writes its optimizer shards into the begun checkpoint `tmp` (torch.
        distributed.checkpoint) and gathers the weights; rank 0 writes the policy in the
        serving layout and completes the checkpoint. Returns its path on rank 0."""
        learner_state = self.learner.save_optimizer_shards(Path(tmp) / "optimizer")
        weights = self.learner.full_state_dict()
        path = None
        if self.rank == 0:
            policy = Transformer(self.args).to(self.dtype)
            policy.load_state_dict(weights)
            path = str(ckpt.finish(run_dir, Path(tmp), policy, learner_state, state, keep_last))
        dist.barrier()
        return path

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class ShardedLearnerGroup:
    """N LearnerWorker actors as one learner, with the single learner actor's methods (step,
    state_dict, save_checkpoint), each run on every rank (they are collective); rank 0
    answers. The trainer runs it as a Ray actor itself, so its calls look the same."""

    def __init__(
        self,
        world: int,
        policy_dir: str,
        cfg: LearnerConfig,
        dtype: str,
        device: str,
        attention: str = "auto",
        state: dict | None = None,
        version: int = 0,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        placement: Any = None,
    ) -> None:
        import ray

        self.versions = WeightVersion(version, cfg.algorithm.updates_per_batch)
        actor = ray.remote(LearnerWorker)
        # placement (rl/placement.Placement): each rank in its bundle of the run's group.
        self.workers = [
            actor.options(
                **{
                    "num_cpus": num_cpus,
                    "num_gpus": num_gpus,
                    **(placement.learner(rank) if placement is not None else {}),
                }
            ).remote(rank, world)
            for rank in range(world)
        ]
        address = ray.get(self.workers[0].address.remote())
        state_ref = ray.put(state)  # one copy for every rank
        self._all("setup", address, policy_dir, cfg, dtype, device, attention, state_ref)

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every rank; rank order results. A rank that dies fails the call at
        once, naming it, and the others are stopped: they would wait in their collectives
        for the group's timeout."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        refs = [getattr(w, method).remote(*args) for w in self.workers]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except (RayActorError, WorkerCrashedError) as e:
                rank = refs.index(done[0])
                for w in self.workers:
                    ray.kill(w)
                raise RuntimeError(
                    f"learner rank {rank} of {len(self.workers)} died during {method}: "
                    f"{type(e).__name__}; the step is lost (resume from the last checkpoint)"
                ) from None
        return ray.get(refs)

    def step(self, batch: Batch, capture_grads: bool = False) -> Any:
        """Every rank's step on the batch; rank 0's metrics (and gradients, if asked)."""
        import ray

        out = self._all("step", ray.put(batch), capture_grads)[0]  # one copy of the batch
        self.versions.updated()
        return out

    def weight_bucket_names(self, bucket_bytes: int, version: int) -> list[list[str]]:
        import ray

        self.versions.check(version)
        return ray.get(self.workers[0].weight_bucket_names.remote(bucket_bytes))

    def weight_bucket(self, names: list[str], version: int) -> dict[str, torch.Tensor]:
        """One bucket of the weights after `version` (checked), gathered by all ranks."""
        self.versions.check(version)
        return self._all("weight_bucket", names)[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._all("state_dict")[0]

    def save_checkpoint(self, run_dir: str, state: ckpt.RunState, keep_last: int) -> str:
        tmp = str(ckpt.begin(run_dir))  # on the shared file system every rank writes to
        return self._all("save_checkpoint", run_dir, state, keep_last, tmp)[0]

    def shutdown(self) -> None:
        import ray

        self._all("shutdown")
        for w in self.workers:
            ray.kill(w)

    def kill_rank(self, rank: int) -> None:
        """Kill one rank's process (for fault tests)."""
        import ray

        ray.kill(self.workers[rank])
