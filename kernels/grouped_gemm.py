"""Grouped GEMM for the MoE experts: rows sorted by expert, one Triton launch for all experts,
forward and backward, with no host synchronisation (the expert sizes stay on the device).

    y[rows of e] = x[rows of e] @ W[e]^T        x [M, K], W [E, N, K], counts [E] (sum = M)

policy/moe.py takes torch's own grouped matmul (`torch._grouped_mm`) where it runs (CUDA,
compute capability >= 9, bf16); this is the fallback on other CUDA devices and dtypes, in place
of a loop over the experts that needs each expert's row count on the host.

Tiling: each expert's rows are cut into tiles of BLOCK_M rows; tile i belongs to the expert
whose cumulative tile count first exceeds i (each program finds it by comparing i with all E
cumulative counts at once). The grid holds cdiv(M, BLOCK_M) + E tiles, an upper bound known on
the host; programs past the last real tile return at once. The weight gradient runs one
program per (expert, block of W's rows and columns), walking that expert's rows; an expert
with no rows gets a zero gradient. Under TRITON_INTERPRET=1 the same code runs on CPU tensors
(float32, small shapes, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, c_ptr, seg_end_ptr, tile_end_ptr,
    E, N, K,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    E_POW2: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """c[rows of e, :] = a[rows of e, :] @ B[e] for B[e] [K, N] given by its strides."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_e = tl.arange(0, E_POW2)
    tile_end = tl.load(tile_end_ptr + offs_e, mask=offs_e < E, other=2147483647)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    if e >= E:  # past the last real tile
        return
    first_tile = tl.where(e > 0, tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0), 0)
    seg_start = tl.where(e > 0, tl.load(seg_end_ptr + e - 1, mask=e > 0, other=0), 0)
    seg_end = tl.load(seg_end_ptr + e)
    rows = seg_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < seg_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_base = b_ptr + e.to(tl.int64) * stride_be + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        in_k = ks < K
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=in_rows[:, None] & in_k[None, :])
        b = tl.load(b_base + ks[:, None] * stride_bk, mask=in_k[:, None] & in_cols[None, :])
        acc += tl.dot(a, b, input_precision=PREC)
    c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    dy_ptr, x_ptr, dw_ptr, seg_end_ptr,
    N, K,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dW[e, n-block, k-block] = dy[rows of e, n-block]^T @ x[rows of e, k-block]."""
    e = tl.program_id(0)
    pid_n, pid_k = tl.program_id(1), tl.program_id(2)
    seg_start = tl.where(e > 0, tl.load(seg_end_ptr + e - 1, mask=e > 0, other=0), 0)
    seg_end = tl.load(seg_end_ptr + e)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_n, in_k = ns < N, ks < K
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for m0 in range(seg_start, seg_end, BLOCK_M):
        rows = m0 + offs_m
        in_rows = rows < seg_end
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(
            dy_ptr + r64 * stride_dym + ns[None, :] * stride_dyn,
            mask=in_rows[:, None] & in_n[None, :],
        )
        x = tl.load(
            x_ptr + r64 * stride_xm + ks[None, :] * stride_xk,
            mask=in_rows[:, None] & in_k[None, :],
        )
        acc += tl.dot(tl.trans(dy), x, input_precision=PREC)
    dw = dw_ptr + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=in_n[:, None] & in_k[None, :])


def _precision(x: torch.Tensor) -> str:
    """float32 multiplies in IEEE float32 (the tests' oracle is exact float32), bf16/fp16 on
    the tensor cores as they are."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _segments(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive cumulative row counts and tile counts per expert, int32, on the device."""
    counts = counts.to(torch.int64)
    seg_end = counts.cumsum(0).to(torch.int32)
    tile_end = ((counts + block_m - 1) // block_m).cumsum(0).to(torch.int32)
    return seg_end.contiguous(), tile_end.contiguous()


def grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    counts: torch.Tensor,
    *,
    transpose_b: bool = True,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """a [M, K] (rows sorted by group, counts[g] rows for group g) times b per group: with
    transpose_b, b [G, N, K] and out = a_g @ b[g]^T (an nn.Linear-layout weight); without,
    b [G, K, N] and out = a_g @ b[g]. Returns [M, N] in a's dtype."""
    g = b.shape[0]
    if transpose_b:
        n, k = b.shape[1], b.shape[2]
        stride_bk, stride_bn = b.stride(2), b.stride(1)
    else:
        k, n = b.shape[1], b.shape[2]
        stride_bk, stride_bn = b.stride(1), b.stride(2)
    m = a.shape[0]
    if a.shape[1] != k or counts.shape != (g,):
        raise ValueError(f"shapes a {tuple(a.shape)}, b {tuple(b.shape)}, counts {counts.shape}")
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    seg_end, tile_end = _segments(counts, block_m)
    grid = (triton.cdiv(m, block_m) + g, triton.cdiv(n, block_n))
    _grouped_mm_kernel[grid](
        a, b, out, seg_end, tile_end,
        g, n, k,
        a.stride(0), a.stride(1),
        b.stride(0), stride_bk, stride_bn,
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        E_POW2=triton.next_power_of_2(g), PREC=_precision(a),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def grouped_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    counts: torch.Tensor,
    *,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """dW [G, N, K] with dW[g] = dy_g^T @ x_g for the rows of group g (zero for a group with
    none), in dy's dtype: the weight gradient of grouped_mm(x, W, counts)."""
    g, n, k = counts.shape[0], dy.shape[1], x.shape[1]
    dw = torch.empty(g, n, k, dtype=dy.dtype, device=dy.device)
    seg_end, _ = _segments(counts, block_m)
    grid = (g, triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _grouped_wgrad_kernel[grid](
        dy, x, dw, seg_end,
        n, k,
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PREC=_precision(dy),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return dw


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts):  # noqa: ANN001
        ctx.save_for_backward(x, weight, counts)
        return grouped_mm(x, weight, counts)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        x, weight, counts = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_mm(dy, weight, counts, transpose_b=False) if ctx.needs_input_grad[0] else None
        dw = grouped_weight_grad(dy, x, counts) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Rows of x [M, in] sorted by expert (counts [E] on x's device) times weight [E, out, in]
    transposed, with autograd through x and weight: [M, out]."""
    return _GroupedLinear.apply(x, weight, counts)


__all__ = ["grouped_linear_triton", "grouped_mm", "grouped_weight_grad"]
