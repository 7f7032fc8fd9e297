"""The MoE grouped GEMM (kernels/grouped_gemm.py) against a loop over the experts: outputs and
both gradients, with an expert that gets no rows, segments that do not fill a tile, and both
weight layouts. On the CPU the kernels run in Triton's interpreter (float32, small shapes);
`pytest -m gpu` runs them compiled in bf16 at the learner benchmark's expert shapes."""

from __future__ import annotations

import pytest
import torch

from kernels.grouped_gemm import grouped_linear_triton, grouped_mm, grouped_weight_grad

SMALL = {"block_m": 16, "block_n": 16, "block_k": 16}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _loop(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out, start = [], 0
    for e, c in enumerate(counts):
        out.append(x[start : start + c] @ w[e].t())
        start += c
    return torch.cat(out)


def _inputs(counts, k, n, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g).to(device, dtype)
    w = torch.randn(len(counts), n, k, generator=g).to(device, dtype)
    return x, w, torch.tensor(counts, device=device)


# Expert 1 idle, 37 rows (over two 16-row tiles), a single row, widths not multiples of 16.
COUNTS = [5, 0, 37, 1, 16]


def test_forward_matches_a_loop_over_the_experts(device):
    x, w, counts = _inputs(COUNTS, 40, 24, device)
    got = grouped_mm(x, w, counts, **SMALL)
    want = _loop(x, w, COUNTS)
    assert got.shape == want.shape and _rel(got, want) < 1e-6


def test_untransposed_weights(device):
    x, w, counts = _inputs(COUNTS, 40, 24, device)
    got = grouped_mm(x, w.transpose(1, 2).contiguous(), counts, transpose_b=False, **SMALL)
    assert _rel(got, _loop(x, w, COUNTS)) < 1e-6


def test_weight_gradient_gives_zero_to_an_idle_expert(device):
    x, w, counts = _inputs(COUNTS, 40, 24, device)
    dy = torch.randn(x.shape[0], 24, generator=torch.Generator().manual_seed(3)).to(device)
    dw = grouped_weight_grad(dy, x, counts, **SMALL)
    wr = w.clone().requires_grad_()
    _loop(x, wr, COUNTS).backward(dy)
    assert _rel(dw, wr.grad) < 1e-6
    assert (dw[1] == 0).all()


def test_autograd_matches_the_loop(device):
    x, w, counts = _inputs([3, 20, 0, 9], 32, 16, device, seed=1)
    dy = torch.randn(x.shape[0], 16, generator=torch.Generator().manual_seed(2)).to(device)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    grouped_linear_triton(xa, wa, counts).backward(dy)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    _loop(xr, wr, [3, 20, 0, 9]).backward(dy)
    assert _rel(xa.grad, xr.grad) < 1e-6 and _rel(wa.grad, wr.grad) < 1e-6


def test_shapes_are_checked(device):
    x, w, counts = _inputs(COUNTS, 40, 24, device)
    with pytest.raises(ValueError, match="shapes"):
        grouped_mm(x[:, :30], w, counts)


@pytest.mark.gpu
def test_expert_shapes_in_bf16_on_cuda():
    """64 experts, 2048 -> 1408, 49,152 token slots routed unevenly, bf16: forward and both
    gradients within bf16 rounding of the float32 loop."""
    g = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.rand(64, generator=g), 49152, True, generator=g).bincount(
        minlength=64
    )
    counts[8] += counts[7]  # expert 7 idle; the rows still sum to 49,152
    counts[7] = 0
    x = torch.randn(49152, 2048, device="cuda").bfloat16()
    w = (torch.randn(64, 1408, 2048, device="cuda") * 2048**-0.5).bfloat16()
    dy = torch.randn(49152, 1408, device="cuda").bfloat16()
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_linear_triton(xa, wa, counts.cuda())
    y.backward(dy)
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    want = _loop(xr, wr, counts.tolist())
    want.backward(dy.float())
    assert _rel(y.float(), want) < 1e-2
    assert _rel(xa.grad.float(), xr.grad) < 1e-2 and _rel(wa.grad.float(), wr.grad) < 1e-2
    assert (wa.grad[7] == 0).all()
