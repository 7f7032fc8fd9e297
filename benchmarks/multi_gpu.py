"""The sharded learner on several GPUs of one host, launched by torchrun through the entry the
Ray learner actors use (rl.sharded.LearnerWorker.setup, then its step / save_checkpoint), so the
code measured is the code a `ray.learner_workers: N` run executes. NCCL on CUDA (one GPU a
rank, LOCAL_RANK), gloo on the CPU (where it runs on small configs to check the script).

Modes:
- `equivalence`: an FSDP2 step on N ranks against a one-process Learner step on the same batch
  (Keep Routing and the kept-id log-probs on): loss, every gradient and every updated weight,
  with the relative errors and the tolerance printed; exit status 1 beyond it.
- `checkpoint --save DIR`: N ranks take a step, write a checkpoint to DIR, take a second step
  and record its loss; `checkpoint --load DIR` on M ranks loads it (weights and optimizer
  shards, resharded by torch.distributed.checkpoint), takes the same second step and compares
  the loss.
- `scaling`: learner tokens/s, MFU and peak memory per GPU of N ranks on a config of
  benchmarks/learner.py (2 x 4,096 tokens a rank per step: weak scaling).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py equivalence
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py checkpoint --save /tmp/ck
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 1 benchmarks/multi_gpu.py checkpoint --load /tmp/ck
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/multi_gpu.py checkpoint --load /tmp/ck
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/multi_gpu.py scaling \\
        --config v32-2layer --experts 192
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from learner import CONFIGS, make_batch, matmul_peak, policy_args  # noqa: E402

from policy import Transformer, load_pretrained, save_pretrained  # noqa: E402
from rl import checkpoint as ckpt  # noqa: E402
from rl.learner import AlgorithmConfig, Learner, LearnerConfig, OptimConfig  # noqa: E402
from rl.plan import model_flops_per_token  # noqa: E402
from rl.sharded import LearnerWorker, ShardedLearner  # noqa: E402

# relative to a whole tensor's norm (gradients, weights); absolute on the loss
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def _env() -> tuple[int, int, str]:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, f"cuda:{local}" if torch.cuda.is_available() else "cpu"


def _learner_cfg(config: str) -> LearnerConfig:
    c = CONFIGS[config]
    return LearnerConfig(
        optim=OptimConfig(
            lr=1e-4, micro_batch_tokens=c["micro"], activation_checkpointing=c["ckpt"]
        ),
        algorithm=AlgorithmConfig(opsm=True, keep_routing=True, keep_sampling_mask=True),
    )


def _shared(path: Path, rank: int, make) -> None:  # noqa: ANN001
    """Rank 0 makes `path` (atomically); the others wait for it (before the group exists)."""
    if rank == 0 and not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        make(tmp)
        os.replace(tmp, path)
    deadline = time.time() + 600
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.2)


def _policy_dir(
    work: Path, config: str, experts: int | None, dtype: torch.dtype, rank: int
) -> Path:
    def make(tmp: Path) -> None:
        torch.manual_seed(0)
        save_pretrained(Transformer(policy_args(config, experts)).to(dtype), tmp)

    path = work / f"policy-{config}-{experts}-{str(dtype).split('.')[-1]}"
    _shared(path, rank, make)
    return path


def _close(worker: LearnerWorker) -> None:
    """Leave the group together: a rank tearing gloo down while another still writes its
    files aborted at exit (about 1 run in 4 on the CPU). main() then leaves without the
    interpreter's finalization, which on CI still aborted a gloo rank now and then
    ("terminate called without an active exception") after all its work was done."""
    dist.barrier()
    worker.shutdown()


class _OneProcess(Learner):
    """The one-process reference, with the sharded learner's AdamW (both fuse it on CUDA), so
    that the comparison measures the sharding alone."""

    fused_adamw = ShardedLearner.fused_adamw


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _batch(work: Path, policy_dir: Path, cfg: LearnerConfig, config: str, device: str, rank: int):  # noqa: ANN202
    """The batch every rank trains on, made once by rank 0 (its pi_old and routing the policy's
    own) and read by all."""

    def make(tmp: Path) -> None:
        policy = load_pretrained(policy_dir, device=device)
        torch.save(make_batch(policy, Learner(policy, cfg), CONFIGS[config]).to("cpu"), tmp)

    path = work / f"batch-{config}-{policy_dir.name}.pt"
    _shared(path, rank, make)
    return torch.load(path, weights_only=False).to(device)


def equivalence(a: argparse.Namespace, work: Path) -> int:
    rank, world, device = _env()
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    cfg = _learner_cfg(a.config)
    policy_dir = _policy_dir(work, a.config, a.experts, dtype, rank)
    batch = _batch(work, policy_dir, cfg, a.config, device, rank)
    worker = LearnerWorker(rank, world)
    worker.setup("env://", str(policy_dir), cfg, a.dtype, device)
    metrics, grads = worker.step(batch, capture_grads=True)
    weights = worker.state_dict()
    if rank == 0:  # the one-process step on the same batch and weights
        ref_policy = load_pretrained(policy_dir, device=device, dtype=dtype)
        ref = _OneProcess(ref_policy, cfg)
        ref_grads: dict[str, torch.Tensor] = {}

        def record(*_: object) -> None:
            for name, p in ref_policy.named_parameters():
                if p.grad is not None:
                    ref_grads[name] = p.grad.detach().cpu()

        ref.optimizer.register_step_pre_hook(record)
        ref_metrics = ref.step(batch)
        ref_weights = ref_policy.state_dict()
        tol = TOLERANCE[a.dtype]
        out = {
            "world": world,
            "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
            "config": a.config,
            "dtype": a.dtype,
            "loss": [metrics["loss"], ref_metrics["loss"]],
            # absolute: an on-policy first step's loss is 0 up to rounding (advantages sum to 0)
            "loss_abs": abs(metrics["loss"] - ref_metrics["loss"]),
            "grad_rel_max": max(_rel(grads[n], g) for n, g in ref_grads.items()),
            "weight_rel_max": max(_rel(weights[n], w) for n, w in ref_weights.items()),
            "tolerance": tol,
        }
        ok = max(out["loss_abs"], out["grad_rel_max"], out["weight_rel_max"]) <= tol
        out["ok"] = ok
        print(json.dumps(out), flush=True)
    _close(worker)
    return 0 if rank != 0 or ok else 1


def checkpoint(a: argparse.Namespace, work: Path) -> int:
    rank, world, device = _env()
    cfg = _learner_cfg(a.config)
    worker = LearnerWorker(rank, world)
    if a.save:
        run = Path(a.save)
        policy_dir = _policy_dir(work, a.config, a.experts, torch.float32, rank)
        batch = _batch(work, policy_dir, cfg, a.config, device, rank)
        worker.setup("env://", str(policy_dir), cfg, "float32", device)
        worker.step(batch)
        tmp = [str(ckpt.begin(run)) if rank == 0 else None]
        dist.broadcast_object_list(tmp, src=0)
        path = worker.save_checkpoint(str(run), ckpt.RunState(0, 0, 1, {}), 0, tmp[0])
        second = worker.step(batch)["loss"]
        after = worker.state_dict()  # the second update used the optimizer state saved
        if rank == 0:
            torch.save(after, run / "after_second_step.pt")
            torch.save(batch.to("cpu"), run / "batch.pt")
            (run / "second_step.json").write_text(json.dumps({"world": world, "loss": second}))
            print(json.dumps({"saved": path, "world": world, "second_loss": second}), flush=True)
        _close(worker)
        return 0
    run = Path(a.load)
    last, _ = ckpt.latest_intact(run)
    state = ckpt.load_state(last, restore_rng=False, verified=True)[1]
    worker.setup("env://", str(last / "policy"), cfg, "float32", device, state=state)
    batch = torch.load(run / "batch.pt", weights_only=False).to(device)
    loss = worker.step(batch)["loss"]
    after = worker.state_dict()
    rel = 0.0
    if rank == 0:
        saved = json.loads((run / "second_step.json").read_text())
        want = torch.load(run / "after_second_step.pt", weights_only=True)
        # The loss checks the weights loaded; the weights after the update, the optimizer
        # state (AdamW's moments and step) resharded from the saving ranks' shards.
        rel = max(
            [abs(loss - saved["loss"]) / abs(saved["loss"])]
            + [_rel(after[n], w) for n, w in want.items()]
        )
        out = {"saved_on": saved["world"], "loaded_on": world, "loss": [loss, saved["loss"]]}
        out.update(rel_max=rel, tolerance=TOLERANCE["float32"], ok=rel <= TOLERANCE["float32"])
        print(json.dumps(out), flush=True)
    _close(worker)
    return 0 if rel <= TOLERANCE["float32"] else 1


def scaling(a: argparse.Namespace, work: Path) -> int:
    rank, world, device = _env()
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    cfg = _learner_cfg(a.config)
    c = dict(CONFIGS[a.config], seqs=CONFIGS[a.config]["seqs"] * world)  # a rank's share fixed
    policy_dir = _policy_dir(work, a.config, a.experts, dtype, rank)
    worker = LearnerWorker(rank, world)
    worker.setup("env://", str(policy_dir), cfg, str(dtype).split(".")[-1], device)
    learner = worker.learner
    batch = make_batch(learner.policy, learner, c, seed=0)
    worker.step(batch)  # warm-up
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(a.steps):
        worker.step(batch)
    if device != "cpu":
        torch.cuda.synchronize()
    secs = (time.perf_counter() - start) / a.steps
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else 0.0
    peaks = [None] * world
    dist.all_gather_object(peaks, peak_mem)
    if rank == 0:
        args = policy_args(a.config, a.experts)
        tokens = c["seqs"] * c["tokens"]
        flops = model_flops_per_token(args, c["tokens"])
        peak = matmul_peak("cuda" if device != "cpu" else "cpu")
        out = {
            "world": world,
            "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
            "config": a.config,
            "experts": a.experts,
            "tokens_per_step": tokens,
            "step_s": secs,
            "tokens_per_s": tokens / secs,
            "mfu": flops * tokens / secs / (peak * world),
            "peak_memory_gib_per_rank": peaks,
        }
        print(json.dumps(out), flush=True)
    _close(worker)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["equivalence", "checkpoint", "scaling"])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--experts", type=int, help="v32-2layer: routed experts (V3.2 has 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save", help="checkpoint: write it here (a run directory)")
    p.add_argument("--load", help="checkpoint: load the newest one of this run directory")
    p.add_argument("--workdir", default="/tmp/keeprl-multi-gpu", help="shared scratch")
    a = p.parse_args()
    faulthandler.enable()  # a rank that aborts in C++ prints its Python stack
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    return {"equivalence": equivalence, "checkpoint": checkpoint, "scaling": scaling}[a.mode](
        a, work
    )


if __name__ == "__main__":
    code = main()
    # Every mode has closed its group (_close) and printed its result: skip the interpreter's
    # teardown, where gloo's threads can still abort the process (see _close).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
