"""The rollout side of a streamed weight sync (rollout/weights.py): a complete set of one
version is applied in the announced order; a bucket of another version, an unannounced tensor
or a missing one stops the sync before anything is loaded."""

from __future__ import annotations

import pytest
import torch

from rollout.weights import WeightStaging, WeightSyncError


def _bucket(*names):
    return {n: torch.full((2,), float(i)) for i, n in enumerate(names)}


def test_a_complete_set_comes_back_in_the_announced_order():
    staging = WeightStaging(3, ["a", "b", "c"])
    staging.add(3, _bucket("c"))
    staging.add(3, _bucket("a", "b"))
    assert list(staging.complete(3)) == ["a", "b", "c"]


def test_buckets_of_another_version_are_refused():
    staging = WeightStaging(3, ["a", "b"])
    with pytest.raises(WeightSyncError, match="version 2 arrived during the sync of 3"):
        staging.add(2, _bucket("a"))
    staging.add(3, _bucket("a", "b"))
    with pytest.raises(WeightSyncError, match="commit of weight version 4"):
        staging.complete(4)


def test_missing_and_unannounced_tensors_are_refused():
    staging = WeightStaging(1, ["a", "b", "c"])
    with pytest.raises(WeightSyncError, match="unannounced"):
        staging.add(1, _bucket("a", "z"))
    staging.add(1, _bucket("a"))
    with pytest.raises(WeightSyncError, match="2 of 3 tensors never arrived"):
        staging.complete(1)
    with pytest.raises(WeightSyncError, match="repeat"):
        WeightStaging(1, ["a", "a"])
