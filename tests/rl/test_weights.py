"""The learner side of a streamed weight sync (rl/weights.py): buckets cover the state dict in
order within their byte budget, a gathered bucket is the weights themselves, and the learner's
weight version counts finished RL steps and refuses any other."""

from __future__ import annotations

import pytest
import torch

from policy import Transformer, preset
from rl.weights import WeightVersion, bucket_names, gather_bucket


def test_buckets_cover_the_state_dict_in_order_within_their_budget():
    model = Transformer(preset("tiny"))
    state = model.state_dict()
    sizes = {n: t.numel() * t.element_size() for n, t in state.items()}
    budget = 64 << 10
    buckets = bucket_names(model, budget)
    assert [n for b in buckets for n in b] == list(state)
    assert len(buckets) > 1
    for b in buckets:  # over budget only as a single tensor that is itself larger
        assert sum(sizes[n] for n in b) <= budget or len(b) == 1
    assert bucket_names(model, 1) == [[n] for n in state]
    with pytest.raises(ValueError):
        bucket_names(model, 0)


def test_a_gathered_bucket_is_a_cpu_copy_of_the_weights():
    model = Transformer(preset("tiny"))
    names = bucket_names(model, 64 << 10)[1]
    bucket = gather_bucket(model, names)
    assert list(bucket) == names
    for n in names:
        torch.testing.assert_close(bucket[n], model.state_dict()[n], rtol=0, atol=0)
        assert bucket[n].data_ptr() != model.state_dict()[n].data_ptr()


def test_the_weight_version_counts_finished_steps():
    v = WeightVersion(start=5, updates_per_batch=2)
    v.check(5)
    v.updated()
    with pytest.raises(RuntimeError, match="1 of 2 updates into the next"):
        v.check(5)  # half-way through a step: neither version's weights
    v.updated()
    v.check(6)
    with pytest.raises(RuntimeError, match="learner holds version 6"):
        v.check(7)
