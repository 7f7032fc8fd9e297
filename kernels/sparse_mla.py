"""Sparse MLA: attention of every query to the key positions DSA selected for it, in absorbed
MQA mode, as Triton kernels (forward, backward, head-summed probabilities) and their reference.

Absorbed MQA mode: all H query heads share one key entry per token, kv[s] = [c_s | k_rope_s]
(d_qk = kv_lora_rank + rope dims, 576 at DeepSeek-V3.2's), and the value is its latent part
kv[s, :d_v] (d_v = kv_lora_rank, 512). Each query t attends only to its K selected positions
indices[t, :] (int32, -1 = unused slot), so work and memory are O(T * K), not O(T * S):

    o[t, h] = sum_i softmax_i(scale * q[t, h] . kv[idx_i]) * kv[idx_i, :d_v]
    lse[t, h] = logsumexp_i(scale * q[t, h] . kv[idx_i])

Forward: one program per (query, block of heads); it walks the query's indices in blocks,
gathers those kv rows once for all heads of the block (the latent part serves as key and as
value), and keeps an online softmax. Backward, in query chunks: one kernel recomputes the
probabilities from lse per (query, block of heads), accumulates dq and stores ds and p; a
second sums those over all heads per (query, block of slots) as one product with the heads as
its inner dimension and adds each row into a float32 dkv with atomics (a key is selected by
many queries), so dkv's summation order varies run to run in the last bits; dq is deterministic.
`head_summed_probs` gives sum_h p[t, h, i] / H, the main attention's distribution over the
selected set that the indexer learns from.

Queries whose every slot is -1 get o = 0 and lse = -inf (callers always let a query see itself,
so this does not arise in the policy). `sparse_mla_reference` is the plain torch version the
kernels are tested against. Under TRITON_INTERPRET=1 the same code runs on CPU tensors (small,
float32 shapes, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import errors as _triton_errors

# What a launch raises when a tiling does not fit the device (shared memory, registers).
_DOES_NOT_FIT = tuple(
    getattr(_triton_errors, name)
    for name in ("OutOfResources", "PTXASError")
    if hasattr(_triton_errors, name)
)


def sparse_mla_reference(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, D], kv [B, S, D], indices [B, T, K] (-1 = unused) -> (o [B, T, H, d_v] in
    q's dtype, lse [B, T, H] float32). Gathers [B, T, K, D]: small shapes only."""
    b, t, _, d = q.shape
    valid = indices >= 0
    rows = indices.long().clamp_min(0)
    keys = torch.gather(
        kv.float().unsqueeze(1).expand(b, t, -1, d), 2, rows[..., None].expand(-1, -1, -1, d)
    )
    scores = torch.einsum("bthd,btkd->bthk", q.float(), keys) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = scores.logsumexp(-1)
    probs = torch.where(lse[..., None].isfinite(), (scores - lse[..., None]).exp(), 0.0)
    o = torch.einsum("bthk,btkv->bthv", probs, keys[..., :d_v])
    return o.to(q.dtype), lse


