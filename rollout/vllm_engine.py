"""The vLLM rollout engine: generation that records MoE routing, the sampling mask and pi_old.

`VLLMEngine(checkpoint_dir, **engine_kwargs)` serves a checkpoint written by
`policy.save_pretrained` and returns `Trajectory` records from `generate(prompts, sampling, n)`.

Serving. On GPUs the checkpoint is served as what it is, `DeepseekV32ForCausalLM` (sparse
attention). vLLM's CPU platform refuses sparse attention, so on CPU the engine serves the
*dense equivalent*: a serving directory (in a temp dir the engine owns) whose config.json says
`DeepseekV3ForCausalLM` without the indexer keys, holding hard links to the same weights (vLLM
skips the indexer tensors). That model equals DSA only while every sequence fits in
index_topk, so on CPU a request with prompt + max_tokens > index_topk is refused. vLLM's
DeepseekV3 runs in bf16 on CPU: the engine serves bf16. On CPU the engine also switches off
vLLM's rotary-embedding kernel, which mis-rotates MLA's multi-head queries (`_native_rope`).

What is recorded, per response token (see rollout.trajectory):
- pi_old: the sampled token's log-prob after temperature/top-k/top-p, vLLM's "processed"
  log-probs. On CPU it is read with the kept set in the sampler hook (below), which spares
  vLLM's per-token log-prob output path; the hook also records the sampled tokens, checked
  against what vLLM returns. Greedy (temperature 0) is the exception vLLM makes: it returns
  the untempered log-softmax of the raw logits there (asked from vLLM, the hook never runs),
  and so do we.
- kept ids: on CPU, read from the sampler itself (rollout/_vllm_capture.py): a hook on its
  top-k/top-p stage keeps the finite entries of the processed log-probs it samples from, so
  the set is exact and of any size (ties at the k-th logit, which vLLM all keeps and bf16
  logits produce often, included; top-p without top-k allowed). On GPUs (untested here) the
  kept set is read from the top N processed log-probs instead (cut tokens come back as -inf):
  N = top_k + tie_margin, a position whose N entries are all finite might hide more and fails
  loudly, and top-p without a top-k bound is refused at configuration time. vLLM's
  `return_sampling_mask` needs Model Runner V2 (GPU Triton) and is not used. Where tokens tie
  exactly at the top-p boundary, the set is whichever of them vLLM's sort kept
  (rollout.sampling may pick others). Log-probs come back as vLLM's flat lists
  (`flat_logprobs`), read with numpy.
- routing [prompt + response - 1, n_moe_layers, top_k]: on CPU through the MoE router capture
  hook (rollout/_vllm_capture.py); on GPUs through vLLM's `enable_return_routed_experts`
  (untested here: no GPU). Prefix caching is forced off (cached tokens have no routing).

Turning vLLM's outputs and the captures into Trajectory records, with every check that the
record is what vLLM did, is rollout/vllm_records.py (no vLLM import; tested on its own); the
worker-side hooks are rollout/_vllm_capture.py. What stays here (somewhat over the style
guide's ~500 lines) is one class: vLLM's lifecycle, serving directories and weight updates.

Weight updates: in place (vLLM's reload plus the CPU expert repacking it skips; proven
bit-identical to a fresh engine by tests/rollout/test_vllm_engine.py), falling back to an
engine rebuild (drop it, build anew on the new weights) if the in-place route raises.

Worker calls go through `collective_rpc` by method name (rollout/_vllm_capture.py's
WorkerExtension, mixed into vLLM's worker class), so the engine also works with vLLM's worker
in another process (VLLM_ENABLE_V1_MULTIPROCESSING=1; there a state-dict update is staged as
a safetensors file for the worker to read).

Process environment: vLLM is run in this process by default. Before vLLM is first imported the
engine sets, unless already set: HF_HUB_OFFLINE=1 (never download), VLLM_ENABLE_V1_MULTI-
PROCESSING=0 (engine and worker in-process: ~2.5 s start instead of 15-45 s, no __main__
guard needed) and VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache on CPU). In-process vLLM reseeds
the global RNGs and disables torch.set_num_threads for the whole process; the engine restores
both after starting vLLM.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy.args import ModelArgs
from policy.checkpoint import (
    SINGLE_FILE,
    checkpoint_files,
    dense_equivalent_config,
    hf_tensors,
    serving_tensors,
    tensor_names,
)

from . import _vllm_capture as capture
from . import vllm_records as records
from .trajectory import Sampling, Trajectory

log = logging.getLogger(__name__)

WORK_DIR_PREFIX = "keeprl-vllm-"
OWNER_FILE = "owner.pid"
ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
# Settings the recording depends on: a caller may not change them.
REQUIRED_KWARGS = {
    "logprobs_mode": "processed_logprobs",  # log-probs after top-k/top-p, -inf where cut
    "enable_prefix_caching": False,  # a cached prompt token is not forwarded: no routing
    "skip_tokenizer_init": True,  # token ids in and out; no tokenizer needed or loaded
    "worker_extension_cls": capture.EXTENSION,  # the keeprl_* worker methods called by name
}
DEFAULT_TIE_MARGIN = 16
DEFAULT_MAX_LOGPROBS = 256
# vLLM samples greedily below this temperature.
_GREEDY_BELOW = 1e-5


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what starting vLLM in-process does to the caller's process: reseeding the global
    RNGs and replacing torch.set_num_threads with a warning no-op."""
    py_rng, np_rng, torch_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        torch.set_rng_state(torch_rng)
        torch.set_num_threads = set_threads
        set_threads(threads)


