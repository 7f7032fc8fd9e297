"""vLLM's request outputs and the worker-side captures, turned into Trajectory records.

The vLLM engine (rollout/vllm_engine.py) hands each finished request here with what its
captures recorded: the routing of every forwarded token and, on CPU, the sampler's own record
of each sampled token (its processed log-prob, pi_old, and the ids top-k/top-p kept). Every
check that the record is what vLLM did lives here too: the recorded tokens are the returned
ones, each sampled token lies in its kept set, the routing has the model's shape and names
distinct, existing experts. Plain numpy on duck-typed outputs (`request_id`,
`prompt_token_ids`, `outputs[0]` with `token_ids`, `finish_reason`, `logprobs`,
`routed_experts`): nothing here imports vLLM, so it is tested on hand-built outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from policy.args import ModelArgs

from .trajectory import Sampling, Trajectory, compact_routing


@dataclass(frozen=True)
class RecordSpec:
    """What the checks need to know of the engine: the served model's architecture, whether
    vLLM serves its dense equivalent with keeprl's captures (CPU) or its own recorder returns
    the routing (GPU), and the extra top-N log-probs asked for beyond top_k (GPU)."""

    args: ModelArgs
    dense: bool
    tie_margin: int = 0


def trajectory(
    out: Any,
    spec: RecordSpec,
    *,
    prompt_index: int,
    sampling: Sampling,
    from_sampler: bool,
    n_logprobs: int | None,
    routing: np.ndarray | None,
    sampled: list[np.ndarray] | None,
    engine: str,
    weight_version: int,
) -> Trajectory:
    """The Trajectory of one finished request. from_sampler: pi_old and the kept sets come
    from the sampler capture (`sampled`), else from vLLM's top-N log-probs."""
    completion = out.outputs[0]
    response = list(completion.token_ids)
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(
            f"request {out.request_id} ended with finish_reason={completion.finish_reason!r}"
        )
    if routing is None and spec.dense:
        raise RuntimeError(f"request {out.request_id}: routing capture returned nothing")
    if from_sampler:
        logprobs, kept = sampler_record(out.request_id, completion, sampling, sampled)
    else:
        logprobs, kept = decode_logprobs(
            out.request_id, completion, sampling, n_logprobs or 0, spec
        )
    if routing is None:
        routing = returned_routing(out.request_id, completion, spec.args)
    return Trajectory(
        prompt_ids=list(out.prompt_token_ids),
        response_ids=response,
        logprobs=logprobs,
        routing=compact_routing(routing),
        kept_ids=kept,
        sampling=sampling,
        finish_reason=completion.finish_reason,
        engine=engine,
        weight_version=weight_version,
        prompt_index=prompt_index,
        extra={"request_id": out.request_id},
    )


