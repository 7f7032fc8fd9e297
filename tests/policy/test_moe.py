"""The sigmoid MoE gate (group-limited selection, unbiased weights) and Keep Routing."""

from __future__ import annotations

import pytest
import torch

from policy import preset
from policy.moe import Experts, Gate


def test_gate_by_hand():
    # 8 experts in 4 groups of 2, keep 2 groups, pick 2 experts.
    gate = Gate(preset("tiny"))
    s = torch.tensor([[0.90, 0.10, 0.50, 0.45, 0.30, 0.20, 0.60, 0.55]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0])
    with torch.no_grad():  # drive the scores directly: logit(s) through an identity gate
        gate.weight.copy_(torch.eye(8, 128))
        gate.e_score_correction_bias.copy_(bias)
    x = torch.zeros(1, 128)
    x[0, :8] = torch.logit(s[0])
    weights, ids, own = gate(x)
    assert torch.equal(own, ids)  # no replay: the gate's own choice is the one used
    # biased: [.9,.1 | .5,.45 | .8,.7 | .6,.55] -> group sums [1.0, .95, 1.5, 1.15]
    # keep groups 2 and 3 -> experts {4,5,6,7}, biased top-2 = 4 (.8), 5 (.7)
    assert ids.tolist() == [[4, 5]]
    # weights from the UNBIASED scores .30, .20, normalised, times 2.5
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.4]]) * 2.5)
    # without the group limit expert 0 (0.9) would have won
    assert 0 not in ids.tolist()[0]


def test_experts_match_a_per_token_loop():
    torch.manual_seed(0)
    ex = Experts(8, 16, 12)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(10, 16)
    ids = torch.randint(0, 8, (10, 2))
    w = torch.rand(10, 2)
    got = ex(x, ids, w)
    for n in range(10):
        want = sum(
            w[n, j]
            * (torch.nn.functional.silu(ex.gate_proj[e] @ x[n]) * (ex.up_proj[e] @ x[n]))
            @ ex.down_proj[e].t()
            for j, e in enumerate(ids[n].tolist())
        )
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_routing_replays_bit_for_bit(make_model, dtype, tokens):
    model = make_model(dtype=dtype, index_topk=8)
    out = model(tokens)
    assert out.routing.shape == (2, 48, 1, 2)
    again = model(tokens, replay_routing=out.routing)
    assert torch.equal(again.logits, out.logits)
    other = (out.routing + 1) % 8  # different experts, still distinct per token
    changed = model(tokens, replay_routing=other)
    assert torch.equal(changed.routing, other)
    # The gates' own choice is still reported: the only MoE layer's input does not depend on
    # routing, so it is the unreplayed forward's routing.
    assert torch.equal(changed.own_routing, out.routing)
    assert not torch.allclose(changed.logits, out.logits)


def test_gate_gets_gradients_under_replay(make_model, tokens):
    model = make_model().train()
    routing = model(tokens).routing
    model(tokens, replay_routing=routing).logits.logsumexp(-1).mean().backward()
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_replay_shape_is_checked(tiny, tokens):
    with pytest.raises(ValueError, match="replay_routing has shape"):
        tiny(tokens, replay_routing=torch.zeros(2, 48, 2, 2, dtype=torch.long))


def _per_expert_autograd(ex: Experts, x, ids, w):
    """The experts as autograd of W[e] slices: the path grouped_linear replaces."""
    n, k = ids.shape
    order = ids.flatten().argsort(stable=True)
    counts = torch.bincount(ids.flatten(), minlength=ex.gate_proj.shape[0]).tolist()
    xs, outs, start = x[order // k], [], 0
    for e, c in enumerate(counts):
        if c:
            seg = xs[start : start + c]
            h = torch.nn.functional.silu(seg @ ex.gate_proj[e].t()) * (seg @ ex.up_proj[e].t())
            outs.append(h @ ex.down_proj[e].t())
            start += c
    per_slot = torch.cat(outs)[order.argsort()].view(n, k, -1)
    return (per_slot * w.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_slice_autograd(dtype):
    """Output and every gradient equal the per-expert-slice autograd path up to rounding (the
    same matrix products; the elementwise SiLU runs over other tensor lengths, whose vectorised
    and scalar tails may differ in the last bit), with an expert that receives no token."""
    torch.manual_seed(0)
    ex = Experts(8, 16, 12)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ex = ex.to(dtype)
    x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 7, (10, 2))  # expert 7 idle
    w = torch.rand(10, 2, dtype=dtype)
    results = []
    for fn in (lambda: ex(x, ids, w), lambda: _per_expert_autograd(ex, x, ids, w)):
        x.grad = None
        ex.zero_grad()
        y = fn()
        (y.float() * torch.linspace(-1, 1, 16)).sum().backward()
        results.append([y.detach(), x.grad.clone(), *(p.grad.clone() for p in ex.parameters())])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip(*results, strict=True):
        rel = (got.double() - want.double()).norm() / want.double().norm()
        assert rel < tol, float(rel)
    assert (ex.gate_proj.grad[7] == 0).all()


@pytest.mark.gpu
def test_grouped_mm_path_on_cuda():
    """On Hopper in bf16 the experts run torch._grouped_mm: output and gradients within bf16
    rounding of the segment loop at a DeepSeek-like shape."""
    from policy.moe import _grouped_mm_ok

    torch.manual_seed(0)
    ex = Experts(64, 2048, 1408).cuda().bfloat16()
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.stack([torch.randperm(64, device="cuda")[:6] for _ in range(4096)])
    w = torch.rand(4096, 6, device="cuda")
    assert _grouped_mm_ok(x, ex.gate_proj)
    results = []
    for fn in (lambda: ex(x, ids, w), lambda: _per_expert_autograd(ex, x, ids, w)):
        x.grad = None
        ex.zero_grad()
        y = fn()
        y.float().square().sum().backward()
        results.append([y.detach(), x.grad.clone(), *(p.grad.clone() for p in ex.parameters())])
    for got, want in zip(*results, strict=True):
        rel = (got.double() - want.double()).norm() / want.double().norm()
        assert rel < 1e-2, float(rel)


def test_the_indexer_keeps_no_graph_without_its_loss(make_model, tokens):
    """The policy-gradient backward never reaches the indexer (its scores only feed the top-k),
    so no autograd graph is built for it; with the indexer loss it learns."""
    model = make_model(index_topk=8).train()
    out = model(tokens)
    out.logits.logsumexp(-1).mean().backward()
    indexer = model.model.layers[0].self_attn.indexer
    assert all(p.grad is None for p in indexer.parameters())
    out = model(tokens, indexer_loss="sparse")
    out.indexer_loss.backward()
    assert indexer.wq_b.weight.grad is not None and indexer.wq_b.weight.grad.abs().sum() > 0
