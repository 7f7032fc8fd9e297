"""Worker-side hooks of the vLLM engine: per-request MoE routing capture, the exact sampling
mask (kept ids) from the sampler, a sampler-logits probe, and the in-place weight reload.

Every public function here takes the vLLM worker as its first argument. The engine reaches
them by name: `WorkerExtension` is mixed into vLLM's worker class (`LLM(worker_extension_cls=
EXTENSION)`), so `LLM.collective_rpc("keeprl_collect_routing", args=...)` runs on the worker
whether vLLM runs in-process or in worker processes (vLLM will not ship a function object to a
worker process without insecure pickling). State lives on the worker, as
`worker.keeprl_capture`.

Routing capture. vLLM's own recorder (`enable_return_routed_experts`) needs Model Runner V2,
which needs GPU Triton. On the CPU runner we use the MoE routers' `set_capture_fn` hook: each
MoE layer hands us the logical expert ids [tokens_in_step, top_k] it routed every row of a
forward step to. Which rows belong to which request is known only to the step's scheduler
output, so the runner's `execute_model` is wrapped (on this runner instance only) to see it:
rows follow the persistent batch's request order, `num_scheduled_tokens[req]` rows each,
starting at the request's `num_computed_tokens`. Rows are stored by position, so a request
that is preempted and recomputed overwrites its rows instead of duplicating them. Prefix
caching must be off: a cached prompt token is never forwarded and so has no row.

Sampled tokens, pi_old and the sampling mask. vLLM's `return_sampling_mask` needs Model Runner
V2 as well. On the CPU runner the sampler's top-k/top-p stage (`sampler.topk_topp_sampler`)
returns the tokens it drew and, in the "processed_logprobs" mode, the log-probs it drew them
from: -inf exactly where top-k/top-p cut. A forward hook on that module keeps, per row, the
sampled token, its log-prob there (pi_old) and, if asked, the finite entries' ids (the kept
set: the sampler's own, of any size, no top-N limit or tie margin). Reading pi_old here spares
vLLM's per-token log-prob output path. Greedy batches never reach this stage (vLLM returns
before it); the engine asks vLLM for the sampled token's log-prob there. Rows follow the
persistent batch's request order; rows vLLM discards (a prompt whose prefill is still partial
samples a token that is thrown away) are skipped via the runner's `discard_request_mask`, so
a request keeps one row per generated token, in order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policy.checkpoint import checkpoint_tensors


def _moe_runners(model: torch.nn.Module) -> dict[int, Any]:
    """The model's MoE layers by decoder layer index."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return {m.layer_id: m for m in model.modules() if isinstance(m, MoERunner)}


@dataclass
class SampledStep:
    """What the sampler hook saw in one step, row i belonging to req_ids[i]: keep (rows vLLM
    did not discard), the sampled tokens, their pi_old and, if recorded, the kept ids of all
    rows concatenated (flat) with each row's count."""

    req_ids: list[str]
    keep: np.ndarray
    tokens: np.ndarray
    pi_old: np.ndarray
    flat: np.ndarray | None
    counts: np.ndarray | None


