"""Lightning-indexer scores of DeepSeek Sparse Attention, as a Triton kernel and its reference.

    I[b, t, s] = sum_j w[b, t, j] * ReLU(q[b, t, j, :] . k[b, s, :])

for queries t against keys s (one key per token, shared by every indexer head j), float32,
and -inf where s lies after t (causal: query t sits at key position t + offset, offset being
the number of keys that precede the queries, e.g. a KV cache). `indexer_scores_reference` is
the plain torch version the kernel is tested against.

The kernel tiles [BLOCK_T queries x BLOCK_S keys], keeps the key tile in registers and loops
over the heads, so the [T, heads, S] intermediate the reference builds never exists: per tile
it does `heads` matrix products of [BLOCK_T, D] x [D, BLOCK_S] with float32 accumulation, a
ReLU and a weighted sum. Tiles wholly above the causal diagonal are written as -inf without any
product. It returns the [B, T, S] scores of the queries it is given; callers that cannot hold
[T, S] pass a chunk of queries at a time (top-k selection then reduces each chunk).
Under TRITON_INTERPRET=1 the same code runs on CPU tensors (small shapes, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def indexer_scores_reference(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """q [B, T, H, D], k [B, S, D], w [B, T, H] -> scores [B, T, S] float32, -inf where
    s > t + offset."""
    logits = torch.einsum("bthd,bsd->bths", q.float(), k.float()).relu()
    scores = torch.einsum("bths,bth->bts", logits, w.float())
    t = torch.arange(q.shape[1], device=q.device)[:, None] + offset
    s = torch.arange(k.shape[1], device=q.device)[None, :]
    return scores.masked_fill(s > t, float("-inf"))


@triton.jit
def _indexer_scores_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    out_ptr,
    T,
    S,
    offset,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_wb,
    stride_wt,
    stride_ob,
    stride_ot,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_t, pid_s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    in_t, in_s = offs_t < T, offs_s < S
    out_ptrs = out_ptr + b * stride_ob + offs_t[:, None] * stride_ot + offs_s[None, :]
    out_mask = in_t[:, None] & in_s[None, :]
    visible = offs_s[None, :] <= offs_t[:, None] + offset
    last_t = tl.minimum(pid_t * BLOCK_T + BLOCK_T - 1, T - 1) + offset
    if pid_s * BLOCK_S > last_t:  # the whole tile is after every query: nothing to compute
        tl.store(out_ptrs, tl.full((BLOCK_T, BLOCK_S), float("-inf"), tl.float32), out_mask)
        return
    k = tl.load(
        k_ptr + b * stride_kb + offs_s[:, None] * stride_ks + offs_d[None, :],
        mask=in_s[:, None],
        other=0.0,
    )
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for h in range(H):
        q = tl.load(
            q_ptr + b * stride_qb + offs_t[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=in_t[:, None],
            other=0.0,
        )
        logits = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision=PREC)
        wt = tl.load(w_ptr + b * stride_wb + offs_t * stride_wt + h, mask=in_t, other=0.0)
        acc += tl.maximum(logits, 0.0) * wt.to(tl.float32)[:, None]
    acc = tl.where(visible, acc, float("-inf"))
    tl.store(out_ptrs, acc, out_mask)


def indexer_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    offset: int = 0,
    *,
    block_t: int = 64,
    block_s: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """The kernel's scores: same contract as indexer_scores_reference. q and k share a dtype
    (bf16 or fp32; products accumulate in fp32); D must be a power of two >= 16. The default
    tiling is the fastest of a sweep on an H200 at 8K tokens, 64 heads x 128 (benchmarks/
    indexer.py; docs/benchmarks.md)."""
    b, t, h, d = q.shape
    s = k.shape[1]
    if k.shape != (b, s, d) or w.shape != (b, t, h):
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    q, k, w = q.contiguous(), k.to(q.dtype).contiguous(), w.contiguous()
    out = torch.empty(b, t, s, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(t, block_t), triton.cdiv(s, block_s), b)
    _indexer_scores_kernel[grid](
        q,
        k,
        w,
        out,
        t,
        s,
        offset,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        out.stride(1),
        H=h,
        D=d,
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        # float32 inputs in full float32: TF32 rounding would move near-tied selections
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
