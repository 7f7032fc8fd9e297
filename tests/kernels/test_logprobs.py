"""The Triton masked log-probs against the full-logits reference: values, entropy and both
gradients, for truncated rows, untruncated rows (all -1) and a mix, temperature != 1, token and
vocabulary blocks that do not divide N and V, tiles that do not divide a block. On the CPU the
kernels run in Triton's interpreter (small float64/float32 shapes); `pytest -m gpu` runs them
compiled, bf16 included, at DeepSeek-V3.2's width and vocabulary."""

from __future__ import annotations

import pytest
import torch

from kernels.logprobs import check_kept_ids, masked_logprobs_reference, masked_logprobs_triton
from rl.logprobs import masked_logprobs
from rl.logprobs import masked_logprobs_reference as rl_reference

# Small blocks so the CPU shapes (37 tokens, vocab 300) span several of each: token chunks of
# 16 (16, 16, 5), vocabulary chunks of 128 (128, 128, 44), tiles of 64 columns.
SMALL = {"chunk_size": 16, "vocab_chunk": 128, "block_v": 64, "num_warps": 1}


def _inputs(n, d, v, kind, dtype, device, seed=0, k=6):
    """hidden, head, targets, kept ids of one `kind`: "truncated" (every row holds 1..k ids),
    "mixed" (every fourth row all -1), "untruncated" (all -1) or "none" (kept_ids None)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * d**-0.5 * 3
    targets = torch.randint(0, v, (n,), generator=g)
    kept = torch.full((n, k), -1)
    for i in range(n):
        if kind == "truncated" or (kind == "mixed" and i % 4):
            others = torch.randperm(v, generator=g)[: i % k]
            row = torch.cat([targets[i : i + 1], others[others != targets[i]]])[:k]
            kept[i, torch.randperm(k, generator=g)[: len(row)]] = row  # -1 anywhere in the row
    h = h.to(device, dtype).requires_grad_()
    w = w.to(device, dtype).requires_grad_()
    return h, w, targets.to(device), None if kind == "none" else kept.to(device)


def _entropy_reference(h, w, kept, temperature):
    z = torch.nn.functional.linear(h, w)
    z = (z.float() if z.element_size() < 4 else z) / temperature
    if kept is not None:
        allowed = torch.zeros_like(z, dtype=torch.bool)
        allowed.scatter_(1, kept.clamp_min(0), kept >= 0)
        z = z.masked_fill(~allowed & (kept >= 0).any(-1, keepdim=True), float("-inf"))
    logp = z.log_softmax(-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0).sum(-1)


def _check(h, w, t, kept, temperature, tol, **kw):
    """Values, entropy and the gradients of a weighted sum (signs and sizes vary by row)."""
    got, ent = masked_logprobs_triton(
        h, w, t, kept, temperature=temperature, return_entropy=True, **kw
    )
    want = masked_logprobs_reference(h, w, t, kept, temperature=temperature)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    with torch.no_grad():
        ent_want = _entropy_reference(h, w, kept, temperature)
    torch.testing.assert_close(ent, ent_want, rtol=tol, atol=tol)
    assert not ent.requires_grad
    weights = torch.linspace(-1, 2, len(t), dtype=got.dtype, device=got.device)
    ga = torch.autograd.grad((got * weights).sum(), (h, w))
    gb = torch.autograd.grad((want * weights).sum(), (h, w))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["truncated", "mixed", "untruncated", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_the_reference(device, kind, temperature):
    h, w, t, kept = _inputs(37, 32, 300, kind, torch.float64, device)
    _check(h, w, t, kept, temperature, 1e-10, **SMALL)


@pytest.mark.parametrize(
    ("chunk_size", "vocab_chunk", "block_v"),
    [(None, None, 4096), (37, 300, 512), (36, 299, 16), (1, 7, 16)],
    ids=["defaults", "one-block", "one-row-and-one-column-chunks", "tiny-blocks"],
)
def test_block_layouts(device, chunk_size, vocab_chunk, block_v):
    n = 37 if chunk_size != 1 else 5  # one-row chunks: few rows (the interpreter is slow)
    h, w, t, kept = _inputs(n, 32, 300, "mixed", torch.float32, device)
    kw = {"chunk_size": chunk_size, "vocab_chunk": vocab_chunk, "block_v": block_v}
    _check(h, w, t, kept, 0.8, 2e-5, num_warps=1, **kw)


def test_single_kept_id_and_renormalisation(device):
    h, w, t, kept = _inputs(37, 32, 300, "mixed", torch.float64, device)
    lp_kept, ent_kept = masked_logprobs_triton(h, w, t, kept, return_entropy=True, **SMALL)
    lp_full, ent_full = masked_logprobs_triton(h, w, t, None, return_entropy=True, **SMALL)
    truncated = (kept >= 0).any(-1)
    assert (lp_kept[truncated] > lp_full[truncated]).all()  # the cut tokens' mass moved in
    assert torch.equal(lp_kept[~truncated], lp_full[~truncated])
    single = (kept >= 0).sum(-1) == 1
    assert single.any()
    assert (lp_kept[single] == 0).all() and (ent_kept[single] == 0).all()
    assert (ent_full > 0).all()


def test_one_gradient_at_a_time_and_retained_graph(device):
    h, w, t, kept = _inputs(37, 32, 300, "mixed", torch.float64, device)
    want = torch.autograd.grad(masked_logprobs_reference(h, w, t, kept).sum(), (h, w))
    got = masked_logprobs_triton(h, w, t, kept, **SMALL)
    # The first backward consumes the logits block the forward kept; the second recomputes it.
    first = torch.autograd.grad(got.sum(), (h, w), retain_graph=True)
    second = torch.autograd.grad(got.sum(), (h, w))
    for a, b, c in zip(first, second, want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10)
    only_w = masked_logprobs_triton(h.detach(), w, t, kept, **SMALL)
    (gw,) = torch.autograd.grad(only_w.sum(), (w,))
    torch.testing.assert_close(gw, want[1], rtol=1e-10, atol=1e-10)
    only_h = masked_logprobs_triton(h, w.detach(), t, kept, **SMALL)
    (gh,) = torch.autograd.grad(only_h.sum(), (h,))
    torch.testing.assert_close(gh, want[0], rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # nothing kept for a backward that cannot come
        again = masked_logprobs_triton(h, w, t, kept, **SMALL)
    assert again.dtype == torch.float64 and torch.equal(again, got.detach())


def test_empty_batch(device):
    h, w, t, kept = _inputs(0, 32, 300, "mixed", torch.float32, device)
    got, ent = masked_logprobs_triton(h, w, t, kept, return_entropy=True)
    assert got.shape == ent.shape == (0,) and got.dtype == torch.float32
    (gw,) = torch.autograd.grad(got.sum(), (w,))
    assert torch.equal(gw, torch.zeros_like(w))


def test_bad_inputs_are_refused(device):
    h, w, t, kept = _inputs(8, 32, 300, "truncated", torch.float64, device)
    bad = kept.clone()
    bad[1] = -1
    bad[1, 0], bad[1, 1] = (t[1] + 1) % 300, (t[1] + 2) % 300
    with pytest.raises(ValueError, match="token 1: target id .* is not in its kept set"):
        masked_logprobs_triton(h, w, t, bad)
    bad[1, 1] = bad[1, 2] = t[1]
    with pytest.raises(ValueError, match="token 1: its kept ids repeat an id"):
        masked_logprobs_triton(h, w, t, bad)
    bad = kept.clone()
    bad[2, -1] = 300
    with pytest.raises(ValueError, match="kept ids must lie in"):
        masked_logprobs_triton(h, w, t, bad)
    with pytest.raises(ValueError, match="target ids must lie in"):
        check_kept_ids(t + 300, None, 300)
    with pytest.raises(ValueError, match="dtypes differ"):
        masked_logprobs_triton(h, w.float(), t, kept)
    with pytest.raises(ValueError, match="shapes"):
        masked_logprobs_triton(h, w[:, :16], t, kept)
    with pytest.raises(ValueError, match="kept_ids"):
        masked_logprobs_triton(h, w, t, kept[:4])


def test_reference_is_rl_reference():
    # One reference for both paths (kernels/kept.py): rl's name is that same function.
    assert rl_reference is masked_logprobs_reference


# --- compiled on a CUDA device ----------------------------------------------------------------

VOCAB = 129_280


def _realistic(n, d, kind, seed=0, k=20):
    """bf16 inputs at DeepSeek-V3.2's vocabulary, logits of order 1, top-k sets of 20 ids."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(VOCAB, d, generator=g) * d**-0.5 * 2
    t = torch.randint(0, VOCAB, (n,), generator=g)
    kept = (t[:, None] + torch.arange(k) * 7919) % VOCAB  # k distinct ids, the target first
    if kind == "mixed":
        kept[::3] = -1
    hb = h.cuda().bfloat16().requires_grad_()
    wb = w.cuda().bfloat16().requires_grad_()
    return hb, wb, t.cuda(), None if kind == "none" else kept.cuda()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _check_bf16(h, w, t, kept, temperature, **kw):
    """bf16 against two references. The same bf16 logits with float32 softmax (the quantity
    computed; only the GEMMs' summation order differs, which flips a rare logit by one bf16
    ulp, 0.03 at |z| in [4, 8)), and the float32 reference from the same (upcast) inputs,
    whose logits are not rounded to bf16: rounding them moves log-probs by up to ~0.03 and
    entropies by up to ~0.06 at temperature 0.7 (measured on the CPU with the torch chunks)."""
    got, ent = masked_logprobs_triton(
        h, w, t, kept, temperature=temperature, return_entropy=True, **kw
    )
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.no_grad():
        same = masked_logprobs_reference(h.detach(), w.detach(), t, kept, temperature=temperature)
        ent_same = _entropy_reference(h.detach(), w.detach(), kept, temperature)
    err, ent_err = (got - same).abs(), (ent - ent_same).abs()
    assert err.max() < 5e-2 and err.mean() < 5e-4, (err.max(), err.mean())
    assert ent_err.max() < 5e-2 and ent_err.mean() < 5e-4, (ent_err.max(), ent_err.mean())
    want = masked_logprobs_reference(h32, w32, t, kept, temperature=temperature)
    with torch.no_grad():
        ent_want = _entropy_reference(h32, w32, kept, temperature)
    err, ent_err = (got - want).abs(), (ent - ent_want).abs()
    assert err.max() < 0.1 and err.mean() < 1e-2, (err.max(), err.mean())
    assert ent_err.max() < 0.2 and ent_err.mean() < 2e-2, (ent_err.max(), ent_err.mean())
    weights = torch.linspace(-1, 2, len(t), device="cuda")
    ga = torch.autograd.grad((got * weights).sum(), (h, w))
    gb = torch.autograd.grad((want * weights).sum(), (h32, w32))
    for x, y in zip(ga, gb, strict=True):
        assert x.dtype == torch.bfloat16 and _rel(x, y) < 1e-2, _rel(x, y)  # ~3e-3 on the CPU


