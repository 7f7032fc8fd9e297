"""The sparse-stage indexer loss kernels against their torch reference and against
policy.indexer.indexer_kl through autograd: -1 slots anywhere in a row, a KV-cache offset, rows
with a single valid slot or none, invalid queries, keys that every query selects (the scatter-add
of dk), exact-zero logits from the ReLU. On the CPU the kernels run in Triton's interpreter
(small shapes, fp32); `pytest -m gpu` runs them compiled, bf16 included, at DeepSeek-V3.2's
indexer dims (64 heads x 128, 2048 selected keys)."""

from __future__ import annotations

import pytest
import torch

from kernels.indexer import indexer_scores_reference
from kernels.indexer_loss import (
    Tiling,
    sparse_indexer_kl,
    sparse_indexer_kl_reference,
    sparse_indexer_scores,
    sparse_indexer_scores_reference,
)
from policy.indexer import indexer_kl, select_topk, selection_mask

# The smallest blocks, so the interpreter's loop over slots runs several times even at K = 16.
SMALL = Tiling(block_k=16, num_warps=4, num_stages=1)


def _inputs(
    b, t, s, kk, h=4, d=16, dtype=torch.float32, device="cpu", hot_keys=0, seed=0, raw_p=False
):
    """q, k, w, and a causal top-kk selection idx [b, t, kk] (int32) of random scores with its
    -1 slots shuffled through each row; the queries are the last t of s tokens. hot_keys: that
    many leading keys win every query's selection (keys shared by many queries). p: a random
    distribution on each row's valid slots; raw_p: scaled per row and with mass on the -1 slots
    too, which the loss must renormalise away."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).to(dtype)
    k = torch.randn(b, s, d, generator=g).to(dtype)
    w = torch.randn(b, t, h, generator=g) * (h * d) ** -0.5
    scores = torch.rand(b, t, s, generator=g)
    scores[..., :hot_keys] += 10
    visible = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
    idx = select_topk(scores.masked_fill(~visible, float("-inf")), kk)
    idx = idx.gather(-1, torch.rand(idx.shape, generator=g).argsort(-1)).int()
    p = (2 * torch.randn(idx.shape, generator=g)).masked_fill(idx < 0, float("-inf")).softmax(-1)
    if raw_p:
        p = p * (0.5 + 3 * torch.rand(b, t, 1, generator=g)) + 0.3 * (idx < 0)
    return [x.to(device) for x in (q, k, w, idx, p)]


def _grads(fn, q, k, w, *rest, **kw):
    """fn's loss and its gradients in q, k and w."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, w)]
    loss = fn(*leaves, *rest, **kw)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def _kernel_grads(q, k, w, idx, p, valid):
    return _grads(
        sparse_indexer_kl, q, k, w, idx, p, valid, forward_tiling=SMALL, backward_tiling=SMALL
    )


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("b", "t", "s", "kk"),
    [(1, 16, 16, 8), (2, 37, 37, 12), (1, 9, 40, 16), (2, 40, 40, 40)],
    ids=["square", "ragged-k", "cache-offset", "k-equals-s"],
)
def test_scores_match_the_reference(device, b, t, s, kk):
    q, k, w, idx, _ = _inputs(b, t, s, kk, device=device)
    got = sparse_indexer_scores(q, k, w, idx, tiling=SMALL)
    want = sparse_indexer_scores_reference(q, k, w, idx)
    assert got.dtype == torch.float32 and got.shape == idx.shape
    assert torch.equal(torch.isinf(got), idx < 0)  # -inf exactly at the -1 slots
    _close(got[idx >= 0], want[idx >= 0])


@pytest.mark.parametrize(
    ("b", "t", "s", "kk", "hot_keys", "invalid", "raw_p"),
    [
        (2, 37, 37, 12, 0, 0.0, False),
        (1, 9, 40, 16, 0, 0.0, False),
        (2, 24, 24, 8, 3, 0.0, False),
        (2, 30, 30, 12, 2, 0.3, False),
        (1, 20, 20, 12, 0, 0.0, True),
    ],
    ids=["causal", "cache-offset", "hot-keys", "invalid-queries", "unnormalised-target"],
)
def test_loss_and_gradients_match_the_reference(device, b, t, s, kk, hot_keys, invalid, raw_p):
    q, k, w, idx, p = _inputs(b, t, s, kk, device=device, hot_keys=hot_keys, raw_p=raw_p)
    valid = torch.rand(b, t, generator=torch.Generator().manual_seed(1)).to(device) >= invalid
    if hot_keys:  # the scatter-add: each hot key collects dk from every query
        assert ((idx == 0).sum() == b * t) and ((idx == hot_keys - 1).sum() >= b * (t - 2))
    loss, grads = _kernel_grads(q, k, w, idx, p, valid)
    want_loss, want_grads = _grads(sparse_indexer_kl_reference, q, k, w, idx, p, valid)
    _close(loss, want_loss)
    for got, want in zip(grads, want_grads, strict=True):
        _close(got, want)


