"""vLLM outputs into Trajectory records, and the checks that the record is what vLLM did, on
hand-built outputs: no vLLM engine (this module runs where vLLM is not installed)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from policy import preset
from rollout.trajectory import Sampling
from rollout.vllm_records import (
    RecordSpec,
    check_routing,
    decode_logprobs,
    returned_routing,
    trajectory,
)

ARGS = preset("tiny", vocab_size=128)  # 2 layers (1 dense + 1 MoE), 8 experts, top-2
SPEC = RecordSpec(ARGS, dense=True)
TOPK = Sampling(temperature=1.0, top_k=3, max_tokens=4)


def _output(response, finish="stop", logprobs=None, routed=None):
    completion = NS(
        token_ids=response, finish_reason=finish, logprobs=logprobs, routed_experts=routed
    )
    return NS(request_id="7", prompt_token_ids=[1, 2, 3], outputs=[completion])


def _sampled(response, kept):
    counts = np.array([len(k) for k in kept], dtype=np.int64)
    flat = np.concatenate([np.array(k, dtype=np.int32) for k in kept])
    pi_old = -np.arange(1, len(response) + 1, dtype=np.float32) / 10
    return [np.array(response, dtype=np.int64), pi_old, flat, counts]


def _routing(tokens, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(8, size=(1, 2), replace=False) for _ in range(tokens)])


def _build(out, sampled, routing, sampling=TOPK):
    return trajectory(
        out,
        SPEC,
        prompt_index=4,
        sampling=sampling,
        from_sampler=True,
        n_logprobs=None,
        routing=routing,
        sampled=sampled,
        engine="vllm",
        weight_version=2,
    )


def test_a_sampler_record_becomes_a_trajectory():
    response, kept = [5, 9, 1], [[2, 5, 7], [9], [1, 4]]
    traj = _build(_output(response), _sampled(response, kept), _routing(5))
    assert traj.prompt_ids == [1, 2, 3] and traj.response_ids == response
    assert [k.tolist() for k in traj.kept_ids] == kept
    np.testing.assert_allclose(traj.logprobs, [-0.1, -0.2, -0.3])
    assert traj.routing.shape == (5, 1, 2) and traj.routing.dtype == np.uint8
    assert (traj.prompt_index, traj.weight_version, traj.extra) == (4, 2, {"request_id": "7"})
    check_routing([traj], SPEC)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("tokens", "the sampler recorded 3 tokens that differ"),
        ("outside", "position 1: sampled token 9 is outside the recorded kept set"),
        ("counts", "the recorded kept sets do not add up"),
        ("nan", "position 0: the sampled token's processed log-prob is not finite"),
        ("none", "the sampler capture returned nothing"),
        ("no routing", "routing capture returned nothing"),
        ("aborted", "ended with finish_reason='abort'"),
    ],
)
def test_a_record_that_is_not_what_vllm_did_fails_loudly(change, message):
    response, kept = [5, 9, 1], [[2, 5, 7], [9], [1, 4]]
    sampled, routing, finish = _sampled(response, kept), _routing(5), "stop"
    if change == "tokens":
        sampled[0] = np.array([5, 8, 1])
    elif change == "outside":
        sampled = _sampled(response, [[2, 5, 7], [3], [1, 4]])
    elif change == "counts":
        sampled[3] = sampled[3] + 1
    elif change == "nan":
        sampled[1][0] = np.nan
    elif change == "none":
        sampled = None
    elif change == "no routing":
        routing = None
    else:
        finish = "abort"
    with pytest.raises(RuntimeError, match=message):
        _build(_output(response, finish), sampled, routing)


def test_untruncated_sampling_records_no_kept_sets():
    response = [5, 9]
    sampled = _sampled(response, [[5], [9]])[:2]  # tokens and pi_old only
    traj = _build(_output(response), sampled, _routing(4), Sampling(temperature=0.7))
    assert all(len(k) == 0 for k in traj.kept_ids)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", r"routing shape \(4, 1, 2\), expected \(3, 1, 2\)"),
        ("range", "routing holds ids outside the experts"),
        ("twice", "routed to the same expert twice"),
    ],
)
def test_routing_that_cannot_be_the_models_fails(change, message):
    response = [5]  # 3 prompt tokens + 1: 3 forwarded tokens on CPU (the last never is)
    routing = _routing(3)
    if change == "shape":
        routing = _routing(4)  # a row for the final token too: what vLLM's GPU recorder gives
    elif change == "range":
        routing[0, 0, 0] = 8
    elif change == "twice":
        routing[1, 0] = [3, 3]
    traj = _build(_output(response), _sampled(response, [[5]]), routing)
    with pytest.raises(RuntimeError, match=message):
        check_routing([traj], SPEC)
    if change == "shape":  # where vLLM's own recorder routes, that row is allowed
        check_routing([traj], RecordSpec(ARGS, dense=False))


def test_all_zero_routing_is_an_unwritten_capture():
    args = preset("tiny", vocab_size=128, num_experts_per_tok=1)
    traj = _build(_output([5]), _sampled([5], [[5]]), np.zeros((3, 1, 1), dtype=np.int64))
    with pytest.raises(RuntimeError, match="routing capture returned all zeros"):
        check_routing([traj], RecordSpec(args, dense=True))


def test_top_n_logprobs_decode_to_pi_old_and_kept_sets():
    """The GPU route: 1 + N entries per position, the sampled token first, -inf where cut."""
    response = [5, 9]
    ids = [[5, 5, 7, 2, 1], [9, 3, 9, 0, 4]]
    values = [[-0.5, -0.5, -1.0, -2.0, -np.inf], [-0.1, -3.0, -0.1, -np.inf, -np.inf]]
    flat = NS(
        start_indices=[0, 5],
        end_indices=[5, 10],
        token_ids=sum(ids, []),
        logprobs=sum(values, []),
    )
    pi_old, kept = decode_logprobs("7", NS(token_ids=response, logprobs=flat), TOPK, 4, SPEC)
    np.testing.assert_allclose(pi_old, [-0.5, -0.1])
    assert [k.tolist() for k in kept] == [[2, 5, 7], [3, 9]]
    flat.logprobs = sum([[-0.5, -0.5, -1.0, -2.0, -2.5], values[1]], [])
    with pytest.raises(RuntimeError, match="all 4 returned log-probs are finite"):
        decode_logprobs("7", NS(token_ids=response, logprobs=flat), TOPK, 4, SPEC)


def test_vllms_own_routing_drops_the_dense_layers_rows():
    routed = np.arange(3 * 2 * 2).reshape(3, 2, 2) % 8  # [tokens, all layers, k]
    got = returned_routing("7", NS(routed_experts=routed), ARGS)
    assert got.shape == (3, 1, 2) and np.array_equal(got, routed[:, 1:])
    with pytest.raises(RuntimeError, match="returned no routed experts"):
        returned_routing("7", NS(routed_experts=None), ARGS)
