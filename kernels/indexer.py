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
FP8 inputs (float8_e4m3fn with one float32 scale per row, `quantize_fp8`: the deployed
format) run through the same kernel on FP8 tensor cores; the Hadamard rotation the deployed
indexer applies before quantising is orthonormal and left to the caller.
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


FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # the largest finite e4m3 value


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8_e4m3fn [..., D], float32 scale [...]) with one scale per row: the
    1 x 128 block of a 128-dim indexer head (D <= 128 here), amax mapped to e4m3's largest
    value; x ~ x8 * scale."""
    if x.shape[-1] > 128:
        raise ValueError(f"one scale per row covers at most 128 values, not {x.shape[-1]}")
    scale = (x.float().abs().amax(-1) / _FP8_MAX).clamp_min(1e-12)
    return (x.float() / scale[..., None]).to(FP8), scale


def dequantize_fp8(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """quantize_fp8's inverse up to its rounding: float32 x8 * scale."""
    return x8.float() * scale[..., None]


@triton.jit
def _indexer_scores_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    ks_ptr,
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
    stride_ksb,
    stride_ob,
    stride_ot,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PREC: tl.constexpr,
    K_SCALED: tl.constexpr,
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
    if K_SCALED:  # FP8 keys: ReLU(sk * x) = sk * ReLU(x) for the key's scale sk > 0
        ks = tl.load(ks_ptr + b * stride_ksb + offs_s, mask=in_s, other=0.0)
        acc = acc * ks[None, :]
    acc = tl.where(visible, acc, float("-inf"))
    tl.store(out_ptrs, acc, out_mask)


def indexer_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    offset: int = 0,
    *,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    block_t: int = 64,
    block_s: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """The kernel's scores: same contract as indexer_scores_reference. q and k share a dtype
    (bf16 or fp32; products accumulate in fp32); D must be a power of two >= 16. The default
    tiling is the fastest of a sweep on an H200 at 8K tokens, 64 heads x 128 (benchmarks/
    indexer.py; docs/benchmarks.md).

    FP8 (the deployed format): q and k float8_e4m3fn from quantize_fp8, with their scales
    q_scale [B, T, H] and k_scale [B, S]; the scores are those of the dequantised inputs. q's
    scale folds into w and k's multiplies each key's column once (both are positive, so they
    pass through the ReLU)."""
    b, t, h, d = q.shape
    s = k.shape[1]
    if k.shape != (b, s, d) or w.shape != (b, t, h):
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    fp8 = q.dtype == FP8
    if fp8 != (k.dtype == FP8) or fp8 != (q_scale is not None and k_scale is not None):
        raise ValueError("FP8 scores need q and k in float8_e4m3fn and both q_scale and k_scale")
    if fp8:
        w = w.float() * q_scale.float()
        k_scale = k_scale.float().contiguous()
    q, k, w = q.contiguous(), k.to(q.dtype).contiguous(), w.contiguous()
    out = torch.empty(b, t, s, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(t, block_t), triton.cdiv(s, block_s), b)
    _indexer_scores_kernel[grid](
        q,
        k,
        w,
        k_scale if fp8 else w,  # unread without FP8
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
        k_scale.stride(0) if fp8 else 0,
        out.stride(0),
        out.stride(1),
        H=h,
        D=d,
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        # float32 inputs in full float32: TF32 rounding would move near-tied selections
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        K_SCALED=fp8,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