def test_matches_indexer_kl_through_autograd(device):
    # The kernel's loss is indexer_kl on the dense scores with support = the selected set and
    # the target scattered into key positions (a target off the -1 slots and not summing to 1:
    # both renormalise it); its gradients are torch autograd's through both.
    b, t, s, kk = 2, 24, 28, 10
    q, k, w, idx, p = _inputs(b, t, s, kk, device=device, hot_keys=2, seed=3, raw_p=True)
    valid = torch.ones(b, t, dtype=torch.bool, device=device)
    valid[0, ::5] = False
    cols = idx.long().masked_fill(idx < 0, s)  # -1 slots land in a spare column, cut off
    probs = torch.zeros(b, t, s + 1, device=device).scatter_(-1, cols, p)[..., :s]
    assert not torch.allclose(probs.sum(-1), torch.ones(b, t, device=device))
    support = selection_mask(idx.long(), s)

    def dense(q, k, w):
        scores = indexer_scores_reference(q, k, w, s - t)
        return indexer_kl(probs.unsqueeze(1), scores, support, valid.float())

    want_loss, want_grads = _grads(dense, q, k, w)
    loss, grads = _kernel_grads(q, k, w, idx, p, valid)
    _close(loss, want_loss)
    for got, want in zip(grads, want_grads, strict=True):
        _close(got, want)


def test_invalid_queries_contribute_nothing(device):
    q, k, w, idx, p = _inputs(1, 20, 20, 8, device=device, hot_keys=2)
    valid = torch.ones(1, 20, dtype=torch.bool, device=device)
    valid[0, 5:12] = False
    loss, (dq, dk, dw) = _kernel_grads(q, k, w, idx, p, valid)
    assert (dq[~valid] == 0).all() and (dw[~valid] == 0).all()
    # Whatever the invalid queries hold, the loss and the keys' gradients stay as they were.
    g = torch.Generator().manual_seed(7)
    q2, w2, p2 = q.clone(), w.clone(), p.clone()
    q2[~valid] = torch.randn(q2[~valid].shape, generator=g).to(device)
    w2[~valid] = torch.randn(w2[~valid].shape, generator=g).to(device)
    p2[~valid] = p2[~valid].flip(-1)
    loss2, (_, dk2, _) = _kernel_grads(q2, k, w2, idx, p2, valid)
    _close(loss2, loss, 1e-6)
    _close(dk2, dk, 1e-6)
    # No valid query at all: a zero loss and zero gradients, not 0 / 0.
    loss, grads = _kernel_grads(q, k, w, idx, p, torch.zeros_like(valid))
    assert loss == 0 and all((g == 0).all() for g in grads)


def test_single_valid_slot_rows_are_exact_zeros(device):
    # With one valid slot both distributions are one-hot on it: KL and gradients exactly 0.
    q, k, w, idx, _ = _inputs(2, 12, 12, 16, device=device)
    keep = torch.zeros_like(idx, dtype=torch.bool)
    keep[..., 5] = True
    idx = torch.where(keep, torch.arange(12, device=device).int()[None, :, None], -1)
    p = keep.float()
    valid = torch.ones(2, 12, dtype=torch.bool, device=device)
    loss, grads = _kernel_grads(q, k, w, idx, p, valid)
    assert loss == 0 and all((g == 0).all() for g in grads)
    scores = sparse_indexer_scores(q, k, w, idx, tiling=SMALL)
    assert scores[keep].isfinite().all() and (scores[~keep] == float("-inf")).all()


def test_rows_without_valid_slots_or_target_mass(device):
    # A row of -1 slots only, and a row whose target is 0 on every valid slot, both count as
    # valid queries with KL 0 and no gradient (as indexer_kl gives them).
    q, k, w, idx, p = _inputs(1, 16, 16, 8, device=device, seed=5)
    idx[0, 10] = -1
    p[0, 10] = 0
    p[0, 12] = 0
    valid = torch.ones(1, 16, dtype=torch.bool, device=device)
    loss, (dq, dk, dw) = _kernel_grads(q, k, w, idx, p, valid)
    want_loss, want_grads = _grads(sparse_indexer_kl_reference, q, k, w, idx, p, valid)
    _close(loss, want_loss)
    for got, want in zip((dq, dk, dw), want_grads, strict=True):
        _close(got, want)
    assert (dq[0, [10, 12]] == 0).all() and (dw[0, [10, 12]] == 0).all()
    assert (sparse_indexer_scores(q, k, w, idx, tiling=SMALL)[0, 10] == float("-inf")).all()