class RoutingCapture:
    """Per-request routing rows of one worker.

    rows[req_id]: (first position, ids [n, n_moe_layers, top_k] int16) segments, one per
    forward step the request took part in. errors: problems found inside vLLM's step loop,
    raised to the caller at the next `collect_routing` (raising there would kill the engine).
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.layers = sorted(_moe_runners(runner.get_model()))
        self.enabled = True
        self.in_step = False
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.rows: dict[str, list[tuple[int, np.ndarray]]] = {}
        self.errors: list[str] = []
        self.logits: dict[str, list[np.ndarray]] | None = None
        self.record_sampled = False  # sampled token + pi_old of every row
        self.record_kept = False  # and the kept ids
        self.sampled: list[SampledStep] = []
        self.original_execute_model = runner.execute_model

    def on_route(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        # Called inside the forward: keep it to one copy (the router may reuse its buffer).
        if self.enabled and self.in_step:
            self.pending.append((layer_id, topk_ids.detach().to("cpu", torch.int16, copy=True)))

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        self.pending.clear()
        self.in_step = True
        try:
            return self.original_execute_model(scheduler_output, *args, **kwargs)
        finally:
            self.in_step = False
            if self.enabled:
                try:
                    self.end_step(scheduler_output)
                except Exception as e:  # noqa: BLE001 (reported at collect time instead)
                    self.errors.append(f"{type(e).__name__}: {e}")
            self.pending.clear()

    def end_step(self, so: Any) -> None:
        """Split this step's captured rows among the requests it scheduled."""
        total = int(so.total_num_scheduled_tokens)
        if total == 0:
            return
        if not self.pending:
            self.errors.append(f"a forward step of {total} tokens captured no routing")
            return
        by_layer: dict[int, list[torch.Tensor]] = {}
        for layer_id, ids in self.pending:
            by_layer.setdefault(layer_id, []).append(ids)
        if sorted(by_layer) != self.layers:
            self.errors.append(
                f"routing captured for MoE layers {sorted(by_layer)}, expected {self.layers}"
            )
            return
        stacked = []
        for layer_id in self.layers:
            ids = torch.cat(by_layer[layer_id])
            # Rows beyond `total` would be padding; fewer rows means tokens went unrecorded.
            if ids.shape[0] < total:
                self.errors.append(
                    f"MoE layer {layer_id} captured {ids.shape[0]} rows for a step of {total} "
                    "tokens"
                )
                return
            stacked.append(ids[:total])
        step = torch.stack(stacked, dim=1).numpy()  # [total, n_moe_layers, top_k]
        starts = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        offset = 0
        for req_id in self.runner.input_batch.req_ids:
            n = so.num_scheduled_tokens.get(req_id, 0)
            if n:
                segment = (starts[req_id], step[offset : offset + n])
                self.rows.setdefault(req_id, []).append(segment)
                offset += n
        if offset != total:
            self.errors.append(f"batch order covers {offset} of the step's {total} tokens")

    def on_truncate(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        """Forward hook of the sampler's top-k/top-p stage: keep each sampled row's token,
        pi_old and (if asked) kept ids."""
        if not (self.enabled and self.record_sampled):
            return
        tokens, processed = output if isinstance(output, tuple) else (output, None)
        if processed is None:
            self.errors.append(
                "the sampler returned no processed log-probs (logprobs_mode must be "
                "'processed_logprobs'): pi_old and the kept set cannot be recorded"
            )
            return
        req_ids = self.runner.input_batch.req_ids
        if processed.shape[0] != len(req_ids) or tokens.shape[0] != len(req_ids):
            self.errors.append(
                f"the sampler saw {processed.shape[0]} rows for {len(req_ids)} requests "
                "(speculative decoding is not supported)"
            )
            return
        tokens = tokens.reshape(-1).long()
        pi_old = processed.gather(1, tokens[:, None])[:, 0].float().cpu().numpy()
        flat = counts = None
        if self.record_kept:
            finite = torch.isfinite(processed).cpu()
            flat = finite.nonzero()[:, 1].to(torch.int32).numpy()
            counts = finite.sum(dim=1).numpy()
        # Kept as the step's arrays: splitting them per request here would cost a Python loop
        # over the batch every step; collect_sampled does it once, vectorised.
        keep = ~self.runner.discard_request_mask.np[: len(req_ids)].astype(bool)
        self.sampled.append(
            SampledStep(list(req_ids), keep, tokens.cpu().numpy(), pi_old, flat, counts)
        )

    def on_sample(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the sampler: keep each request's logits row (test probe)."""
        if self.logits is None:
            return
        logits = args[0] if args else kwargs["logits"]
        rows = logits.detach().float().cpu().numpy()
        for i, req_id in enumerate(self.runner.input_batch.req_ids):
            self.logits.setdefault(req_id, []).append(rows[i].copy())


def install_capture(worker: Any, record_logits: bool = False) -> int:
    """Attach the routing capture (and, if asked, the sampler-logits probe) to this worker.

    Returns the number of MoE layers hooked. Installing twice is a no-op apart from
    `record_logits`.
    """
    runner = worker.model_runner
    cap = getattr(worker, "keeprl_capture", None)
    if cap is None:
        cap = RoutingCapture(runner)
        if not cap.layers:
            raise RuntimeError("routing capture: the served model has no MoE layers")
        for layer_id, moe in _moe_runners(runner.get_model()).items():
            router = getattr(moe, "router", None)
            if router is None or not hasattr(router, "set_capture_fn"):
                raise RuntimeError(
                    f"routing capture: MoE layer {layer_id} has no router capture hook "
                    f"({type(router).__name__})"
                )
            router.set_capture_fn(lambda ids, layer_id=layer_id: cap.on_route(layer_id, ids))
        # Why a wrapper: the router hook says which experts each row of a step picked, not
        # whose rows they are; only the scheduler output handed to execute_model says that.
        # It shadows the method on this runner instance only and calls straight through.
        runner.execute_model = cap.execute_model
        runner.sampler.register_forward_pre_hook(cap.on_sample, with_kwargs=True)
        runner.sampler.topk_topp_sampler.register_forward_hook(cap.on_truncate)
        worker.keeprl_capture = cap
    if record_logits and cap.logits is None:
        cap.logits = {}
    elif not record_logits:
        cap.logits = None
    return len(cap.layers)


def set_capture_enabled(worker: Any, enabled: bool) -> None:
    """Turn routing capture on or off (off: the hooks return at once; for baselines)."""
    worker.keeprl_capture.enabled = enabled


def set_record_sampled(worker: Any, sampled: bool, kept: bool) -> None:
    """From now on record every sampled token with its pi_old (`sampled`), and its kept ids
    (`kept`: truncated sampling only; an untruncated kept set is the whole vocabulary)."""
    worker.keeprl_capture.record_sampled = sampled
    worker.keeprl_capture.record_kept = sampled and kept


def reset_capture(worker: Any) -> None:
    """Drop whatever earlier steps left behind (an interrupted generate, say)."""
    cap = worker.keeprl_capture
    cap.rows.clear()
    cap.sampled.clear()
    cap.errors.clear()
    if cap.logits is not None:
        cap.logits.clear()


def _external_id(req_id: str, wanted: set[str]) -> str | None:
    # vLLM appends "-<8 random chars>" to the caller's request id inside the engine.
    if req_id in wanted:
        return req_id
    head = req_id.rsplit("-", 1)[0]
    return head if head in wanted else None


Packed = tuple[str, list[int], bytes]


def pack(array: np.ndarray) -> Packed:
    """An array as (dtype, shape, bytes): survives vLLM's RPC encoding across processes, which
    decodes an untyped numpy array as a bare list."""
    return array.dtype.str, list(array.shape), np.ascontiguousarray(array).tobytes()


def unpack(packed: Packed) -> np.ndarray:
    dtype, shape, data = packed
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def collect_routing(worker: Any, request_ids: list[str]) -> dict[str, Packed]:
    """Routing per request [positions, n_moe_layers, top_k] (int16, packed), for the caller's
    request ids, and forget it. Raises if a step went wrong or a request's positions have
    gaps."""
    cap = worker.keeprl_capture
    errors, cap.errors = cap.errors, []
    rows, cap.rows = cap.rows, {}
    if errors:
        raise RuntimeError("routing capture failed: " + "; ".join(errors[:3]))
    wanted = set(request_ids)
    out: dict[str, Packed] = {}
    for req_id, segments in rows.items():
        key = _external_id(req_id, wanted)
        if key is None:
            continue
        length = max(start + len(ids) for start, ids in segments)
        routed = np.full((length, *segments[0][1].shape[1:]), -1, dtype=np.int16)
        for start, ids in segments:
            routed[start : start + len(ids)] = ids
        if (routed < 0).any():
            gap = int(np.nonzero((routed < 0).any(axis=(1, 2)))[0][0])
            raise RuntimeError(f"routing capture: request {key} has no routing at position {gap}")
        out[key] = pack(routed)
    return out


def collect_sampled(worker: Any, request_ids: list[str]) -> dict[str, tuple[Packed, ...]]:
    """Per request (tokens int64, pi_old float32, and with kept ids recorded: flat kept ids
    int32, kept-set size per token int32), all packed, for the caller's request ids, and
    forget them. Rows are regrouped by request with one stable sort (step order is kept)."""
    cap = worker.keeprl_capture
    errors, cap.errors = cap.errors, []
    steps, cap.sampled = cap.sampled, []
    if errors:
        raise RuntimeError("sampler capture failed: " + "; ".join(errors[:3]))
    wanted = set(request_ids)
    keys: dict[str, int] = {}
    names: list[str | None] = []
    owner = []  # per step: each row's request number, -1 for rows of no wanted request
    for st in steps:
        row_owner = np.full(len(st.req_ids), -1, dtype=np.int64)
        for i, req_id in enumerate(st.req_ids):
            if st.keep[i]:
                if req_id not in keys:
                    keys[req_id] = len(names)
                    names.append(_external_id(req_id, wanted))
                row_owner[i] = keys[req_id]
        owner.append(row_owner)
    if not steps:
        return {}
    row_owner = np.concatenate(owner)
    tokens = np.concatenate([st.tokens for st in steps]).astype(np.int64)
    pi_old = np.concatenate([st.pi_old for st in steps]).astype(np.float32)
    with_kept = all(st.flat is not None for st in steps)
    order = np.argsort(row_owner, kind="stable")
    order = order[row_owner[order] >= 0]
    bounds = np.searchsorted(row_owner[order], np.arange(len(names) + 1))
    if with_kept:
        counts = np.concatenate([st.counts for st in steps]).astype(np.int64)
        flat = np.concatenate([st.flat for st in steps]).astype(np.int32)
        starts = np.cumsum(counts) - counts
        sorted_counts = counts[order]
        # Where each kept id of the regrouped rows sits in `flat`.
        within = np.arange(int(sorted_counts.sum())) - np.repeat(
            np.cumsum(sorted_counts) - sorted_counts, sorted_counts
        )
        sorted_flat = flat[np.repeat(starts[order], sorted_counts) + within]
        flat_bounds = np.concatenate([[0], np.cumsum(sorted_counts)])[bounds]
    out: dict[str, tuple[Packed, ...]] = {}
    for n, key in enumerate(names):
        if key is None:
            continue
        rows = order[bounds[n] : bounds[n + 1]]
        record = [pack(tokens[rows]), pack(pi_old[rows])]
        if with_kept:
            lo, hi = flat_bounds[n], flat_bounds[n + 1]
            record += [pack(sorted_flat[lo:hi]), pack(counts[rows].astype(np.int32))]
        out[key] = tuple(record)
    return out


def collect_logits(worker: Any, request_ids: list[str]) -> dict[str, Packed]:
    """The sampler's input logits per request [steps, vocab] float32 (test probe, packed), and
    forget them. A request's last len(response) rows are the ones its tokens were sampled
    from."""
    cap = worker.keeprl_capture
    logits, cap.logits = cap.logits or {}, {}
    wanted = set(request_ids)
    out = {}
    for req_id, rows in logits.items():
        key = _external_id(req_id, wanted)
        if key is not None:
            out[key] = pack(np.stack(rows))
    return out


RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...], level: int = logging.ERROR) -> Iterator[None]:
    """Drop the given loggers' records below `level` for the duration (their warnings are
    known benign). A filter, not setLevel: vLLM reconfigures logging while it starts, which
    resets its loggers' levels but leaves their filters alone."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= level

    loggers = [logging.getLogger(name) for name in names]
    for lg in loggers:
        lg.addFilter(keep)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(keep)


def reload_weights(worker: Any, source: list[tuple[str, torch.Tensor]] | str) -> None:
    """Load new weights into the running model: vLLM's in-place reload, then the one step it
    skips on CPU.

    source: (HF name, tensor) pairs, or a checkpoint directory read on the worker. vLLM's
    reload re-runs each layer's post-load processing; for MoE layers whose kernel already
    exists it copies the new plain [E, 2I, D] / [E, D, I] expert weights into place but skips
    the CPU experts' repacking into their blocked layout, which the kernel then misreads. We
    run that repacking (the experts' own post-load step, as on first load) for every MoE layer.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.platforms import current_platform

    weights = checkpoint_tensors(source) if isinstance(source, str) else iter(source)
    experts = []
    if current_platform.is_cpu():
        for module in worker.model_runner.get_model().modules():
            if isinstance(module, RoutedExperts):
                kernel = getattr(module.quant_method, "moe_kernel", None)
                fused = getattr(kernel, "fused_experts", None)
                if not isinstance(fused, CPUUnquantizedExperts):
                    raise NotImplementedError(
                        f"in-place reload knows only plain CPU experts, not {type(fused)}"
                    )
                experts.append((module, fused))
    # vLLM warns of every tensor a reload does not overwrite; here those are all derived (the
    # rotary cos/sin table, MLA's absorbed W_UK_T / W_UV, rebuilt from kv_b_proj), and the
    # in-place == fresh-engine test covers them. Their warnings, each step, would bury the
    # trainer's log.
    with quiet_loggers(RELOAD_LOGGERS):
        worker.reload_weights(weights_iterator=weights)
    for module, fused in experts:
        fused.process_weights_after_loading(module)


class WorkerExtension:
    """Methods vLLM mixes into its worker class, so collective_rpc can call them by name."""

    def keeprl_install_capture(self, record_logits: bool = False) -> int:
        return install_capture(self, record_logits)

    def keeprl_set_capture_enabled(self, enabled: bool) -> None:
        set_capture_enabled(self, enabled)

    def keeprl_reset_capture(self) -> None:
        reset_capture(self)

    def keeprl_set_record_sampled(self, sampled: bool, kept: bool) -> None:
        set_record_sampled(self, sampled, kept)

    def keeprl_collect_sampled(self, request_ids: list[str]) -> dict[str, tuple[Packed, ...]]:
        return collect_sampled(self, request_ids)

    def keeprl_collect_routing(self, request_ids: list[str]) -> dict[str, Packed]:
        return collect_routing(self, request_ids)

    def keeprl_collect_logits(self, request_ids: list[str]) -> dict[str, Packed]:
        return collect_logits(self, request_ids)

    def keeprl_reload_weights(self, source: list[tuple[str, torch.Tensor]] | str) -> None:
        reload_weights(self, source)


EXTENSION = f"{__name__}.WorkerExtension"
