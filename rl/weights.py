"""The learner side of a streamed weight sync: the policy's tensors in buckets of about
`bucket_bytes`, each gathered from the learner's shards on its own, so no rank ever holds the
whole model for a sync (rollout/weights.py assembles them on the rollout side).

Under FSDP2 every parameter is a DTensor sharded over the ranks; gathering a bucket is a
collective every rank runs with the same names in the same order (rl/sharded.py), and each
rank holds one bucket's full tensors at most. A single tensor larger than `bucket_bytes` (a
layer's stacked experts, say) is a bucket of its own. Without FSDP the same code reads the
plain tensors.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_BUCKET_BYTES = 512 << 20


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # a DTensor: gather its shards
    return full_tensor() if callable(full_tensor) else t


def bucket_names(model: nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[str]]:
    """The state dict's names in order, grouped into buckets of at most bucket_bytes (the
    full, unsharded sizes), a tensor larger than that alone in its bucket."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()  # a DTensor's numel is the global one
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def gather_bucket(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The bucket's tensors, full and on the CPU. Collective under FSDP2: every rank calls it
    with the same names."""
    state = model.state_dict()
    return {name: _full(state[name]).detach().to("cpu", copy=True) for name in names}


class WeightVersion:
    """The learner's weight version: the trainer's RL steps it has finished (each
    `updates_per_batch` optimizer updates), from the version it started at."""

    def __init__(self, start: int, updates_per_batch: int) -> None:
        self.start, self.per_batch, self.updates = int(start), int(updates_per_batch), 0

    @property
    def current(self) -> int:
        return self.start + self.updates // self.per_batch

    def updated(self) -> None:
        self.updates += 1

    def check(self, version: int) -> None:
        if self.updates % self.per_batch or int(version) != self.current:
            raise RuntimeError(
                f"weights of version {version} asked for, but the learner holds version "
                f"{self.current} ({self.updates % self.per_batch} of {self.per_batch} updates "
                "into the next)"
            )
