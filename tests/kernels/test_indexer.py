"""The lightning-indexer scores kernel against its torch reference: ragged shapes, a KV-cache
offset, single-key rows, exact-zero ties from the ReLU, fp32 and bf16 inputs. On the CPU the
kernel runs in Triton's interpreter (small shapes, fp32); `pytest -m gpu` runs the compiled
kernel, bf16 included, at DeepSeek-V3.2's indexer dims (64 heads x 128)."""

from __future__ import annotations

import pytest
import torch

from kernels.indexer import dequantize_fp8, indexer_scores, indexer_scores_reference, quantize_fp8


def _inputs(b, t, s, h, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).to(dtype)
    k = torch.randn(b, s, d, generator=g).to(dtype)
    w = torch.randn(b, t, h, generator=g) * h**-0.5
    return q.to(device), k.to(device), w.to(device)


def _check(got, want, tol):
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf)  # the causal -inf pattern, exactly
    torch.testing.assert_close(got[~inf], want[~inf], rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("b", "t", "s", "offset"),
    [(1, 16, 16, 0), (2, 37, 37, 0), (1, 5, 70, 65), (2, 1, 33, 32), (1, 70, 20, 0)],
    ids=["square", "ragged", "cache-offset", "decode", "more-queries-than-keys"],
)
def test_scores_match_the_reference(device, b, t, s, offset):
    q, k, w = _inputs(b, t, s, 4, 16, torch.float32, device)
    got = indexer_scores(q, k, w, offset, block_t=16, block_s=16)
    want = indexer_scores_reference(q, k, w, offset)
    _check(got, want, 1e-4)
    assert got[0, 0, : offset + 1].isfinite().all()  # the first query sees keys 0..offset


def test_relu_ties_are_exact_zeros(device):
    # Keys orthogonal to every query: every score is an exact 0 (the ties top-k must break).
    q, k, w = _inputs(1, 16, 16, 2, 16, torch.float32, device)
    q[..., 8:] = 0
    k[..., :8] = 0
    got = indexer_scores(q, k, w, block_t=16, block_s=16)
    visible = got.isfinite()
    assert visible.sum() == 16 * 17 // 2 and (got[visible] == 0).all()


@pytest.mark.gpu  # Triton 3.9's interpreter returns garbage for bf16 loads on the CPU
def test_bf16_inputs_accumulate_in_fp32():
    q, k, w = _inputs(1, 32, 32, 4, 32, torch.bfloat16, "cuda")
    got = indexer_scores(q, k, w, block_t=16, block_s=16)
    # The reference upcasts the same bf16 values: only the summation order differs.
    _check(got, indexer_scores_reference(q, k, w), 1e-3)


def _rel(got, want):
    """||got - want|| / ||want|| over the visible (finite) scores, with the -inf pattern equal."""
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf)
    return float((got[~inf] - want[~inf]).norm() / want[~inf].norm())


@pytest.mark.parametrize(("t", "s", "offset"), [(37, 37, 0), (5, 70, 65)], ids=["ragged", "cache"])
def test_fp8_scores_are_those_of_the_dequantised_inputs(device, t, s, offset):
    q, k, w = _inputs(2, t, s, 4, 32, torch.float32, "cpu", seed=3)
    (q8, qs), (k8, ks) = quantize_fp8(q), quantize_fp8(k)
    # e4m3 keeps 3 mantissa bits; values far below a row's amax fall to its subnormal steps
    for x, x8, sc in ((q, q8, qs), (k, k8, ks)):
        err = (dequantize_fp8(x8, sc) - x).abs()
        assert (err <= x.abs() * 2**-4 + sc[..., None] * 2**-9).all()
    got = indexer_scores(
        q8.to(device), k8.to(device), w.to(device), offset,
        q_scale=qs.to(device), k_scale=ks.to(device), block_t=16, block_s=16,
    )  # fmt: skip
    want = indexer_scores_reference(dequantize_fp8(q8, qs), dequantize_fp8(k8, ks), w, offset)
    # Exact products in float32 on the CPU; Hopper's FP8 tensor cores accumulate in fewer bits.
    assert _rel(got.cpu(), want) < (1e-6 if device == "cpu" else 5e-3)


def test_bad_shapes_are_refused(device):
    q, k, w = _inputs(1, 4, 4, 2, 12, torch.float32, device)
    with pytest.raises(ValueError, match="power of two"):
        indexer_scores(q, k, w)
    q, k, w = _inputs(1, 4, 4, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="shapes"):
        indexer_scores(q, k[:, :, :8], w)
    (q8, qs), (k8, ks) = quantize_fp8(q), quantize_fp8(k)
    with pytest.raises(ValueError, match="FP8"):
        indexer_scores(q8, k, w, q_scale=qs, k_scale=ks)  # k not quantised
    with pytest.raises(ValueError, match="FP8"):
        indexer_scores(q8, k8, w)  # no scales


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1024, 4096])
def test_deepseek_dims_on_cuda(t):
    q, k, w = _inputs(1, t, t, 64, 128, torch.bfloat16, "cuda")
    got = indexer_scores(q, k, w)
    _check(got, indexer_scores_reference(q, k, w), 2e-3)


@pytest.mark.gpu
def test_fp8_deepseek_dims_on_cuda():
    q, k, w = _inputs(1, 4096, 4096, 64, 128, torch.float32, "cuda")
    (q8, qs), (k8, ks) = quantize_fp8(q), quantize_fp8(k)
    got = indexer_scores(q8, k8, w, q_scale=qs, k_scale=ks)
    want = indexer_scores_reference(dequantize_fp8(q8, qs), dequantize_fp8(k8, ks), w)
    assert _rel(got, want) < 5e-3