def decode_logprobs(
    request_id: str,
    completion: Any,
    sampling: Sampling,
    n_logprobs: int,
    spec: RecordSpec,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """pi_old [R] and the kept ids of each position from vLLM's flat log-probs (greedy on
    CPU; GPUs).

    Each position holds 1 + n_logprobs entries: the sampled token first, then the top
    n_logprobs (which may repeat it), -inf where top-k/top-p cut.
    """
    flat = completion.logprobs
    response = np.asarray(completion.token_ids, dtype=np.int64)
    if flat is None or len(flat.start_indices) != len(response):
        raise RuntimeError(f"request {request_id}: vLLM returned no log-prob per token")
    width = 1 + n_logprobs
    if np.any(np.subtract(flat.end_indices, flat.start_indices) != width):
        raise RuntimeError(f"request {request_id}: expected {width} log-probs per token")
    ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(-1, width)
    values = np.asarray(flat.logprobs, dtype=np.float64).reshape(-1, width)
    bad = (ids[:, 0] != response) | ~np.isfinite(values[:, 0])
    if bad.any():
        t = int(np.argmax(bad))
        raise RuntimeError(
            f"request {request_id}, response position {t}: vLLM returned no finite "
            f"log-prob for the sampled token {int(response[t])}"
        )
    pi_old = values[:, 0].astype(np.float32)
    if not sampling.truncated:
        return pi_old, [np.empty(0, dtype=np.int32) for _ in range(len(response))]
    finite = np.isfinite(values[:, 1:])
    if n_logprobs < spec.args.vocab_size and finite.all(axis=1).any():
        t = int(np.argmax(finite.all(axis=1)))
        raise RuntimeError(
            f"request {request_id}, response position {t}: all {n_logprobs} returned "
            f"log-probs are finite, so top-k ties may have kept more tokens than were "
            f"returned; raise tie_margin (now {spec.tie_margin})"
        )
    top = ids[:, 1:]
    inside = ((top == response[:, None]) & finite).any(axis=1)
    if not inside.all():  # impossible unless vLLM's sampler and log-probs disagree
        t = int(np.argmin(inside))
        raise RuntimeError(
            f"request {request_id}, position {t}: sampled token {int(response[t])} is "
            "outside the recorded kept set"
        )
    # Ascending kept ids first in each row (the cut entries sort last as `vocab`).
    ordered = np.sort(np.where(finite, top, spec.args.vocab_size), axis=1).astype(np.int32)
    return pi_old, [ordered[t, :c] for t, c in enumerate(finite.sum(axis=1).tolist())]


def sampler_record(
    request_id: str, completion: Any, sampling: Sampling, sampled: list[np.ndarray] | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """pi_old [R] and the kept ids of each position from the sampler hook's record
    (tokens, pi_old[, flat kept ids, kept-set sizes]), checked against vLLM's output."""
    if sampled is None:
        raise RuntimeError(f"request {request_id}: the sampler capture returned nothing")
    response = np.asarray(completion.token_ids, dtype=np.int64)
    tokens, pi_old = sampled[0], sampled[1]
    if not np.array_equal(tokens, response):
        raise RuntimeError(
            f"request {request_id}: the sampler recorded {len(tokens)} tokens that differ "
            f"from the {len(response)} vLLM returned"
        )
    if not np.isfinite(pi_old).all():
        t = int(np.argmin(np.isfinite(pi_old)))
        raise RuntimeError(
            f"request {request_id}, response position {t}: the sampled token's processed "
            "log-prob is not finite"
        )
    if not sampling.truncated:
        return pi_old, [np.empty(0, dtype=np.int32) for _ in range(len(response))]
    if len(sampled) != 4:
        raise RuntimeError(f"request {request_id}: the sampler recorded no kept sets")
    flat, counts = sampled[2], sampled[3]
    if len(counts) != len(response) or int(counts.sum()) != len(flat):
        raise RuntimeError(f"request {request_id}: the recorded kept sets do not add up")
    # Each token must be in its own kept set: count the matches per position.
    position = np.repeat(np.arange(len(response)), counts)
    found = np.bincount(position[flat == response[position]], minlength=len(response))
    if not found.all():
        t = int(np.argmin(found))
        raise RuntimeError(
            f"request {request_id}, position {t}: sampled token {int(response[t])} is "
            "outside the recorded kept set"
        )
    kept = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
    return pi_old, kept


def returned_routing(request_id: str, completion: Any, args: ModelArgs) -> np.ndarray:
    """Routing from vLLM's own recorder (GPU, Model Runner V2). Untested here."""
    routed = getattr(completion, "routed_experts", None)
    if routed is None:
        raise RuntimeError(f"request {request_id}: vLLM returned no routed experts")
    routed = np.asarray(routed)
    if routed.shape[1] == args.num_hidden_layers:  # dense layers' rows are unused
        routed = routed[:, args.first_k_dense_replace :]
    return routed


def check_routing(trajectories: list[Trajectory], spec: RecordSpec) -> None:
    """Fail loudly on routing that cannot be what the model did."""
    args = spec.args
    shape = (args.n_moe_layers, args.num_experts_per_tok)
    any_nonzero = False
    for i, traj in enumerate(trajectories):
        r = traj.routing
        # The final token is never forwarded on CPU; vLLM's own recorder may count it.
        rows = (traj.num_tokens - 1,) if spec.dense else (traj.num_tokens - 1, traj.num_tokens)
        if r.shape[0] not in rows or r.shape[1:] != shape:
            raise RuntimeError(
                f"trajectory {i}: routing shape {r.shape}, expected "
                f"({traj.num_tokens - 1}, {shape[0]}, {shape[1]})"
            )
        if r.size and (int(r.min()) < 0 or int(r.max()) >= args.n_routed_experts):
            raise RuntimeError(f"trajectory {i}: routing holds ids outside the experts")
        if shape[1] > 1 and r.size:
            ordered = np.sort(r, axis=-1)
            if (ordered[..., 1:] == ordered[..., :-1]).any():
                raise RuntimeError(
                    f"trajectory {i}: a token was routed to the same expert twice "
                    "(an unwritten capture buffer?)"
                )
        any_nonzero = any_nonzero or bool(r.any())
    if trajectories and not any_nonzero:
        raise RuntimeError("routing capture returned all zeros")
