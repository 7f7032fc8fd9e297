"""Sparse MLA kernels (kernels/sparse_mla.py) against their torch reference: values, lse and
gradients, with unused (-1) slots, K larger than the visible positions, a row with a single
visible key, a row with none, keys selected by many queries, B > 1. On the CPU the kernels run
in Triton's interpreter (small shapes, float32); `pytest -m gpu` runs them compiled, bf16
included, at DeepSeek-V3.2's dims (128 heads, 512 + 64 key dims, top-2048)."""

from __future__ import annotations

import pytest
import torch

from kernels.sparse_mla import (
    head_summed_probs,
    head_summed_probs_reference,
    sparse_mla,
    sparse_mla_bwd,
    sparse_mla_fwd,
    sparse_mla_reference,
)

SMALL = {"block_h": 16, "block_n": 16}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _causal_indices(b, t, s, k, offset, g, *, pad=0):
    """Random distinct visible positions per query (s' <= t + offset, s' >= pad), -1 padded,
    in random slot order; the query's own position is always among them."""
    idx = torch.full((b, t, k), -1, dtype=torch.int32)
    for bi in range(b):
        for ti in range(t):
            own = ti + offset
            pool = torch.arange(pad, own)
            pick = pool[torch.randperm(len(pool), generator=g)[: k - 1]]
            chosen = torch.cat([pick, torch.tensor([own])])
            slots = torch.randperm(k, generator=g)[: len(chosen)]
            idx[bi, ti, slots] = chosen.int()
    return idx


def _inputs(b, t, s, h, d_v, d_r, k, dtype, device, seed=0, offset=None, pad=0):
    g = torch.Generator().manual_seed(seed)
    offset = s - t if offset is None else offset
    q = torch.randn(b, t, h, d_v + d_r, generator=g).to(dtype)
    kv = torch.randn(b, s, d_v + d_r, generator=g).to(dtype)
    idx = _causal_indices(b, t, s, k, offset, g, pad=pad)
    return q.to(device), kv.to(device), idx.to(device)


@pytest.mark.parametrize(
    ("b", "t", "s", "k"),
    [(1, 8, 8, 16), (2, 19, 19, 8), (1, 5, 40, 24), (1, 1, 33, 16)],
    ids=["k-over-visible", "ragged-b2", "cache-offset", "decode"],
)
def test_forward_matches_the_reference(device, b, t, s, k):
    q, kv, idx = _inputs(b, t, s, 16, 32, 16, k, torch.float32, device)

    o, lse = sparse_mla_fwd(q, kv, idx, 0.3, 32, **SMALL)
    o_ref, lse_ref = sparse_mla_reference(q, kv, idx, 0.3, 32)
    assert _rel(o, o_ref) < 1e-4 and _rel(lse, lse_ref) < 1e-5
    # The first query of a fresh sequence sees only itself: o is its own value row.
    if s == t:
        torch.testing.assert_close(o[:, 0], kv[:, :1, :32].expand(-1, 16, -1), rtol=1e-5, atol=1e-5)


def test_a_row_with_no_valid_slot_is_zero(device):
    q, kv, idx = _inputs(1, 4, 4, 16, 32, 16, 8, torch.float32, device)
    idx[0, 2] = -1

    o, lse = sparse_mla_fwd(q, kv, idx, 0.3, 32, **SMALL)
    assert (o[0, 2] == 0).all() and torch.isneginf(lse[0, 2]).all()
    assert o.isfinite().all()


def test_gradients_match_autograd_of_the_reference(device):
    # Keys chosen by many queries (t=24 queries over s=12 keys) exercise the atomic adds.
    q, kv, idx = _inputs(2, 24, 24, 16, 32, 16, 12, torch.float32, device, seed=1)
    idx[1, 5] = -1  # a row with nothing to attend: zero gradient, no NaN
    do = torch.randn(2, 24, 16, 32, generator=torch.Generator().manual_seed(2)).to(device)
    qa, kva = q.clone().requires_grad_(), kv.clone().requires_grad_()

    o, lse = sparse_mla_fwd(qa, kva, idx, 0.25, 32, **SMALL)
    qr, kvr = q.clone().requires_grad_(), kv.clone().requires_grad_()
    o_ref, _ = sparse_mla_reference(qr, kvr, idx, 0.25, 32)
    o_ref.backward(do)
    # One chunk of queries, then chunks of 5 (ragged: 24 = 4 x 5 + 4); slot blocks of 16 over
    # K = 12 and 16-column blocks over the 32 latent ones.
    per_query = 2 * 2 * 16 * 12 * 4  # B x (ds, p) x H x K x float32
    for chunk in (1 << 30, 5 * per_query):
        dq, dkv = sparse_mla_bwd(
            q, kv, idx, o, lse, do, 0.25,
            dq_config=(16, 16, 4, 1), dkv_config=(16, 16, 4, 1), chunk_bytes=chunk,
        )  # fmt: skip
        assert _rel(dq, qr.grad) < 1e-4 and _rel(dkv, kvr.grad) < 1e-4
        assert dq.isfinite().all() and (dq[1, 5] == 0).all()