@contextlib.contextmanager
def _temp_files_in(directory: Path) -> Iterator[None]:
    """Have Python's tempfile put files under `directory` for a while: vLLM leaves its
    distributed-rendezvous file (`vllm_dist_*`) in the temp dir, and here it goes with the
    engine's work directory instead of piling up in /tmp."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _remove_orphaned_work_dirs(parent: Path) -> None:
    """Delete the work directories of engines whose process is gone (killed, so no cleanup
    ran); a directory of a live process, or of another host's, is left alone."""
    for path in parent.glob(f"{WORK_DIR_PREFIX}*"):
        try:
            host, pid_text = (path / OWNER_FILE).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # not ours to judge (an older engine's, or being created)
        if host != socket.gethostname():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _native_rope(compilation_config: Any) -> dict[str, Any]:
    """`compilation_config` with vLLM's rotary-embedding custom op switched off (CPU only).

    vllm-cpu 0.32's CPU rotary kernel rotates a query laid out [tokens, heads, rope_dim] as if
    it were [tokens * heads, rope_dim]: head h of token t gets the angle of position
    t * heads + h. MLA hands it exactly that layout (the key, with one head, comes out right),
    so served attention scores were wrong from the second position on. With the op off, vLLM
    runs its PyTorch rotary implementation, which agrees with policy.rope.
    tests/rollout/test_vllm_engine.py guards the result: greedy tokens on a trained model.
    """
    if compilation_config is None:
        config: dict[str, Any] = {}
    elif isinstance(compilation_config, Mapping):
        config = dict(compilation_config)
    else:
        raise TypeError(
            "VLLMEngine on CPU takes compilation_config as a dict (it adds "
            f"'-rotary_embedding' to custom_ops), not {type(compilation_config).__name__}"
        )
    ops = list(config.get("custom_ops") or [])
    if "+rotary_embedding" in ops:
        raise ValueError(
            "compilation_config custom_ops '+rotary_embedding': vLLM's CPU rotary kernel "
            "mis-rotates MLA's multi-head queries; leave it off"
        )
    if "-rotary_embedding" not in ops:
        ops.append("-rotary_embedding")
    config["custom_ops"] = ops
    return config


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link keeps the served bytes fixed even if the source directory is rewritten later
    # (save_pretrained replaces its files); a symlink would follow the new files.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _StateDictView:
    """Lets policy.checkpoint.hf_tensors, which reads `model.state_dict()`, split a bare
    state dict (stacked routed experts -> per-expert HF names)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        return self._state


class VLLMEngine:
    """Rollout engine on vLLM (`vllm` on GPUs, `vllm-cpu` here). See the module docstring.

    checkpoint_dir: a policy.save_pretrained directory. weight_version: stamped on every
    trajectory until update_weights changes it. tie_margin: extra top-N log-probs asked for
    beyond top_k, to see ties at the k-th logit. work_dir: where the serving directories go
    (default: the system temp dir). engine_kwargs: passed to `vllm.LLM` (defaults: bf16,
    eager mode, max_logprobs 256, max_model_len = index_topk on CPU).
    """

    name = "vllm"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        weight_version: int = 0,
        tie_margin: int = DEFAULT_TIE_MARGIN,
        work_dir: str | Path | None = None,
        **engine_kwargs: Any,
    ) -> None:
        for key, value in ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from vllm.platforms import current_platform

        checkpoint_dir = Path(checkpoint_dir)
        self.args = ModelArgs.from_json(checkpoint_dir)
        self.config = json.loads((checkpoint_dir / "config.json").read_text())
        self.tensor_names = tensor_names(checkpoint_dir)
        self.dense = current_platform.is_cpu()
        self.weight_version = int(weight_version)
        self.tie_margin = int(tie_margin)
        self.llm_kwargs = self._llm_kwargs(engine_kwargs)
        self.max_logprobs = int(self.llm_kwargs["max_logprobs"])
        self.max_model_len = int(self.llm_kwargs["max_model_len"])
        _remove_orphaned_work_dirs(Path(work_dir or tempfile.gettempdir()))
        self._root = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX, dir=work_dir))
        (self._root / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._root, True)
        self._serial = 0
        self.llm: Any = None
        self._start(self._serving_dir(checkpoint_dir))

    # ---- configuration -------------------------------------------------------------------
    def _llm_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key, value in REQUIRED_KWARGS.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f"VLLMEngine needs {key}={value!r} to record rollouts")
        limit = self.args.max_position_embeddings
        if self.dense:
            limit = min(limit, self.args.index_topk)
            if kwargs.get("max_model_len", 0) > limit:
                raise ValueError(
                    f"max_model_len={kwargs['max_model_len']} exceeds index_topk="
                    f"{self.args.index_topk}: on CPU vLLM serves the dense equivalent of the DSA "
                    "model, which equals it only up to index_topk tokens"
                )
        out = {
            "dtype": "bfloat16",
            "enforce_eager": True,
            "max_logprobs": min(self.args.vocab_size, DEFAULT_MAX_LOGPROBS),
            "max_model_len": limit,
            **kwargs,
            **REQUIRED_KWARGS,
        }
        if self.dense:
            out["compilation_config"] = _native_rope(out.get("compilation_config"))
            # vLLM's reference CPU MLA backend, also where the CPU has AMX: the AMX backend
            # packs MLA's absorbed weights and frees kv_b_proj's, which vllm-cpu 0.32's in-place
            # reload then cannot copy the new kv_b_proj into (every weight push would rebuild
            # the engine). Without AMX vLLM picks this backend itself.
            out.setdefault("attention_config", {"backend": "CPU_MLA"})
        else:
            out.setdefault("enable_return_routed_experts", True)
        return out

    def logprobs_needed(self, sampling: Sampling) -> int | None:
        """How many top log-probs per token vLLM must return for `sampling`: None when the
        sampler hook records pi_old and the kept set (CPU, temperature > 0), 0 for the sampled
        token's only, N to show the kept set. Raises ValueError for a sampling whose kept set
        cannot be recorded exactly."""
        t = sampling.temperature
        if 0 < t < _GREEDY_BELOW:
            raise ValueError(f"temperature={t} is below {_GREEDY_BELOW}: vLLM samples greedily")
        if self._from_sampler(sampling):
            return None
        if not sampling.truncated:
            return 0
        if sampling.top_k <= 0:
            raise ValueError(
                f"top_p={sampling.top_p} without a top_k bound: the kept set can hold any number "
                "of tokens, more than vLLM's top-N log-probs can show, so the sampling mask "
                "cannot be recorded exactly; set top_k as well (e.g. top_k=64)"
            )
        needed = min(self.args.vocab_size, sampling.top_k + self.tie_margin)
        if needed > self.max_logprobs:
            raise ValueError(
                f"top_k={sampling.top_k} needs {needed} log-probs per token (top_k + tie_margin "
                f"{self.tie_margin}); start the engine with max_logprobs >= {needed}"
            )
        return needed

    def _from_sampler(self, sampling: Sampling) -> bool:
        """Whether the sampler hook records pi_old and the kept set (CPU; vLLM returns before
        its top-k/top-p stage when sampling greedily)."""
        return self.dense and sampling.temperature > 0

    def _check_lengths(self, prompts: list[list[int]], sampling: Sampling) -> None:
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            total = len(prompt) + sampling.max_tokens
            if self.dense and total > self.args.index_topk:
                raise ValueError(
                    f"prompt {i}: {len(prompt)} tokens + max_tokens {sampling.max_tokens} = "
                    f"{total} exceeds index_topk={self.args.index_topk}: on CPU vLLM serves the "
                    "dense equivalent of the DSA model, which would attend to tokens DSA drops; "
                    "shorten the request or use the native engine"
                )
            if total > self.max_model_len:
                raise ValueError(
                    f"prompt {i}: {total} tokens exceed max_model_len={self.max_model_len}"
                )

    def _params(self, sampling: Sampling, n_logprobs: int | None, seed: int | None) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            max_tokens=sampling.max_tokens,
            seed=seed,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,  # a response ends at stop_token_ids or max_tokens, nothing else
            logprobs=n_logprobs,
            flat_logprobs=True,  # flat lists instead of a dict of objects per token
            detokenize=False,
        )

    # ---- serving -------------------------------------------------------------------------
    def _serving_dir(self, source: Path | Mapping[str, torch.Tensor]) -> Path:
        """A fresh directory vLLM can load: the config it should see plus the weights."""
        self._serial += 1
        out = self._root / f"serve-{self._serial}"
        out.mkdir()
        config = dense_equivalent_config(self.config) if self.dense else self.config
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if isinstance(source, Path):
            for fname in checkpoint_files(source):
                _link_or_copy(source / fname, out / fname)
        else:
            from safetensors.torch import save_file

            tensors = {name: t.contiguous().clone() for name, t in self._hf_items(source)}
            save_file(tensors, out / SINGLE_FILE, metadata={"format": "pt"})
        return out

    def _start(self, serving_dir: Path) -> None:
        from vllm import LLM

        # vLLM warms up a chat template at start and logs a traceback when, as here, no
        # tokenizer is loaded (skip_tokenizer_init): harmless, and alarming in a user's log.
        with (
            _process_state_kept(),
            _temp_files_in(self._root),
            capture.quiet_loggers(("vllm.renderers.base",)),
        ):
            self.llm = LLM(model=str(serving_dir), **self.llm_kwargs)
        if self.dense:
            self._rpc("keeprl_install_capture")
        for old in self._root.glob("serve-*"):
            if old != serving_dir:
                shutil.rmtree(old, ignore_errors=True)

    def _rpc(self, method: str, *args: Any) -> Any:
        """Call a keeprl_* worker method (rollout._vllm_capture.WorkerExtension); the first
        worker's answer (tensor-parallel workers route alike)."""
        return self.llm.collective_rpc(method, args=args)[0]

    def close(self) -> None:
        """Stop vLLM and delete the serving directories."""
        self.llm = None
        gc.collect()
        self._cleanup()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, n: int = 1
    ) -> list[Trajectory]:
        """n responses per prompt, prompt-major order. With a seed, response j of prompt i is
        drawn with seed + i * n + j."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        n_logprobs = self.logprobs_needed(sampling)
        self._check_lengths(prompts, sampling)
        outputs = self._run(prompts, sampling, n, n_logprobs, record=True)
        ids = [o.request_id for o in outputs]
        routing, sampled = {}, {}
        if self.dense:
            packed = self._rpc("keeprl_collect_routing", ids)
            routing = {key: capture.unpack(value) for key, value in packed.items()}
        if self._from_sampler(sampling):
            packed = self._rpc("keeprl_collect_sampled", ids)
            sampled = {key: [capture.unpack(p) for p in value] for key, value in packed.items()}
        spec = records.RecordSpec(self.args, self.dense, self.tie_margin)
        trajectories = [
            records.trajectory(
                out,
                spec,
                prompt_index=k // n,
                sampling=sampling,
                from_sampler=self._from_sampler(sampling),
                n_logprobs=n_logprobs,
                routing=routing.get(out.request_id),
                sampled=sampled.get(out.request_id),
                engine=self.name,
                weight_version=self.weight_version,
            )
            for k, out in enumerate(outputs)
        ]
        records.check_routing(trajectories, spec)
        return trajectories

    def generate_plain(
        self, prompts: list[list[int]], sampling: Sampling, n: int = 1
    ) -> list[list[int]]:
        """Response token ids only: plain vLLM with routing capture off and no log-probs asked.
        The baseline benchmarks/rollout.py measures the recording cost against."""
        self._check_lengths(prompts, sampling)
        if self.dense:
            self._rpc("keeprl_set_capture_enabled", False)
        try:
            outputs = self._run(prompts, sampling, n, None, record=False)
        finally:
            if self.dense:
                self._rpc("keeprl_set_capture_enabled", True)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def _run(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        n: int,
        n_logprobs: int | None,
        *,
        record: bool,
    ) -> list[Any]:
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("the vLLM engine is closed")
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                seed = None if sampling.seed is None else sampling.seed + i * n + j
                requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in prompt]))
                params.append(self._params(sampling, n_logprobs, seed))
        if self.dense:
            self._rpc("keeprl_reset_capture")
            from_sampler = record and self._from_sampler(sampling)
            self._rpc("keeprl_set_record_sampled", from_sampler, sampling.truncated)
        return self.llm.generate(requests, params, use_tqdm=False)

    # ---- weights -------------------------------------------------------------------------
    def _hf_items(self, state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """(HF name, tensor in the serving dtype) of a policy state dict, checked for
        completeness: a missing tensor would silently keep its old value in place."""
        dtype = getattr(torch, str(self.llm_kwargs["dtype"]).removeprefix("torch."))
        view = _StateDictView(state)
        items = list(serving_tensors(hf_tensors(view), dtype))  # type: ignore[arg-type]
        names = {name for name, _ in items}
        missing, unexpected = self.tensor_names - names, names - self.tensor_names
        if missing or unexpected:
            raise ValueError(
                f"update_weights: state dict is missing {sorted(missing)[:5]} and has "
                f"unexpected {sorted(unexpected)[:5]} (as HF names)"
            )
        return items

    def _weights_source(
        self, source: str | Path | Mapping[str, torch.Tensor] | torch.nn.Module
    ) -> Path | Mapping[str, torch.Tensor]:
        if isinstance(source, torch.nn.Module):
            return source.state_dict()
        if isinstance(source, Mapping):
            return source
        directory = Path(source)
        if ModelArgs.from_json(directory) != self.args:
            raise ValueError(f"update_weights: {directory} holds a different architecture")
        names = tensor_names(directory)
        if names != self.tensor_names:
            raise ValueError(
                f"update_weights: {directory} tensors differ from the served checkpoint's: "
                f"missing {sorted(self.tensor_names - names)[:5]}, "
                f"unexpected {sorted(names - self.tensor_names)[:5]}"
            )
        return directory

    def _reload_payload(self, src: Path | Mapping[str, torch.Tensor]) -> Any:
        """What keeprl_reload_weights gets: a directory the worker reads, or (vLLM in this
        process) the (HF name, tensor) pairs themselves."""
        if isinstance(src, Path):
            return str(src)
        items = self._hf_items(src)
        import vllm.envs

        if not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            return items
        # vLLM's RPC encoding cannot carry tensors in a list to a worker process: stage a file.
        from safetensors.torch import save_file

        staged = self._root / "staged"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        tensors = {name: t.contiguous().clone() for name, t in items}
        save_file(tensors, staged / SINGLE_FILE, metadata={"format": "pt"})
        return str(staged)

    def release(self) -> bool:
        """While a colocated learner steps on the same GPU (rl/placement.py): vLLM's sleep
        mode, level 1 (weights to host memory, KV cache dropped), when the engine was started
        with engine_kwargs enable_sleep_mode: true; False otherwise and on the CPU build, which
        has no sleep mode. (The GPU branch is not exercised by this project's tests: its GPU
        machine has no vLLM.)"""
        if self.dense or not self.llm_kwargs.get("enable_sleep_mode"):
            return False
        self.llm.sleep(level=1)
        return True

    def resume(self) -> bool:
        """Wake the engine after release (weights back, KV cache reallocated)."""
        if self.dense or not self.llm_kwargs.get("enable_sleep_mode"):
            return False
        self.llm.wake_up()
        return True

    def update_weights(
        self,
        source: str | Path | Mapping[str, torch.Tensor] | torch.nn.Module,
        version: int,
        *,
        route: str = "auto",
    ) -> str:
        """Load new policy weights: a policy state dict (our parameter names), a Transformer, or
        a policy.save_pretrained directory. Returns the route that ran, "in-place" or
        "rebuild"; route="auto" tries in-place first and rebuilds if it raises."""
        if route not in ("auto", "in-place", "rebuild"):
            raise ValueError(f"route must be 'auto', 'in-place' or 'rebuild', not {route!r}")
        src = self._weights_source(source)
        start = time.perf_counter()
        ran = "rebuild"
        if route != "rebuild":
            payload = self._reload_payload(src)
            try:
                self._rpc("keeprl_reload_weights", payload)
                ran = "in-place"
            except Exception as e:
                if route == "in-place":
                    raise
                log.warning("in-place weight update failed (%s: %s); rebuilding", type(e), e)
        if ran == "rebuild":
            serving = self._serving_dir(src)
            self.llm = None
            gc.collect()
            self._start(serving)
        self.weight_version = int(version)
        log.info(
            "vLLM engine: weights version %d loaded (%s, %.2f s)",
            self.weight_version,
            ran,
            time.perf_counter() - start,
        )
        return ran
