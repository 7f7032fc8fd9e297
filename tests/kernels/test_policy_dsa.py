"""The policy's DSA through the kernels (attention="triton") against the torch reference
(attention="reference"): index-based selection, sparse MLA, the sparse indexer loss and
KV-cache decoding, values and gradients. On the CPU the kernels run in Triton's interpreter
(a tiny float32 policy, IEEE float32 products on both sides, so the two agree to rounding);
`pytest -m gpu` runs them compiled, plus one layer at DeepSeek-V3.2's attention dims in bf16."""

from __future__ import annotations

import pytest
import torch

from policy import Transformer, preset
from policy.attention import resolve_attention, triton_supported
from policy.indexer import select_topk
from policy.testing import tiny_policy

# Kernel-friendly tiny shapes: 16 heads, top-8 of up to 40 keys, so selection really prunes.
KERNEL_TINY = dict(num_attention_heads=16, index_topk=8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _pair(device: str) -> tuple[Transformer, Transformer]:
    models = []
    for impl in ("reference", "triton"):
        model = tiny_policy(**KERNEL_TINY).to(device)
        model.attention = impl
        models.append(model)
    return models[0], models[1]


def _batch(device: str, t: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 512, (2, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :6] = 0  # left padding
    return tokens.to(device), mask.to(device)


def test_the_choice_of_implementation(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = preset("tiny", **KERNEL_TINY)
    assert triton_supported(args) is None
    assert resolve_attention("auto", args, torch.device("cpu")) == "reference"
    assert resolve_attention("auto", args, torch.device("cuda")) == "triton"
    assert resolve_attention("reference", args, torch.device("cuda")) == "reference"
    with pytest.raises(ValueError, match="not on CUDA"):
        resolve_attention("triton", args, torch.device("cpu"))
    four_heads = preset("tiny")  # 4 heads: the kernels need a multiple of 16
    assert "multiple of 16" in triton_supported(four_heads)
    assert resolve_attention("auto", four_heads, torch.device("cuda")) == "reference"
    with pytest.raises(ValueError, match="multiple of 16"):
        resolve_attention("triton", four_heads, torch.device("cuda"))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attention("sparse", args, torch.device("cpu"))


def test_indices_from_outside_replace_the_indexers_selection():
    """MLA(indices=...) attends to exactly the given selection: its own selection passed back
    in changes nothing, another one changes the output."""
    model = tiny_policy(index_topk=8)
    x = torch.randn(1, 24, model.args.hidden_size, generator=torch.Generator().manual_seed(0))
    ctx = model._context(torch.zeros(1, 24, dtype=torch.long), None, None)
    mla = model.model.layers[0].self_attn
    own, _ = mla(x, ctx)
    qr = mla.q_a_layernorm(mla.q_a_proj(x))
    scores = mla.indexer(x, qr, ctx.cos, ctx.sin, mla.indexer.keys(x, ctx.cos, ctx.sin))
    ids = select_topk(scores.masked_fill(~ctx.allowed, float("-inf")), 8)
    again, _ = mla(x, ctx, indices=ids)
    assert torch.equal(own, again)
    first = torch.where(ctx.allowed[..., :8], torch.arange(8), -1)  # the earliest 8 keys
    other, _ = mla(x, ctx, indices=first)
    assert not torch.allclose(own[:, 9:], other[:, 9:])


def test_policy_matches_the_reference(device):
    """Logits of the whole policy, its own selections, left padding: rounding apart, equal."""
    ref, ker = _pair(device)
    tokens, mask = _batch(device)
    with torch.no_grad():
        a = ref(tokens, attention_mask=mask).logits
        b = ker(tokens, attention_mask=mask).logits
    real = mask.bool()
    assert _rel(b[real], a[real]) < 1e-4


def test_gradients_and_the_sparse_indexer_loss(device):
    """One training step's gradients of every parameter, the indexer's from its sparse KL."""
    ref, ker = _pair(device)
    tokens, mask = _batch(device, 24)
    outs = []
    for model in (ref, ker):
        out = model(tokens, attention_mask=mask, indexer_loss="sparse")
        (out.logits.square().mean() + out.indexer_loss).backward()
        outs.append(out)
    # The KL is a small difference of O(log k) terms: bound the difference, not the ratio.
    assert abs(float(outs[1].indexer_loss) - float(outs[0].indexer_loss)) < 1e-6
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert any("indexer" in n for n in grads)
    for name, p in ker.named_parameters():
        assert _rel(p.grad, grads[name]) < 1e-3, name


def test_gradients_of_a_policy_gradient_step(device, monkeypatch):
    """No indexer loss (the learner's step): the first index_topk queries take the dense MHA
    head and the rest the sparse kernels; every gradient equals the reference's."""
    from policy.attention import MLA

    calls = []
    dense_head = MLA._dense_head

    def spy(self, *args):
        calls.append(args[-1])
        return dense_head(self, *args)

    monkeypatch.setattr(MLA, "_dense_head", spy)
    ref, ker = _pair(device)
    tokens, mask = _batch(device, 24)
    grads = []
    for model in (ref, ker):
        model(tokens, attention_mask=mask).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls and set(calls) == {KERNEL_TINY["index_topk"]}  # the kernel path only
    assert grads[1].keys() == grads[0].keys()
    for name, g in grads[1].items():
        assert _rel(g, grads[0][name]) < 1e-3, name


@pytest.mark.parametrize("splits", [None, 3], ids=["device-default", "split-3"])
def test_kv_cache_decoding_equals_the_full_forward(device, splits, monkeypatch):
    """Prefill then one token at a time (the native engine's path) gives the logits of one full
    forward, left padding included; decoding split over the slots too."""
    if splits is not None:
        import kernels.sparse_mla

        monkeypatch.setattr(kernels.sparse_mla, "decode_splits", lambda *_: splits)
    _, ker = _pair(device)
    tokens, mask = _batch(device, 32)
    with torch.no_grad():
        full = ker(tokens, attention_mask=mask).logits
        cache = ker.new_cache(2, 32)
        steps = [ker(tokens[:, :26], attention_mask=mask[:, :26], cache=cache).logits]
        for i in range(26, 32):
            step = ker(tokens[:, i : i + 1], attention_mask=mask[:, i : i + 1], cache=cache)
            steps.append(step.logits)
    real = mask.bool()
    assert _rel(torch.cat(steps, 1)[real], full[real]) < 1e-4


@pytest.mark.gpu
def test_deepseek_attention_dims_in_bf16():
    """One layer at DeepSeek-V3.2's attention dims (128 heads, 512 + 64, indexer 64 x 128,
    top-2048) over 4096 tokens in bf16, both paths on the reference's selection."""
    args = preset("deepseek-v3.2", num_hidden_layers=1, first_k_dense_replace=1,
                  vocab_size=1024, intermediate_size=1024)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(args).to("cuda", torch.bfloat16)
    mla = model.model.layers[0].self_attn
    ids_in = torch.zeros(1, 4096, dtype=torch.long, device="cuda")
    x = torch.randn(1, 4096, args.hidden_size, device="cuda", dtype=torch.bfloat16)
    outs = []
    with torch.no_grad():
        for impl in ("reference", "triton"):
            model.attention = impl
            ctx = model._context(ids_in, None, None)
            if impl == "reference":
                qr = mla.q_a_layernorm(mla.q_a_proj(x))
                keys = mla.indexer.keys(x, ctx.cos, ctx.sin)
                scores = mla.indexer(x, qr, ctx.cos, ctx.sin, keys)
                ids = select_topk(scores.masked_fill(~ctx.allowed, float("-inf")), 2048)
            outs.append(mla(x, ctx, indices=ids)[0].float())
    assert _rel(outs[1], outs[0]) < 2e-2
