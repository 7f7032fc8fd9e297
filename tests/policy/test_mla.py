"""MLA evaluation orders and incremental decoding.

Tolerances: float64 results agree to 1e-10 (pure reassociation), float32 to 2e-5 absolute on
logits of magnitude ~1, bf16 to 5e-2.
"""

from __future__ import annotations

import pytest
import torch

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("topk", [8, 256])
def test_mha_equals_absorbed_mqa(make_model, dtype, topk, tokens):
    model = make_model(dtype=dtype, index_topk=topk)
    mha = model(tokens, absorb=False).logits
    mqa = model(tokens, absorb=True).logits
    torch.testing.assert_close(mha, mqa, rtol=0, atol=TOL[dtype])


def _decode(model, tokens, prefill, mask=None):
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + 4)
    m = None if mask is None else mask[:, :prefill]
    parts = [model(tokens[:, :prefill], cache=cache, attention_mask=m)]
    for i in range(prefill, tokens.shape[1]):
        m = None if mask is None else mask[:, i : i + 1]
        parts.append(model(tokens[:, i : i + 1], cache=cache, attention_mask=m))
    return torch.cat([p.logits for p in parts], 1), torch.cat([p.routing for p in parts], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("topk", [8, 256])
def test_incremental_decode_equals_full_forward(make_model, dtype, topk, tokens):
    model = make_model(dtype=dtype, index_topk=topk)
    full = model(tokens)
    logits, routing = _decode(model, tokens, prefill=20)
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=TOL[dtype])
    assert torch.equal(routing, full.routing)


def test_left_padding_matches_unpadded_rows(make_model):
    model = make_model(index_topk=8)
    short = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(5))
    long = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(6))
    batch = torch.cat([torch.cat([torch.zeros(1, 10, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :10] = 0
    out = model(batch, attention_mask=mask)
    torch.testing.assert_close(out.logits[0, 10:], model(short).logits[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logits[1], model(long).logits[0], rtol=0, atol=2e-5)
    # and the same batch decoded token by token
    logits, _ = _decode(model, batch, prefill=15, mask=mask)
    torch.testing.assert_close(logits[0, 10:], model(short).logits[0], rtol=0, atol=2e-5)


def test_bf16_forward_tracks_fp32(make_model, tokens):
    ref = make_model(index_topk=256)
    low = make_model(index_topk=256, dtype=torch.bfloat16)
    out = low(tokens)
    assert out.logits.dtype == torch.bfloat16
    assert low.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(out.logits.float(), ref(tokens).logits, rtol=0, atol=5e-2)


def test_cache_overflow_is_an_error(tiny):
    cache = tiny.new_cache(1, 4)
    with pytest.raises(ValueError, match="KVCache full"):
        tiny(torch.zeros(1, 5, dtype=torch.long), cache=cache)
