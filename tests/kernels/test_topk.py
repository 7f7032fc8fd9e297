"""The top-k selection kernel against select_topk: the selected sets must be equal exactly
(ties to the earlier position, -0.0 tied with +0.0, -inf never selected, -1 padding), in
topk_indices' layout (ascending positions, -1 at the end). Then select_indices, the whole DSA
selection by query chunks, against the torch references with policy/model.py's visibility (KV
cache offset, left padding, a query always sees itself). On the CPU the kernels run in
Triton's interpreter (small shapes, several blocks per row); `pytest -m gpu` runs the compiled
kernels at DeepSeek-V3.2's sizes (k = 2048, 64 indexer heads x 128, up to 128K keys)."""

from __future__ import annotations

import pytest
import torch

from kernels.indexer import indexer_scores, quantize_fp8
from kernels.topk import (
    select_indices,
    select_indices_reference,
    topk_indices,
    topk_indices_reference,
)

NEG_INF = float("-inf")


def _causal(scores: torch.Tensor, offset: int) -> torch.Tensor:
    t = torch.arange(scores.shape[1], device=scores.device)[:, None] + offset
    s = torch.arange(scores.shape[2], device=scores.device)[None, :]
    return scores.masked_fill(s > t, NEG_INF)


def _scores(kind: str, b: int, t: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "integers":  # few distinct values, negatives included: ties everywhere
        return torch.randint(-2, 3, (b, t, s), generator=g).float()
    if kind == "relu":  # mostly exact zeros, like ReLU'd index scores
        return (torch.randn(b, t, s, generator=g) - 1).relu()
    return torch.randn(b, t, s, generator=g)


def _check(scores: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
    got = topk_indices(scores, k, **kwargs)
    want = topk_indices_reference(scores, k)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.cpu(), want.cpu())
    return got


@pytest.mark.parametrize("kind", ["integers", "relu", "normal"])
@pytest.mark.parametrize(
    ("b", "t", "s", "k", "offset"),
    [(2, 4, 300, 20, 296), (1, 3, 600, 150, 597), (2, 6, 40, 64, 34), (1, 9, 260, 7, 0)],
    ids=["k<visible", "ties-across-blocks", "k>visible", "causal-prefill"],
)
def test_matches_select_topk(device, kind, b, t, s, k, offset):
    scores = _causal(_scores(kind, b, t, s), offset).to(device)
    _check(scores, k, block=256)  # 256 keys a block: rows span 1 to 3 blocks, ragged
    _check(scores, k, block=256, causal_offset=offset)


def test_negative_zero_ties_with_positive_zero(device):
    g = torch.Generator().manual_seed(1)
    sign = torch.randint(0, 2, (1, 2, 300), generator=g).bool()
    scores = torch.where(sign, -0.0, 0.0)
    scores[:, :, [7, 150, 299]] = 1.0
    scores[0, 1, 3] = -1.0
    got = _check(scores.to(device), 40, block=256).cpu()
    # The three positives, then the 37 earliest zeros of either sign (row 1: 3 is negative).
    row0 = list(range(38)) + [150, 299]
    row1 = [p for p in range(39) if p != 3] + [150, 299]
    assert got[0, 0].tolist() == row0 and got[0, 1].tolist() == row1


def test_rows_with_few_allowed_keys(device):
    scores = torch.full((1, 4, 300), NEG_INF)
    scores[0, 0, 123] = -5.0  # a single allowed key, negative
    scores[0, 1, 299] = 0.0  # a single allowed key, the last of the row
    scores[0, 3, ::50] = torch.arange(6.0)  # six keys for k = 8
    got = _check(scores.to(device), 8, block=256).cpu()  # row 2 has no key at all
    assert got[0, 0].tolist() == [123] + [-1] * 7
    assert got[0, 1].tolist() == [299] + [-1] * 7
    assert got[0, 2].tolist() == [-1] * 8
    assert got[0, 3].tolist() == [0, 50, 100, 150, 200, 250, -1, -1]


def test_single_key_and_empty_selection(device):
    _check(torch.zeros(2, 3, 1, device=device), 4)  # S = 1 < k: [B, T, 1]
    assert topk_indices(torch.zeros(1, 2, 5, device=device), 0).shape == (1, 2, 0)


def test_causal_offset_never_reads_past_the_diagonal(device):
    # Finite garbage after the diagonal: the hint must make the kernel ignore it.
    clean = _causal(_scores("relu", 2, 5, 300, seed=2), 290)
    dirty = torch.where(clean.isinf(), 100.0, clean)
    got = topk_indices(dirty.to(device), 30, causal_offset=290, block=256)
    assert torch.equal(got.cpu(), topk_indices_reference(clean, 30))


def test_strided_scores(device):
    scores = _scores("integers", 2, 8, 300, seed=3).to(device)
    _check(scores[:, ::2], 25, block=256)  # every other query row: strided T
    _check(scores[:, :, ::2], 25, block=256)  # every other key: copied to contiguous rows


def test_bad_inputs_are_refused(device):
    with pytest.raises(ValueError, match="float32"):
        topk_indices(torch.zeros(1, 2, 5, dtype=torch.float64, device=device), 2)
    with pytest.raises(ValueError, match="power of two"):
        topk_indices(torch.zeros(1, 2, 5, device=device), 2, block=300)
    q, k, w = _indexer_inputs(1, 4, 4, 0)
    with pytest.raises(ValueError, match="key_valid"):
        select_indices(q, k, w, 2, key_valid=torch.ones(1, 3, dtype=torch.bool))


def _indexer_inputs(b, t, s, seed, h=2, d=16, dtype=torch.float32, device="cpu"):
    """Small-integer q, k and w in halves: every score is exact in any summation order, so the
    kernel's and the reference's scores are equal bit for bit, and ties are many."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (b, t, h, d), generator=g).to(dtype)
    k = torch.randint(-1, 2, (b, s, d), generator=g).to(dtype)
    w = torch.randint(-2, 3, (b, t, h), generator=g) / 2
    return q.to(device), k.to(device), w.to(device)


@pytest.mark.parametrize(
    ("b", "t", "s", "offset", "topk", "chunk"),
    [(2, 12, 12, 0, 5, None), (2, 12, 12, 0, 5, 5), (2, 6, 40, 34, 9, 4), (1, 1, 33, 32, 40, 1)],
    ids=["prefill", "prefill-chunked", "cache-offset-chunked", "decode-k>keys"],
)
def test_select_indices_matches_the_references(device, b, t, s, offset, topk, chunk):
    q, k, w = _indexer_inputs(b, t, s, seed=4)
    key_valid = torch.ones(b, s, dtype=torch.bool)
    key_valid[-1, : s // 3] = False  # the last row is left-padded
    key_valid[0, s // 2] = False  # and the first has a hole
    want = select_indices_reference(q, k, w, topk, offset=offset, key_valid=key_valid)
    q, k, w, key_valid = q.to(device), k.to(device), w.to(device), key_valid.to(device)
    got = select_indices(q, k, w, topk, offset=offset, key_valid=key_valid, query_chunk=chunk)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
    no_mask = select_indices(q, k, w, topk, offset=offset, query_chunk=chunk)
    assert torch.equal(no_mask.cpu(), select_indices_reference(q, k, w, topk, offset=offset).cpu())


def test_the_reference_is_the_policys_selection():
    from policy.indexer import select_topk

    for kind in ("integers", "relu", "normal"):
        scores = _causal(_scores(kind, 2, 5, 70, seed=3), 60)
        ids = select_topk(scores, 16).long()
        want = ids.masked_fill(ids < 0, 1 << 30).sort(-1).values
        assert torch.equal(
            topk_indices_reference(scores, 16), want.masked_fill(want == 1 << 30, -1).int()
        )


def test_select_indices_in_fp8(device):
    """fp8=True selects the top-k of the FP8 scores of the quantised q and k."""
    q, k, w = _indexer_inputs(2, 6, 40, seed=6)
    q = q + torch.randn(q.shape, generator=torch.Generator().manual_seed(7))  # beyond integers
    got = select_indices(q.to(device), k.to(device), w.to(device), 9, offset=34, fp8=True)
    (q8, qs), (k8, ks) = quantize_fp8(q), quantize_fp8(k)
    scores = indexer_scores(q8.to(device), k8.to(device), w.to(device), 34,
                            q_scale=qs.to(device), k_scale=ks.to(device))  # fmt: skip
    assert torch.equal(got.cpu(), topk_indices_reference(scores, 9).cpu())


def test_a_query_on_a_padding_slot_sees_itself(device):
    q, k, w = _indexer_inputs(1, 6, 6, seed=5, device=device)
    key_valid = torch.zeros(1, 6, dtype=torch.bool, device=device)
    got = select_indices(q, k, w, 3, key_valid=key_valid)
    assert got[0, :, 0].tolist() == list(range(6)) and (got[0, :, 1:] == -1).all()


# -- compiled kernels at DeepSeek-V3.2's sizes ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("s", [16384, 131072])
@pytest.mark.parametrize("kind", ["integers", "relu", "normal"])
def test_topk_deepseek_rows_on_cuda(kind, s):
    t = 64  # the last queries of a causal prefill of s tokens
    scores = _causal(_scores(kind, 1, t, s, seed=6), s - t).cuda()
    _check(scores, 2048)
    _check(scores, 2048, causal_offset=s - t)


def _reference_by_chunks(q, k, w, topk, offset, key_valid, chunk=512):
    # Each query's selection is independent: chunking the reference bounds its [T, H, S].
    return torch.cat(
        [
            select_indices_reference(
                q[:, i : i + chunk],
                k,
                w[:, i : i + chunk],
                topk,
                offset=offset + i,
                key_valid=key_valid,
            )
            for i in range(0, q.shape[1], chunk)
        ],
        dim=1,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("t", "s", "chunk"), [(4096, 16384, 1000), (4096, 16384, None), (4, 131072, None)]
)
def test_select_indices_deepseek_dims_on_cuda(t, s, chunk):
    # Integer-valued bf16 inputs: exact scores, so the torch reference is exact too.
    q, k, w = _indexer_inputs(1, t, s, seed=7, h=64, d=128, dtype=torch.bfloat16, device="cuda")
    key_valid = torch.ones(1, s, dtype=torch.bool, device="cuda")
    key_valid[:, :100] = False
    got = select_indices(q, k, w, 2048, offset=s - t, key_valid=key_valid, query_chunk=chunk)
    assert torch.equal(got, _reference_by_chunks(q, k, w, 2048, s - t, key_valid))


@pytest.mark.gpu
def test_select_indices_on_continuous_scores_on_cuda():
    # Random bf16 inputs: the selection must be exactly select_topk's on the kernel's scores.
    t, s, h, d = 4096, 16384, 64, 128
    g = torch.Generator(device="cuda").manual_seed(8)
    q = torch.randn(1, t, h, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, s, d, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, t, h, device="cuda", generator=g) * h**-0.5
    got = select_indices(q, k, w, 2048, offset=s - t)  # one chunk: the same scores as below
    want = topk_indices_reference(indexer_scores(q, k, w, s - t), 2048)
    assert torch.equal(got, want)
