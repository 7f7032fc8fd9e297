"""The lightning indexer's sparse-stage training loss as Triton kernels, beside its torch reference.

In DeepSeek Sparse Attention's sparse training stage each query t attends only to the keys the
indexer selected for it, idx[b, t, i] (i < K; -1 marks an unused slot). On that set the indexer
scores are

    I[b, t, i] = sum_j w[b, t, j] * ReLU(q[b, t, j, :] . k[b, idx[b, t, i], :])

and the loss is the mean over valid queries of KL(p[t] || softmax(I[t])) on the valid slots,
where p [B, T, K] (the main attention's head-summed distribution over the same slots, a detached
target) is renormalised over the valid slots, exactly as policy.indexer.indexer_kl computes it
with support = the selected set.

`sparse_indexer_scores` returns I (float32, -inf at -1 slots); `sparse_indexer_kl` returns the
loss with gradients for q, k and w. Both run one query per program: its q [Hi, Di] stays in
registers while the program walks its K slots a block at a time, gathers the selected keys
[BLOCK_K, Di] and multiplies q by them on tensor cores, so neither the [T, K, Hi] logits nor the
[T, K, Di] gathered keys ever exist in memory. The loss forward keeps a running log-sum-exp and
the sums it needs per slot lane and writes only three floats per query (its KL, the log-sum-exp,
the reciprocal of p's mass); the backward recomputes the logits block by block and forms, with
dI = (softmax(I) - p) * valid[t] / (number of valid queries) * grad (p renormalised),

    dq[t, j] = sum_i dI[t, i] * w[t, j] * 1[logit > 0] * k[idx[t, i]]      (accumulated per program)
    dw[t, j] = sum_i dI[t, i] * ReLU(logit[t, j, i])                      (accumulated per program)
    dk[s]    = sum over (t, i) with idx[t, i] = s of
               sum_j dI[t, i] * w[t, j] * 1[logit > 0] * q[t, j]          (scatter-add)

dk is a scatter: many queries select the same key, so programs add their [BLOCK_K, Di] share
into a float32 buffer with atomics, and the order of those additions (hence dk's last bits)
varies from run to run. Under TRITON_INTERPRET=1 the same code runs on CPU tensors (small
shapes, float32, for tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Tiling(NamedTuple):
    """Launch settings of one kernel: slots per block, warps per program, pipeline stages."""

    block_k: int
    num_warps: int
    num_stages: int


# Untuned starting points, chosen so the per-program register tiles stay modest at 64 heads x
# 128: the backward holds a [64, 128] float32 dq accumulator and a [BLOCK_K, 128] dk block
# besides the logits, hence more warps and a smaller slot block than the forward.
FORWARD_TILING = Tiling(block_k=64, num_warps=4, num_stages=3)
BACKWARD_TILING = Tiling(block_k=32, num_warps=8, num_stages=2)


# ---------------------------------------------------------------------------------------------
# torch references (plain torch on gathered tensors: fine for small shapes, differentiable)


def sparse_indexer_scores_reference(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """q [B, T, H, D], k [B, S, D], w [B, T, H], idx [B, T, K] -> scores [B, T, K] float32,
    -inf where idx is -1. Builds the gathered keys [B, T, K, D] and logits [B, T, H, K]."""
    batch = torch.arange(q.shape[0], device=q.device)[:, None, None]
    keys = k.float()[batch, idx.long().clamp_min(0)]
    logits = torch.einsum("bthd,btkd->bthk", q.float(), keys).relu()
    scores = torch.einsum("bthk,bth->btk", logits, w.float())
    return scores.masked_fill(idx < 0, float("-inf"))


def sparse_indexer_kl_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    p: torch.Tensor,
    query_valid: torch.Tensor,
) -> torch.Tensor:
    """Mean over valid queries of KL(p[t] || softmax(I[t])) on the valid slots (idx >= 0), p
    renormalised there; the same sums as policy.indexer.indexer_kl, on [B, T, K] instead of
    [B, T, S]. Differentiable in q, k and w through torch autograd."""
    selected = idx >= 0
    log_q = sparse_indexer_scores_reference(q, k, w, idx).log_softmax(-1)
    target = p.detach().float().masked_fill(~selected, 0)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    kl = torch.where(
        target > 0, target * (target.clamp_min(1e-30).log() - log_q), torch.zeros_like(target)
    ).sum(-1)
    valid = query_valid.float()
    return (kl * valid).sum() / valid.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _gathered_logits(q, k_row_ptr, stride_ks, ids, sel, offs_d, PRECISION: tl.constexpr):
    """Gathers the selected keys [BLOCK_K, D] (zeros at -1 slots) and returns them with the
    logits q . k [BLOCK_H, BLOCK_K] in float32."""
    keys = tl.load(
        k_row_ptr + ids.to(tl.int64)[:, None] * stride_ks + offs_d[None, :],
        mask=sel[:, None],
        other=0.0,
    )
    logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION, out_dtype=tl.float32)
    return keys, logits


@triton.jit
def _sparse_scores_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    idx_ptr,
    out_ptr,
    K,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_wb,
    stride_wt,
    stride_ib,
    stride_it,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One query per program: every query gathers its own keys, so queries share no key tile.
    t, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, D)
    in_h = offs_h < H  # heads are padded to a tensor-core-sized block with zero rows
    q = tl.load(
        q_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
        mask=in_h[:, None],
        other=0.0,
    )
    w = tl.load(w_ptr + b * stride_wb + t * stride_wt + offs_h, mask=in_h, other=0.0)
    w = w.to(tl.float32)
    k_row_ptr = k_ptr + b * stride_kb
    idx_row = idx_ptr + b * stride_ib + t * stride_it
    out_row = out_ptr + b * stride_ib + t * stride_it  # out is laid out like idx
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        ids = tl.load(idx_row + offs_k, mask=in_k, other=-1)
        sel = ids >= 0
        _, logits = _gathered_logits(q, k_row_ptr, stride_ks, ids, sel, offs_d, PRECISION)
        scores = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
        tl.store(out_row + offs_k, tl.where(sel, scores, float("-inf")), mask=in_k)


@triton.jit
def _sparse_kl_fwd_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    idx_ptr,
    p_ptr,
    kl_ptr,
    lse_ptr,
    rmass_ptr,
    T,
    K,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_wb,
    stride_wt,
    stride_ib,
    stride_it,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    t, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, D)
    in_h = offs_h < H
    q = tl.load(
        q_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
        mask=in_h[:, None],
        other=0.0,
    )
    w = tl.load(w_ptr + b * stride_wb + t * stride_wt + offs_h, mask=in_h, other=0.0)
    w = w.to(tl.float32)
    k_row_ptr = k_ptr + b * stride_kb
    idx_row = idx_ptr + b * stride_ib + t * stride_it
    p_row = p_ptr + b * stride_ib + t * stride_it  # p is laid out like idx
    # Per-lane running sums (lane = slot position within a block), reduced after the loop:
    # an online log-sum-exp of I, and p's mass, sum p log p and sum p I. Lanes keep the loop
    # carry elementwise, with no cross-lane reduction per block.
    m_lane = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    l_lane = tl.zeros((BLOCK_K,), tl.float32)
    mass_lane = tl.zeros((BLOCK_K,), tl.float32)
    plogp_lane = tl.zeros((BLOCK_K,), tl.float32)
    pi_lane = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        ids = tl.load(idx_row + offs_k, mask=in_k, other=-1)
        sel = ids >= 0
        _, logits = _gathered_logits(q, k_row_ptr, stride_ks, ids, sel, offs_d, PRECISION)
        scores = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
        scores = tl.where(sel, scores, float("-inf"))
        p = tl.load(p_row + offs_k, mask=in_k, other=0.0)
        p = tl.where(sel, p, 0.0)  # mass on -1 slots is not part of the distribution
        m_new = tl.maximum(m_lane, scores)
        # A lane that has seen only -1 slots keeps m = -inf; shift it by 0 so exp(-inf - -inf)
        # never happens (its l stays 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_lane = l_lane * tl.exp(m_lane - m_safe) + tl.exp(scores - m_safe)
        m_lane = m_new
        mass_lane += p
        # p = 0 terms are 0 (as in indexer_kl), not 0 * log 0 or 0 * -inf: log 1 and the score
        # 0 stand in where p or the slot is empty, so no inf or nan is formed even off-branch.
        plogp_lane += p * tl.log(tl.where(p > 0, p, 1.0))
        pi_lane += p * tl.where(sel, scores, 0.0)
    m = tl.max(m_lane, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(l_lane * tl.exp(m_lane - m_safe), axis=0)
    lse = tl.where(l_sum > 0, m_safe + tl.log(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
    mass = tl.sum(mass_lane, axis=0)
    has_mass = mass > 0
    rmass = tl.where(has_mass, 1.0 / tl.where(has_mass, mass, 1.0), 0.0)
    # With p^ = p / mass: KL = sum p^ log p^ - sum p^ (I - lse)
    #                        = (sum p log p - sum p I) / mass - log mass + lse.
    # A row without mass (no valid slot, or p all zero there) has KL 0, as in indexer_kl.
    kl = (tl.sum(plogp_lane, axis=0) - tl.sum(pi_lane, axis=0)) * rmass
    kl = tl.where(has_mass, kl - tl.log(tl.where(has_mass, mass, 1.0)) + lse, 0.0)
    row = b * T + t
    tl.store(kl_ptr + row, kl)
    tl.store(lse_ptr + row, lse)
    tl.store(rmass_ptr + row, rmass)


@triton.jit
def _sparse_kl_bwd_kernel(
    q_ptr,
    k_ptr,
    w_ptr,
    idx_ptr,
    p_ptr,
    lse_ptr,
    rmass_ptr,
    coef_ptr,
    dq_ptr,
    dk_ptr,
    dw_ptr,
    T,
    K,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_wb,
    stride_wt,
    stride_ib,
    stride_it,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    t, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, D)
    in_h = offs_h < H
    q_offs = b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
    w_offs = b * stride_wb + t * stride_wt + offs_h
    row = b * T + t
    coef = tl.load(coef_ptr + row)  # grad * query weight / number of valid queries
    rmass = tl.load(rmass_ptr + row)
    if (coef == 0.0) | (rmass == 0.0):
        # Invalid queries, and rows without target mass, contribute nothing: skip their keys.
        tl.store(dq_ptr + q_offs, tl.zeros((BLOCK_H, D), tl.float32), mask=in_h[:, None])
        tl.store(dw_ptr + w_offs, tl.zeros((BLOCK_H,), tl.float32), mask=in_h)
        return
    lse = tl.load(lse_ptr + row)
    q = tl.load(q_ptr + q_offs, mask=in_h[:, None], other=0.0)
    w = tl.load(w_ptr + w_offs, mask=in_h, other=0.0).to(tl.float32)
    k_row_ptr = k_ptr + b * stride_kb
    dk_row_ptr = dk_ptr + b * stride_kb  # the float32 dk buffer is laid out like k
    idx_row = idx_ptr + b * stride_ib + t * stride_it
    p_row = p_ptr + b * stride_ib + t * stride_it
    dq = tl.zeros((BLOCK_H, D), tl.float32)
    dw = tl.zeros((BLOCK_H,), tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        ids = tl.load(idx_row + offs_k, mask=in_k, other=-1)
        sel = ids >= 0
        keys, logits = _gathered_logits(q, k_row_ptr, stride_ks, ids, sel, offs_d, PRECISION)
        scores = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
        soft = tl.where(sel, tl.exp(scores - lse), 0.0)
        p = tl.where(sel, tl.load(p_row + offs_k, mask=in_k, other=0.0), 0.0)
        d_scores = (soft - p * rmass) * coef  # [BLOCK_K]; 0 at -1 slots
        dw += tl.sum(tl.maximum(logits, 0.0) * d_scores[None, :], axis=1)
        # d logits [BLOCK_H, BLOCK_K]; ReLU passes no gradient at exactly 0 (as torch's relu).
        d_logits = tl.where(logits > 0, w[:, None] * d_scores[None, :], 0.0)
        # Cast to the inputs' dtype for the tensor cores (bf16 keeps fp32's exponent range).
        d_logits = d_logits.to(q.dtype)
        dq += tl.dot(d_logits, keys, input_precision=PRECISION, out_dtype=tl.float32)
        dk = tl.dot(tl.trans(d_logits), q, input_precision=PRECISION, out_dtype=tl.float32)
        tl.atomic_add(
            dk_row_ptr + ids.to(tl.int64)[:, None] * stride_ks + offs_d[None, :],
            dk,
            mask=sel[:, None],
            sem="relaxed",  # only the sums matter, not any ordering with other memory
        )
    tl.store(dq_ptr + q_offs, dq, mask=in_h[:, None])
    tl.store(dw_ptr + w_offs, dw, mask=in_h)


# ---------------------------------------------------------------------------------------------
# launchers


def _prepare(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, input_precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Checks shapes and returns contiguous q, k (in q's dtype), w, int32 idx, and the dot
    precision to use."""
    b, t, h, d = q.shape
    s, kk = k.shape[1], idx.shape[-1]
    if k.shape != (b, s, d) or w.shape != (b, t, h) or idx.shape != (b, t, kk):
        raise ValueError(
            f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}, "
            f"idx {tuple(idx.shape)}"
        )
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, not {idx.dtype}")
    if input_precision not in ("tf32", "ieee"):
        raise ValueError(f"input_precision must be 'tf32' or 'ieee', not {input_precision!r}")
    if q.dtype != torch.float32:
        input_precision = "tf32"  # only float32 operands have a choice; this is Triton's default
    return (
        q.contiguous(),
        k.to(q.dtype).contiguous(),
        w.contiguous(),
        idx.to(torch.int32).contiguous(),
        input_precision,
    )


