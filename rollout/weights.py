"""The rollout side of a streamed weight sync: buckets of named tensors arrive one by one,
each tagged with the weight version it belongs to, and are applied only when every tensor the
sync announced has arrived with that same version.

The learner never gathers the whole model on one rank: it gathers one bucket at a time
(rl/weights.py) and the rollout worker assembles the buckets here, then loads them into its
engine through the engine's own in-place route (`update_weights`), so a half-received or
mixed-version set of weights can never be served.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class WeightSyncError(RuntimeError):
    """A streamed weight sync that cannot be applied: versions disagree or tensors are missing."""


class WeightStaging:
    """One version's buckets, collected until commit."""

    def __init__(self, version: int, names: Sequence[str]) -> None:
        self.version = int(version)
        self.expected = list(names)
        if len(set(self.expected)) != len(self.expected):
            raise WeightSyncError(f"weight sync {version}: the announced names repeat")
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, version: int, bucket: Mapping[str, torch.Tensor]) -> None:
        """Keep a bucket of the announced version; a bucket of another version, or a name not
        announced, is an error (a stale or misrouted bucket must never be loaded)."""
        if int(version) != self.version:
            raise WeightSyncError(
                f"a bucket of weight version {version} arrived during the sync of {self.version}"
            )
        unknown = set(bucket) - set(self.expected)
        if unknown:
            raise WeightSyncError(
                f"weight sync {self.version}: unannounced tensors {sorted(unknown)[:5]}"
            )
        self.tensors.update(bucket)

    def complete(self, version: int) -> dict[str, torch.Tensor]:
        """Every announced tensor, in the announced order, if all arrived for `version`."""
        if int(version) != self.version:
            raise WeightSyncError(
                f"commit of weight version {version}, but version {self.version} was staged"
            )
        missing = [n for n in self.expected if n not in self.tensors]
        if missing:
            raise WeightSyncError(
                f"weight sync {self.version}: {len(missing)} of {len(self.expected)} tensors "
                f"never arrived, e.g. {missing[:5]}"
            )
        return {n: self.tensors[n] for n in self.expected}
