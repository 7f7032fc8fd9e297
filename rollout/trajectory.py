"""The Trajectory record every rollout engine returns, and the Engine interface.

A trajectory is what the sampler saw while generating one response, so the learner can see
exactly the same: the sampler's log-prob of every sampled token under the truncated
distribution it was drawn from (pi_old), the experts every token was routed to in every MoE
layer (Keep Routing), and the token ids top-k/top-p kept at every sampled position (Keep
Sampling Mask). The record is the same whichever engine produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampling parameters, vLLM's meaning. top_k <= 0 and top_p == 1 disable truncation;
    temperature 0 is greedy. stop_token_ids end a response (the stop token is kept)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: no nucleus cut
    top_k: int = 0  # <= 0: no top-k cut
    max_tokens: int = 64  # response tokens at most
    seed: int | None = None  # None: fresh entropy (keeprl train sets one per step)
    stop_token_ids: tuple[int, ...] = ()  # end a response (kept); keeprl train adds the EOS

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def truncated(self) -> bool:
        """Whether top-k or top-p cut the distribution (so kept ids are recorded)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)


@dataclass(kw_only=True)
class Trajectory:
    """One sampled response.

    prompt_ids, response_ids: token ids. logprobs [len(response_ids)] float32: pi_old of each
    response token. routing [tokens, n_moe_layers, top_k] (uint8 when ids < 256, else int16):
    tokens = prompt + response, or one fewer (the final token never passes through the
    sampler's model). kept_ids: per response position the kept token ids (int32 arrays; empty
    when sampling did not truncate). finish_reason: "stop" or "length".
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: np.ndarray
    routing: np.ndarray
    kept_ids: list[np.ndarray]
    sampling: Sampling
    finish_reason: str
    engine: str
    weight_version: int
    prompt_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_resp = len(self.response_ids)
        if len(self.logprobs) != n_resp or len(self.kept_ids) != n_resp:
            raise ValueError(
                f"trajectory: {len(self.logprobs)} log-probs and "
                f"{len(self.kept_ids)} kept sets for {n_resp} response tokens"
            )
        total = len(self.prompt_ids) + n_resp
        if self.routing.ndim != 3 or self.routing.shape[0] not in (total, total - 1):
            raise ValueError(
                f"trajectory: routing shape {self.routing.shape} does not cover "
                f"{total} tokens ([tokens or tokens - 1, n_moe_layers, top_k])"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def compact_routing(ids: np.ndarray) -> np.ndarray:
    """Expert ids as the smallest unsigned/signed int type that holds them."""
    ids = np.asarray(ids)
    return ids.astype(np.uint8 if ids.size == 0 or ids.max() < 256 else np.int16)


class Engine(Protocol):
    """What the trainer needs from a rollout engine."""

    name: str
    weight_version: int

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, n: int = 1
    ) -> list[Trajectory]:
        """n responses per prompt, prompt-major order (prompt 0's n, then prompt 1's ...)."""
        ...

    def update_weights(self, source: Any, version: int) -> str:
        """Load new policy weights (a state dict or a checkpoint directory); returns the route
        taken (e.g. "in-place", "rebuild")."""
        ...
