"""The lightning indexer, top-k selection and DSA: formula, causality, dense equivalence,
and indexer training (warm-up lowers the KL; gradients stay on their side of the detach)."""

from __future__ import annotations

import pytest
import torch

import policy.attention as attention
from policy import freeze_all_but_indexer, indexer_parameters
from policy.indexer import select_topk, selection_mask
from policy.rope import apply_rope


def test_index_score_formula_by_hand(tiny):
    idx = tiny.model.layers[0].self_attn.indexer
    b, t, hi, di, p = 1, 5, idx.n_heads, idx.head_dim, idx.rope_dim
    x, qr = torch.randn(b, t, 128), torch.randn(b, t, 64)
    cos, sin = tiny.rotary(torch.arange(t).view(1, t))
    scores = idx(x, qr, cos, sin, idx.keys(x, cos, sin))
    # By hand: half-split RoPE on the first P dims, LayerNorm'd shared key, ReLU per head.
    q = idx.wq_b(qr).view(b, t, hi, di)
    q = torch.cat([apply_rope(q[..., :p], cos, sin, interleaved=False), q[..., p:]], -1)
    k = torch.nn.functional.layer_norm(idx.wk(x), (di,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)
    k = torch.cat([apply_rope(k[..., :p], cos, sin, interleaved=False), k[..., p:]], -1)
    w = idx.weights_proj(x) * hi**-0.5 * di**-0.5
    for ti in range(t):
        for s in range(t):
            want = sum(w[0, ti, j] * torch.relu(q[0, ti, j] @ k[0, s]) for j in range(hi))
            torch.testing.assert_close(scores[0, ti, s], want, rtol=1e-4, atol=1e-5)


def test_select_topk_pads_short_rows_and_breaks_ties_early():
    causal = torch.ones(6, 6).tril().bool().unsqueeze(0)
    scores = torch.zeros(1, 6, 6).masked_fill(~causal, float("-inf"))  # all ties at 0
    ids = select_topk(scores, 3)
    assert ids[0, 0].tolist() == [0, -1, -1]  # only itself is visible
    assert ids[0, 1].tolist() == [0, 1, -1]
    assert ids[0, 5].tolist() == [0, 1, 2]  # ties go to the earliest positions
    mask = selection_mask(ids, 6)
    assert mask.sum(-1).tolist() == [[1, 2, 3, 3, 3, 3]] and not (mask & ~causal).any()


def _record_selections(monkeypatch):
    seen = []
    real = attention.select_topk

    def spy(scores, k):
        ids = real(scores, k)
        seen.append(ids)
        return ids

    monkeypatch.setattr(attention, "select_topk", spy)  # where MLA looks it up
    return seen


def test_no_query_selects_a_future_or_padding_position(make_model, monkeypatch, tokens):
    model = make_model(index_topk=8)
    seen = _record_selections(monkeypatch)
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0  # left padding in row 1
    model(tokens, attention_mask=mask)
    assert len(seen) == model.args.num_hidden_layers
    t = tokens.shape[1]
    for ids in seen:
        q_pos = torch.arange(t).view(1, t, 1)
        valid = ids >= 0
        assert (ids[valid] <= q_pos.expand_as(ids)[valid]).all()
        # row 1's real queries never select a padding slot (< 7) ...
        real_rows = ids[1, 7:]
        assert not ((real_rows >= 0) & (real_rows < 7)).any()
        # ... and every query selects min(k, visible keys) positions
        assert (valid[0].sum(-1) == torch.clamp(torch.arange(t) + 1, max=8)).all()


def test_dsa_with_topk_ge_length_is_exactly_dense(make_model, tokens):
    t = tokens.shape[1]
    for topk in (t, t + 100):
        model = make_model(index_topk=topk)
        sparse, dense = model(tokens), model(tokens, dsa=False)
        assert torch.equal(sparse.logits, dense.logits)
    model = make_model(index_topk=8)
    sparse, dense = model(tokens), model(tokens, dsa=False)
    assert not torch.allclose(sparse.logits[:, 8:], dense.logits[:, 8:], atol=1e-3)
    # Positions that see <= index_topk keys are untouched by the selection (up to the MoE
    # row-count rounding explained in test_causality).
    torch.testing.assert_close(sparse.logits[:, :8], dense.logits[:, :8], rtol=0, atol=1e-6)


@pytest.mark.parametrize("topk", [8, 256])
def test_causality(make_model, topk, tokens):
    model = make_model(index_topk=topk)
    changed = tokens.clone()
    changed[:, 30:] = torch.randint(0, 512, changed[:, 30:].shape)
    a, b = model(tokens).logits, model(changed).logits
    # Not bitwise: future tokens change how many rows each expert's matmul sees, and BLAS
    # results for a row may depend on the row count. Real leakage would be O(1e-2).
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_indexer_gradients_stay_on_their_side(make_model, tokens):
    model = make_model(index_topk=8).train()
    out = model(tokens, indexer_loss="sparse")
    idx_ids = {id(p) for p in indexer_parameters(model)}
    out.indexer_loss.backward()
    for p in model.parameters():
        got = p.grad is not None and p.grad.abs().sum() > 0
        assert got == (id(p) in idx_ids)
    model.zero_grad(set_to_none=True)
    model(tokens).logits.logsumexp(-1).mean().backward()  # any LM-side loss
    assert all(p.grad is None for p in indexer_parameters(model))


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_indexer_warmup_lowers_kl(make_model, stage):
    model = make_model(index_topk=16).train()
    trainable = freeze_all_but_indexer(model)
    assert {id(p) for p in trainable} == {id(p) for p in indexer_parameters(model)}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    data = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(25):
        loss = model(data, dsa=stage == "sparse", indexer_loss=stage, return_logits=False)
        loss = loss.indexer_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    freeze_all_but_indexer(model, freeze=False)
    assert all(p.requires_grad for p in model.parameters())