@triton.jit
def _fwd_kernel(
    q_ptr, kv_ptr, idx_ptr, o_ptr, lse_ptr,
    T, K, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kvb, stride_kvs,
    stride_ib, stride_it,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt,
    DL: tl.constexpr, DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    H_BLOCKS: tl.constexpr,
):  # fmt: skip
    # (query, head block) flattened on grid axis 0: axes 1 and 2 stop at 65,535 and a query's
    # head blocks run side by side, sharing its gathered rows in L2. int64: t * stride_qt
    # passes 2^31 from ~29K tokens at 128 heads x 576.
    t, pid_h = (tl.program_id(0) // H_BLOCKS).to(tl.int64), tl.program_id(0) % H_BLOCKS
    b = tl.program_id(1).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l, offs_r = tl.arange(0, DL), tl.arange(0, DR)
    offs_n = tl.arange(0, BLOCK_N)
    q_row = q_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_l[None, :])
    q_rope = tl.load(q_row + DL + offs_r[None, :])
    kv_base = kv_ptr + b * stride_kvb
    idx_base = idx_ptr + b * stride_ib + t * stride_it
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DL), tl.float32)
    for start in range(0, K, BLOCK_N):
        n = start + offs_n
        idx = tl.load(idx_base + n, mask=n < K, other=-1)
        valid = idx >= 0
        rows = kv_base + tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_kvs
        k_lat = tl.load(rows + offs_l[None, :], mask=valid[:, None], other=0.0)
        k_rope = tl.load(rows + DL + offs_r[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PREC) + tl.dot(
            q_rope, tl.trans(k_rope), input_precision=PREC
        )
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only unused slots keeps m = -inf; shift by 0 there (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=PREC)
        m_i = m_new
    has_any = l_i > 0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    o_row = o_ptr + b * stride_ob + t * stride_ot + offs_h[:, None] * stride_oh
    tl.store(o_row + offs_l[None, :], out.to(o_ptr.dtype.element_ty))
    # Natural-log lse of the scaled scores; -inf for a row with no valid slot.
    lse = tl.where(
        has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) / 1.4426950408889634, float("-inf")
    )
    tl.store(lse_ptr + b * stride_lb + t * stride_lt + offs_h, lse)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, kv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, ps_ptr,
    T, K, H, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kvb, stride_kvs,
    stride_ib, stride_it,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lt,
    stride_pb, stride_pt,
    DL: tl.constexpr, DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    H_BLOCKS: tl.constexpr,
):  # fmt: skip
    """dq of one (query, block of heads): the forward's walk over the selected keys again. It
    also stores the block's ds and p (in q's dtype, as the dkv products take them) to
    ps[b, t, h, i] and ps[b, t, H + h, i], for _bwd_dkv_kernel."""
    # (query, head block) flattened on grid axis 0: axes 1 and 2 stop at 65,535 and a query's
    # head blocks run side by side, sharing its gathered rows in L2. int64: t * stride_qt
    # passes 2^31 from ~29K tokens at 128 heads x 576.
    t, pid_h = (tl.program_id(0) // H_BLOCKS).to(tl.int64), tl.program_id(0) % H_BLOCKS
    b = tl.program_id(1).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l, offs_r = tl.arange(0, DL), tl.arange(0, DR)
    offs_n = tl.arange(0, BLOCK_N)
    q_row = q_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_l[None, :])
    q_rope = tl.load(q_row + DL + offs_r[None, :])
    do = tl.load(
        do_ptr + b * stride_ob + t * stride_ot + offs_h[:, None] * stride_oh + offs_l[None, :]
    )
    lse = tl.load(lse_ptr + b * stride_lb + t * stride_lt + offs_h)
    delta = tl.load(delta_ptr + b * stride_lb + t * stride_lt + offs_h)
    # Rows with no valid slot (lse = -inf) get p = 0 everywhere.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    qk_scale = sm_scale * 1.4426950408889634
    kv_base = kv_ptr + b * stride_kvb
    idx_base = idx_ptr + b * stride_ib + t * stride_it
    dq_lat = tl.zeros((BLOCK_H, DL), tl.float32)
    dq_rope = tl.zeros((BLOCK_H, DR), tl.float32)
    ps_row = ps_ptr + b * stride_pb + t * stride_pt + offs_h[:, None] * K
    for start in range(0, K, BLOCK_N):
        n = start + offs_n
        idx = tl.load(idx_base + n, mask=n < K, other=-1)
        valid = idx >= 0
        rows = kv_base + tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_kvs
        k_lat = tl.load(rows + offs_l[None, :], mask=valid[:, None], other=0.0)
        k_rope = tl.load(rows + DL + offs_r[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PREC) + tl.dot(
            q_rope, tl.trans(k_rope), input_precision=PREC
        )
        p = tl.where(valid[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(k_lat), input_precision=PREC)
        ds = (p * (dp - delta[:, None]) * sm_scale).to(k_lat.dtype)
        dq_lat += tl.dot(ds, k_lat, input_precision=PREC)
        dq_rope += tl.dot(ds, k_rope, input_precision=PREC)
        in_k = (n < K)[None, :]
        tl.store(ps_row + n[None, :], ds, mask=in_k)
        tl.store(ps_row + H * K + n[None, :], p.to(k_lat.dtype), mask=in_k)
    dq_row = dq_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh
    tl.store(dq_row + offs_l[None, :], dq_lat.to(dq_ptr.dtype.element_ty))
    tl.store(dq_row + DL + offs_r[None, :], dq_rope.to(dq_ptr.dtype.element_ty))


@triton.jit
def _bwd_dkv_kernel(
    q_ptr, idx_ptr, do_ptr, ps_ptr, dkv_ptr,
    K, H,
    stride_qb, stride_qt, stride_qh,
    stride_ib, stride_it,
    stride_ob, stride_ot, stride_oh,
    stride_pb, stride_pt,
    stride_dkb, stride_dks,
    DL: tl.constexpr, DR: tl.constexpr, HP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    N_BLOCKS: tl.constexpr,
):  # fmt: skip
    """d kv rows of one (query, block of its selected slots), summed over all heads, from the
    ds and p that _bwd_dq_kernel stored: one product with the heads as its inner dimension,
    dkv[s] += sum_h ds[h, s] q[h] (key part) + p[h, s] do[h] (value part, the latent columns),
    in column blocks, each added into the float32 dkv with one atomic add per element."""
    # (query, slot block) flattened on grid axis 0, as in the forward.
    t, pid_n = (tl.program_id(0) // N_BLOCKS).to(tl.int64), tl.program_id(0) % N_BLOCKS
    b = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = tl.load(idx_ptr + b * stride_ib + t * stride_it + n, mask=n < K, other=-1)
    valid = idx >= 0
    if tl.max(valid.to(tl.int32), 0) == 0:  # trailing unused slots of an early query
        return
    offs_h = tl.arange(0, HP)
    in_h = offs_h < H
    # ds^T and p^T [slots, heads]: stored heads-major, read transposed.
    ps_rows = ps_ptr + b * stride_pb + t * stride_pt + offs_h[None, :] * K + n[:, None]
    in_hn = in_h[None, :] & (n < K)[:, None]
    ds_t = tl.load(ps_rows, mask=in_hn, other=0.0)
    p_t = tl.load(ps_rows + H * K, mask=in_hn, other=0.0)
    q_rows = q_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh
    do_rows = do_ptr + b * stride_ob + t * stride_ot + offs_h[:, None] * stride_oh
    dst = dkv_ptr + b * stride_dkb + tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_dks
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, DL, BLOCK_D):
        cols = d0 + offs_d
        q_d = tl.load(q_rows + cols[None, :], mask=in_h[:, None], other=0.0)
        do_d = tl.load(do_rows + cols[None, :], mask=in_h[:, None], other=0.0)
        acc = tl.dot(ds_t, q_d, input_precision=PREC) + tl.dot(p_t, do_d, input_precision=PREC)
        # Relaxed: only the sums matter; acq_rel (Triton's default) fences each add, 1.6x
        # the whole backward's time on an H200.
        tl.atomic_add(dst + cols[None, :], acc, mask=valid[:, None], sem="relaxed")
    offs_r = tl.arange(0, DR)
    q_r = tl.load(q_rows + DL + offs_r[None, :], mask=in_h[:, None], other=0.0)
    acc_r = tl.dot(ds_t, q_r, input_precision=PREC)
    tl.atomic_add(dst + DL + offs_r[None, :], acc_r, mask=valid[:, None], sem="relaxed")


@triton.jit
def _probs_kernel(
    q_ptr, kv_ptr, idx_ptr, lse_ptr, out_ptr,
    T, K, H, sm_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kvb, stride_kvs,
    stride_ib, stride_it,
    stride_lb, stride_lt,
    DL: tl.constexpr, DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    N_BLOCKS: tl.constexpr,
):  # fmt: skip
    # (query, slot block) flattened on grid axis 0, as in the forward.
    t, pid_n = (tl.program_id(0) // N_BLOCKS).to(tl.int64), tl.program_id(0) % N_BLOCKS
    b = tl.program_id(1).to(tl.int64)
    offs_l, offs_r = tl.arange(0, DL), tl.arange(0, DR)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    idx_base = idx_ptr + b * stride_ib + t * stride_it
    idx = tl.load(idx_base + n, mask=n < K, other=-1)
    valid = idx >= 0
    rows = kv_ptr + b * stride_kvb + tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_kvs
    k_lat = tl.load(rows + offs_l[None, :], mask=valid[:, None], other=0.0)
    k_rope = tl.load(rows + DL + offs_r[None, :], mask=valid[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    total = tl.zeros((BLOCK_N,), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        q_row = q_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh
        q_lat = tl.load(q_row + offs_l[None, :])
        q_rope = tl.load(q_row + DL + offs_r[None, :])
        lse = tl.load(lse_ptr + b * stride_lb + t * stride_lt + offs_h)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=PREC) + tl.dot(
            q_rope, tl.trans(k_rope), input_precision=PREC
        )
        total += tl.sum(tl.exp2(s * qk_scale - lse2[:, None]), 0)
    total = tl.where(valid, total / H, 0.0)
    tl.store(out_ptr + (b * T + t) * K + n, total, mask=n < K)


def _check(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> tuple[int, int]:
    b, t, h, d = q.shape
    if kv.dim() != 3 or kv.shape[0] != b or kv.shape[2] != d or indices.shape[:2] != (b, t):
        raise ValueError(
            f"shapes q {tuple(q.shape)}, kv {tuple(kv.shape)}, indices {tuple(indices.shape)}"
        )
    d_r = d - d_v
    for name, dim in (("d_v", d_v), ("d_qk - d_v", d_r)):
        if dim < 16 or dim & (dim - 1):
            raise ValueError(f"{name} = {dim} must be a power of two >= 16")
    if indices.dtype != torch.int32:
        raise ValueError(f"indices must be int32, not {indices.dtype}")
    if kv.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but kv is {kv.dtype}")
    return d_v, d_r


def _block_h(h: int, want: int) -> int:
    block = min(want, h)
    if block < 16 or h % block:
        raise ValueError(f"{h} heads: the head count must be a multiple of 16")
    return block


def _fitted(launch, block_n: int, num_stages: int) -> None:  # noqa: ANN001
    """launch(block_n, num_stages) with the given tiling, or, where that does not fit this
    device's shared memory or registers (it depends on the head block the head count allows),
    with fewer pipeline stages, then smaller key blocks."""
    ladder = [(block_n, num_stages), (block_n, 1), (32, 1), (16, 1)]
    tried = [c for i, c in enumerate(ladder) if c[0] <= block_n and c not in ladder[:i]]
    for i, (bn, stages) in enumerate(tried):
        try:
            return launch(bn, stages)
        except _DOES_NOT_FIT:
            if i == len(tried) - 1:
                raise


def _precision(x: torch.Tensor) -> str:
    """float32 inputs multiply in full float32 ("ieee"), not TF32: float32 models are for
    checking against the reference, where TF32's rounding would move DSA's near-tied
    selections; bf16 inputs take the tensor cores as they are."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _rows(kv: torch.Tensor) -> torch.Tensor:
    """kv as the kernels read it: any batch and slot strides (a slice of a KV cache reads in
    place), contiguous rows."""
    return kv if kv.stride(-1) == 1 else kv.contiguous()


def _strides(x: torch.Tensor, n: int) -> tuple[int, ...]:
    return tuple(x.stride(i) for i in range(n))


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    d_v: int,
    *,
    block_h: int = 64,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel: same contract as sparse_mla_reference (no autograd)."""
    d_l, d_r = _check(q, kv, indices, d_v)
    b, t, h, _ = q.shape
    q, kv, indices = q.contiguous(), _rows(kv), indices.contiguous()
    block_h = _block_h(h, block_h)
    o = torch.empty(b, t, h, d_l, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, t, h, dtype=torch.float32, device=q.device)
    _fitted(lambda bn, stages: _fwd_kernel[(t * (h // block_h), b)](
        q, kv, indices, o, lse,
        t, indices.shape[2], scale,
        *_strides(q, 3), *_strides(kv, 2), *_strides(indices, 2), *_strides(o, 3),
        *_strides(lse, 2),
        DL=d_l, DR=d_r, BLOCK_H=block_h, BLOCK_N=bn, PREC=_precision(q), H_BLOCKS=h // block_h,
        num_warps=num_warps, num_stages=stages,
    ), block_n, num_stages)  # fmt: skip
    return o, lse


def sparse_mla_bwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    *,
    dq_config: tuple[int, int, int, int] = (64, 64, 8, 1),
    dkv_config: tuple[int, int, int, int] = (128, 64, 4, 1),
    chunk_bytes: int = 1 << 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernels: (dq [B, T, H, D] in q's dtype, dkv [B, S, D] in kv's dtype).

    In query chunks of about `chunk_bytes` of ds and p: _bwd_dq_kernel walks each query's slots
    per block of heads (like the forward), accumulates dq and stores ds and p [chunk, 2H, K];
    _bwd_dkv_kernel then sums them over the heads per block of slots as one product whose inner
    dimension is all H heads (a tile the tensor cores take whole) and adds each row into dkv.
    The scores are computed once. Configs: dq (block_h, block_n, num_warps, num_stages), dkv
    (block_n slots, block_d columns, num_warps, num_stages); the defaults are the fastest of
    a sweep on an H200 at 8K tokens, 128 heads, top-2048 (docs/benchmarks.md).
    """
    d_l, d_r = _check(q, kv, indices, o.shape[-1])
    b, t, h, _ = q.shape
    k = indices.shape[2]
    q, kv, indices = q.contiguous(), _rows(kv), indices.contiguous()
    do, lse = do.contiguous(), lse.contiguous()
    # delta[t, h] = sum_v o * do: the softmax backward's row term. In query chunks: float32
    # copies of the whole [T, H, d_v] o and do would be 4x the memory of the kernels' own.
    delta = torch.empty(b, t, h, dtype=torch.float32, device=q.device)
    step = max(1, (1 << 26) // (h * o.shape[-1]))
    for i in range(0, t, step):
        delta[:, i : i + step] = (o[:, i : i + step].float() * do[:, i : i + step].float()).sum(-1)
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    tc = max(1, min(t, chunk_bytes // (b * 2 * h * k * q.element_size())))
    ps = torch.empty(b, tc, 2 * h, k, dtype=q.dtype, device=q.device)
    bh, bn_q, warps, stages_q = dq_config
    bh = _block_h(h, bh)
    bn_kv, bd, warps2, stages_kv = dkv_config
    bd = min(bd, d_l)
    prec = _precision(q)

    def chunk(sl: slice) -> None:
        n_t = sl.stop - sl.start
        q_c, i_c, do_c = q[:, sl], indices[:, sl], do[:, sl]
        lse_c, delta_c, dq_c = lse[:, sl], delta[:, sl], dq[:, sl]
        common = (*_strides(q_c, 3), *_strides(kv, 2), *_strides(i_c, 2), *_strides(do_c, 3))
        _fitted(lambda bn, st: _bwd_dq_kernel[(n_t * (h // bh), b)](
            q_c, kv, i_c, do_c, lse_c, delta_c, dq_c, ps, n_t, k, h, scale, *common,
            *_strides(lse_c, 2), *_strides(ps, 2),
            DL=d_l, DR=d_r, BLOCK_H=bh, BLOCK_N=bn, PREC=prec, H_BLOCKS=h // bh,
            num_warps=warps, num_stages=st,
        ), bn_q, stages_q)  # fmt: skip
        _fitted(lambda bn, st: _bwd_dkv_kernel[(n_t * triton.cdiv(k, bn), b)](
            q_c, i_c, do_c, ps, dkv, k, h,
            *_strides(q_c, 3), *_strides(i_c, 2), *_strides(do_c, 3), *_strides(ps, 2),
            *_strides(dkv, 2),
            DL=d_l, DR=d_r, HP=triton.next_power_of_2(h), BLOCK_N=bn, BLOCK_D=bd, PREC=prec,
            N_BLOCKS=triton.cdiv(k, bn), num_warps=warps2, num_stages=st,
        ), bn_kv, stages_kv)  # fmt: skip

    for t0 in range(0, t, tc):
        chunk(slice(t0, min(t, t0 + tc)))
    return dq, dkv.to(kv.dtype)


class _SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, indices, scale, d_v):  # noqa: ANN001
        o, lse = sparse_mla_fwd(q, kv, indices, scale, d_v)
        ctx.save_for_backward(q, kv, indices, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):  # noqa: ANN001
        q, kv, indices, o, lse = ctx.saved_tensors
        dq, dkv = sparse_mla_bwd(q, kv, indices, o, lse, do, ctx.scale)
        return dq, dkv, None, None, None


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA with autograd through q and kv: (o [B, T, H, d_v], lse [B, T, H] float32,
    no gradient). q [B, T, H, d_qk], kv [B, S, d_qk] (same dtype; d_v and d_qk - d_v powers of
    two >= 16, H a multiple of 16), indices int32 [B, T, K], -1 = unused slot."""
    return _SparseMLA.apply(q, kv, indices, float(scale), int(d_v))


def decode_splits(batch: int, heads: int, k: int, device: torch.device) -> int:
    """How many slices of its K slots one decoded token's attention is split into: enough
    programs to fill the device twice over (one query has only heads / 64 of them unsplit),
    each slice at least 64 slots."""
    if device.type != "cuda":
        return 1
    programs = batch * max(1, heads // 64)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // programs), k // 64))


def sparse_mla_decode(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    d_v: int,
    *,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA for one new token per sequence (q [B, 1, H, d_qk], indices [B, 1, K]),
    split over its slots: each of `splits` slices of the K slots runs through the forward
    kernel as a query of its own (so a small batch still fills the device), and the slices'
    normalised outputs merge by their log-sum-exps. Same contract as sparse_mla_fwd, no
    autograd (decoding)."""
    b, t, h, d = q.shape
    k = indices.shape[-1]
    if t != 1:
        raise ValueError(f"sparse_mla_decode takes one query per sequence, not {t}")
    splits = decode_splits(b, h, k, q.device) if splits is None else splits
    if splits <= 1:
        return sparse_mla_fwd(q, kv, indices, scale, d_v)
    width = -(-k // splits)
    padded = torch.full((b, 1, splits * width), -1, dtype=indices.dtype, device=indices.device)
    padded[..., :k] = indices
    o_s, lse_s = sparse_mla_fwd(
        q.expand(b, splits, h, d), kv, padded.view(b, splits, width), scale, d_v
    )  # [B, splits, H, d_v], [B, splits, H]
    lse = torch.logsumexp(lse_s, dim=1, keepdim=True)  # -inf only if every slot is unused
    weight = torch.where(lse.isfinite(), (lse_s - lse).exp(), 0.0)
    o = (o_s.float() * weight[..., None]).sum(1, keepdim=True)
    return o.to(q.dtype), lse


def head_summed_probs(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    d_v: int,
    *,
    block_h: int = 64,
    block_n: int = 64,
    num_warps: int = 8,
) -> torch.Tensor:
    """sum_h p[t, h, i] / H over the selected slots [B, T, K] float32 (0 at -1 slots), from the
    forward's lse: the main attention's distribution the indexer is trained towards. No
    gradient (it is a target)."""
    d_l, d_r = _check(q, kv, indices, d_v)
    b, t, h, _ = q.shape
    q, kv, indices, lse = q.contiguous(), _rows(kv), indices.contiguous(), lse.contiguous()
    block_h = _block_h(h, block_h)
    k = indices.shape[2]
    out = torch.empty(b, t, k, dtype=torch.float32, device=q.device)
    _fitted(lambda bn, stages: _probs_kernel[(t * triton.cdiv(k, bn), b)](
        q, kv, indices, lse, out,
        t, k, h, scale,
        *_strides(q, 3), *_strides(kv, 2), *_strides(indices, 2), *_strides(lse, 2),
        DL=d_l, DR=d_r, BLOCK_H=block_h, BLOCK_N=bn, PREC=_precision(q),
        N_BLOCKS=triton.cdiv(k, bn),
        num_warps=num_warps, num_stages=stages,
    ), block_n, 2)  # fmt: skip
    return out


def head_summed_probs_reference(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, d_v: int
) -> torch.Tensor:
    """Reference for head_summed_probs (recomputes lse itself)."""
    b, t, h, d = q.shape
    valid = indices >= 0
    rows = indices.long().clamp_min(0)
    keys = torch.gather(
        kv.float().unsqueeze(1).expand(b, t, -1, d), 2, rows[..., None].expand(-1, -1, -1, d)
    )
    scores = torch.einsum("bthd,btkd->bthk", q.float(), keys) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    return probs.sum(2) / h


def attention_flops(t: int, h: int, k: int, d_qk: int, d_v: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of sparse MLA in the convention of published kernels:
    2 t h k (d_qk + d_v) and 2 t h k (3 d_qk + 2 d_v)."""
    return 2.0 * t * h * k * (d_qk + d_v), 2.0 * t * h * k * (3 * d_qk + 2 * d_v)


__all__ = [
    "attention_flops",
    "head_summed_probs",
    "head_summed_probs_reference",
    "sparse_mla",
    "sparse_mla_bwd",
    "sparse_mla_decode",
    "sparse_mla_fwd",
    "sparse_mla_reference",
]