@pytest.mark.gpu  # Triton 3.9's interpreter returns garbage for bf16 loads on the CPU
@pytest.mark.parametrize("kind", ["mixed", "none"])
def test_bf16_tracks_the_float32_reference(kind):
    h, w, t, kept = _realistic(1024, 1024, kind)
    _check_bf16(h, w, t, kept, 0.7)
    _check_bf16(h, w, t, kept, 1.0, chunk_size=300, vocab_chunk=10_000, block_v=1024)


@pytest.mark.gpu
def test_float32_on_cuda_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 256, generator=g).cuda().requires_grad_()
    w = (torch.randn(VOCAB, 256, generator=g) / 16).cuda().requires_grad_()
    t = torch.randint(0, VOCAB, (512,), generator=g).cuda()
    kept = (t[:, None] + torch.arange(20, device="cuda") * 7919) % VOCAB
    kept[::3] = -1
    got = masked_logprobs_triton(h, w, t, kept, vocab_chunk=40_000)
    want = masked_logprobs_reference(h, w, t, kept)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    ga = torch.autograd.grad(got.sum(), (h, w))
    gb = torch.autograd.grad(want.sum(), (h, w))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_deepseek_dims_bf16_memory_and_dispatch():
    """4,096 tokens at hidden 7168: rl.logprobs dispatches here, the forward+backward
    allocates about one logits block beyond its inputs and gradients, and the values and
    gradients track the references."""
    h, w, t, kept = _realistic(4096, 7168, "mixed")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = masked_logprobs_triton(h, w, t, kept)
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    peak = torch.cuda.max_memory_allocated() - base - gh.nbytes - gw.nbytes
    assert peak < 1.5 * 256 * 2**20, peak / 2**20  # one 256 MiB block and small buffers
    assert torch.equal(masked_logprobs(h, w, t, kept).detach(), got.detach())
    del got, gh, gw
    _check_bf16(h, w, t, kept, 1.0)