def test_relu_ties_and_zero_logits(device):
    # Head 0 sees only zero logits and keys 0..3 are zero vectors: their scores are exact-zero
    # ties, and ReLU passes no gradient at 0 (as torch's relu), so those gradients are exactly 0.
    q, k, w, idx, p = _inputs(2, 20, 20, 12, device=device, hot_keys=4, seed=2)
    q[:, :, 0] = 0
    k[:, :4] = 0
    valid = torch.ones(2, 20, dtype=torch.bool, device=device)
    loss, (dq, dk, dw) = _kernel_grads(q, k, w, idx, p, valid)
    want_loss, want_grads = _grads(sparse_indexer_kl_reference, q, k, w, idx, p, valid)
    _close(loss, want_loss)
    for got, want in zip((dq, dk, dw), want_grads, strict=True):
        _close(got, want)
    assert (dq[:, :, 0] == 0).all() and (dw[..., 0] == 0).all() and (dk[:, :4] == 0).all()
    scores = sparse_indexer_scores(q, k, w, idx, tiling=SMALL)
    assert (scores[(idx >= 0) & (idx < 4)] == 0).all()


def test_bad_inputs_are_refused(device):
    q, k, w, idx, p = _inputs(1, 4, 4, 4, d=16, device=device)
    valid = torch.ones(1, 4, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="power of two"):
        sparse_indexer_scores(q[..., :12], k[..., :12], w, idx)
    with pytest.raises(ValueError, match="shapes"):
        sparse_indexer_scores(q, k[:, :, :8], w, idx)
    with pytest.raises(ValueError, match="shapes"):
        sparse_indexer_kl(q, k, w, idx, p[..., :2], valid)
    with pytest.raises(ValueError, match="block_k"):
        sparse_indexer_scores(q, k, w, idx, tiling=Tiling(8, 4, 1))
    with pytest.raises(ValueError, match="int32 or int64"):
        sparse_indexer_scores(q, k, w, idx.float())


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got - want‖ / ‖want‖, in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def _check_all(inputs, valid, loss_tol, grad_tol, score_tol, input_precision="tf32"):
    """Scores, loss and gradients of the compiled kernels against the reference, as relative
    errors; returns the kernel's gradients."""
    q, k, w, idx, p = inputs
    scores = sparse_indexer_scores(q, k, w, idx, input_precision=input_precision)
    want_scores = sparse_indexer_scores_reference(q, k, w, idx)
    assert torch.equal(torch.isinf(scores), idx < 0)
    assert _rel(scores[idx >= 0], want_scores[idx >= 0]) < score_tol
    del want_scores
    loss, grads = _grads(sparse_indexer_kl, q, k, w, idx, p, valid, input_precision=input_precision)
    want_loss, want_grads = _grads(sparse_indexer_kl_reference, q, k, w, idx, p, valid)
    assert abs(loss.item() - want_loss.item()) / want_loss.item() < loss_tol
    for got, x, want in zip(grads, (q, k, w), want_grads, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape
        assert _rel(got, want) < grad_tol
    return grads


@pytest.mark.gpu  # Triton 3.9's interpreter returns garbage for bf16 loads on the CPU
def test_bf16_inputs_on_cuda():
    # The reference upcasts the same bf16 values: the differences are the summation order and
    # the bf16 roundings of the logit gradients (fed to tensor cores) and of dq and dk.
    inputs = _inputs(2, 96, 96, 48, h=16, d=32, dtype=torch.bfloat16, device="cuda", hot_keys=4)
    valid = torch.rand(2, 96, device="cuda") > 0.2
    _check_all(inputs, valid, loss_tol=1e-4, grad_tol=1e-2, score_tol=1e-4)


@pytest.mark.gpu
def test_fp32_inputs_on_cuda():
    inputs = _inputs(2, 96, 96, 48, h=16, d=32, device="cuda", hot_keys=4)
    valid = torch.rand(2, 96, device="cuda") > 0.2
    _check_all(inputs, valid, 1e-5, 1e-5, 1e-5, input_precision="ieee")
    _check_all(inputs, valid, 1e-2, 1e-2, 1e-2)  # the default: products in TF32


@pytest.mark.gpu
def test_deepseek_dims_on_cuda():
    # 64 heads x 128, 2048 selected keys per query, 4096 tokens (the first 2047 queries see fewer
    # keys than K and carry -1 slots), bf16, against the fp32 reference on the same values.
    inputs = _inputs(1, 4096, 4096, 2048, h=64, d=128, dtype=torch.bfloat16, device="cuda")
    valid = torch.ones(1, 4096, dtype=torch.bool, device="cuda")
    valid[0, -100:] = False  # padding at the end
    dq, dk, dw = _check_all(inputs, valid, loss_tol=1e-4, grad_tol=1e-2, score_tol=1e-4)
    # dk's atomics add in a varying order: a second run differs at most by rounding.
    _, (_, dk2, _) = _grads(sparse_indexer_kl, *inputs, valid)
    assert _rel(dk2, dk) < 1e-2