def _block_h(h: int) -> int:
    # Tensor-core products need at least 16 rows; heads beyond H are zero rows, masked off.
    return max(16, triton.next_power_of_2(h))


def _check_block(block_k: int) -> None:
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k {block_k} must be a power of two >= 16")


def sparse_indexer_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    *,
    tiling: Tiling = FORWARD_TILING,
    input_precision: str = "tf32",
) -> torch.Tensor:
    """The indexer's scores on the selected slots: q [B, T, H, D], k [B, S, D], w [B, T, H],
    idx [B, T, K] (int32 or int64, -1 = unused) -> float32 [B, T, K], -inf at -1 slots; the
    contract of sparse_indexer_scores_reference. q and k may be bf16 or fp32 (products
    accumulate in fp32; fp32 operands multiply in TF32 on the GPU unless input_precision is
    "ieee"); D must be a power of two >= 16."""
    q, k, w, idx, precision = _prepare(q, k, w, idx, input_precision)
    _check_block(tiling.block_k)
    b, t, h, d = q.shape
    out = torch.empty(idx.shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    _sparse_scores_kernel[(t, b)](
        q,
        k,
        w,
        idx,
        out,
        idx.shape[-1],
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        w.stride(0),
        w.stride(1),
        idx.stride(0),
        idx.stride(1),
        H=h,
        D=d,
        BLOCK_H=_block_h(h),
        BLOCK_K=tiling.block_k,
        PRECISION=precision,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    return out


class _SparseIndexerKL(torch.autograd.Function):
    """The loss of sparse_indexer_kl; backward recomputes the logits from q, k, w and idx."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        w: torch.Tensor,
        idx: torch.Tensor,
        p: torch.Tensor,
        query_valid: torch.Tensor,
        forward_tiling: Tiling,
        backward_tiling: Tiling,
        input_precision: str,
    ) -> torch.Tensor:
        k_dtype, w_dtype = k.dtype, w.dtype
        q, k, w, idx, precision = _prepare(q, k, w, idx, input_precision)
        b, t, h, d = q.shape
        if p.shape != idx.shape or query_valid.shape != (b, t):
            raise ValueError(
                f"shapes p {tuple(p.shape)}, query_valid {tuple(query_valid.shape)} for idx "
                f"{tuple(idx.shape)}"
            )
        _check_block(forward_tiling.block_k)
        _check_block(backward_tiling.block_k)
        p = p.detach().to(torch.float32).contiguous()
        valid = query_valid.detach().to(torch.float32)
        n_valid = valid.sum().clamp_min(1)
        kl = torch.zeros(b, t, dtype=torch.float32, device=q.device)
        lse = torch.zeros_like(kl)
        rmass = torch.zeros_like(kl)
        if kl.numel() and idx.shape[-1]:
            _sparse_kl_fwd_kernel[(t, b)](
                q,
                k,
                w,
                idx,
                p,
                kl,
                lse,
                rmass,
                t,
                idx.shape[-1],
                q.stride(0),
                q.stride(1),
                q.stride(2),
                k.stride(0),
                k.stride(1),
                w.stride(0),
                w.stride(1),
                idx.stride(0),
                idx.stride(1),
                H=h,
                D=d,
                BLOCK_H=_block_h(h),
                BLOCK_K=forward_tiling.block_k,
                PRECISION=precision,
                num_warps=forward_tiling.num_warps,
                num_stages=forward_tiling.num_stages,
            )
        ctx.save_for_backward(q, k, w, idx, p, lse, rmass, valid, n_valid)
        ctx.k_dtype, ctx.w_dtype = k_dtype, w_dtype
        ctx.tiling, ctx.precision = backward_tiling, precision
        return (kl * valid).sum() / n_valid

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        q, k, w, idx, p, lse, rmass, valid, n_valid = ctx.saved_tensors
        b, t, h, d = q.shape
        coef = (valid * (grad.to(torch.float32) / n_valid)).contiguous()
        dq = torch.empty_like(q)
        dw = torch.empty_like(w)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # atomics add into it
        tiling = ctx.tiling
        if idx.shape[-1] == 0:
            dq.zero_()
            dw.zero_()
        elif dq.numel():
            _sparse_kl_bwd_kernel[(t, b)](
                q,
                k,
                w,
                idx,
                p,
                lse,
                rmass,
                coef,
                dq,
                dk,
                dw,
                t,
                idx.shape[-1],
                q.stride(0),
                q.stride(1),
                q.stride(2),
                k.stride(0),
                k.stride(1),
                w.stride(0),
                w.stride(1),
                idx.stride(0),
                idx.stride(1),
                H=h,
                D=d,
                BLOCK_H=_block_h(h),
                BLOCK_K=tiling.block_k,
                PRECISION=ctx.precision,
                num_warps=tiling.num_warps,
                num_stages=tiling.num_stages,
            )
        return dq, dk.to(ctx.k_dtype), dw.to(ctx.w_dtype), None, None, None, None, None, None


def sparse_indexer_kl(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    p: torch.Tensor,
    query_valid: torch.Tensor,
    *,
    forward_tiling: Tiling = FORWARD_TILING,
    backward_tiling: Tiling = BACKWARD_TILING,
    input_precision: str = "tf32",
) -> torch.Tensor:
    """The sparse-stage indexer loss, a scalar differentiable in q, k and w (p is a detached
    target): mean over valid queries of KL(p[t] || softmax(I[t])) on the slots with idx >= 0,
    p renormalised over them; the contract of sparse_indexer_kl_reference.

    q [B, T, H, D], k [B, S, D], w [B, T, H] (already scaled), idx [B, T, K] (int32 or int64,
    -1 = unused slot; a row's selected positions must be distinct, as select_topk makes them),
    p [B, T, K] (float; its mass on -1 slots is ignored), query_valid [B, T] (bool, or float
    weights as indexer_kl accepts). Gradients come back in each input's dtype. dk is summed by
    float32 atomics in an order that varies from run to run, so its last bits do too; dq and dw
    are deterministic.
    """
    return _SparseIndexerKL.apply(
        q, k, w, idx, p, query_valid, forward_tiling, backward_tiling, input_precision
    )