def test_head_summed_probs(device):
    q, kv, idx = _inputs(1, 10, 10, 32, 32, 16, 8, torch.float32, device, seed=3)

    _, lse = sparse_mla_fwd(q, kv, idx, 0.3, 32, **SMALL)
    got = head_summed_probs(q, kv, idx, lse, 0.3, 32, **SMALL)
    want = head_summed_probs_reference(q, kv, idx, 0.3, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]))
    assert (got[idx < 0] == 0).all()


def test_bad_inputs_are_refused(device):
    q, kv, idx = _inputs(1, 4, 4, 16, 32, 16, 8, torch.float32, device)
    with pytest.raises(ValueError, match="int32"):
        sparse_mla(q, kv, idx.long(), 0.3, 32)
    with pytest.raises(ValueError, match="power of two"):
        sparse_mla(q[..., :40], kv[..., :40], idx, 0.3, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        sparse_mla(q[:, :, :12], kv, idx, 0.3, 32)


@pytest.mark.gpu
@pytest.mark.parametrize(("t", "k"), [(256, 64), (2048, 2048), (4096, 2048)])
def test_deepseek_dims_on_cuda(t, k):
    """128 heads, 512 + 64, bf16: forward, lse and gradients within bf16 rounding of the
    float32 reference on the same (bf16-valued) inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h, d_v, d_r = 128, 512, 64
    q = torch.randn(1, t, h, d_v + d_r, device="cuda", generator=g).bfloat16()
    kv = torch.randn(1, t, d_v + d_r, device="cuda", generator=g).bfloat16()
    scores = torch.rand(1, t, t, device="cuda", generator=g)
    causal = torch.ones(t, t, device="cuda", dtype=torch.bool).tril()
    idx = scores.masked_fill(~causal, -1).topk(min(k, t), -1).indices.int()
    idx = idx.masked_fill(~causal.gather(1, idx[0].long())[None], -1)
    scale = (192) ** -0.5
    qa, kva = q.clone().requires_grad_(), kv.clone().requires_grad_()
    o, lse = sparse_mla(qa, kva, idx, scale, d_v)
    do = torch.randn_like(o)
    o.backward(do)
    q32, kv32 = q.float().requires_grad_(), kv.float().requires_grad_()
    chunk = max(1, (1 << 28) // (k * (d_v + d_r) * 4))  # bound the reference's gather
    for i in range(0, t, chunk):
        sl = slice(i, i + chunk)
        o_ref, lse_ref = sparse_mla_reference(q32[:, sl], kv32, idx[:, sl], scale, d_v)
        assert _rel(o[:, sl].float(), o_ref) < 1e-2
        assert _rel(lse[:, sl], lse_ref) < 1e-3
        o_ref.backward(do[:, sl].float())
    assert _rel(qa.grad.float(), q32.grad) < 2e-2 and _rel(kva.grad.float(), kv32.grad) < 2e-2


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_split_decode_equals_one_pass(device, splits):
    """Decoding split over the slots merges to the single pass: a ragged last slice, a slice
    of only unused slots, a row with a single visible key."""
    from kernels.sparse_mla import sparse_mla_decode

    q, kv, idx = _inputs(3, 1, 40, 16, 32, 16, 24, torch.float32, device, seed=5, offset=20)
    idx[1, 0, 1:] = -1  # one visible key
    idx[2, 0, 5:] = -1  # trailing slices hold no slot
    o1, lse1 = sparse_mla_fwd(q, kv, idx, 0.3, 32, **SMALL)
    o2, lse2 = sparse_mla_decode(q, kv, idx, 0.3, 32, splits=splits)
    assert _rel(o2, o1) < 1e-5 and _rel(lse2, lse1) < 1e-6
    with pytest.raises(ValueError, match="one query"):
        sparse_mla_decode(q.expand(3, 2, 16, 48), kv, idx.expand(3, 2, 24), 0.3, 32)
