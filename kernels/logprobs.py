"""Token log-probs under a recorded sampling mask, from hidden states and the LM head: the GEMMs on
cuBLAS and every elementwise pass over the logits in Triton kernels, with a torch reference.

    log pi(target) = z_target - logsumexp(z over the row's kept set),   z = h W^T / temperature

hidden [N, D], LM head [V, D], targets [N], kept ids [N, K] padded with -1; a row of all -1 is
untruncated (the full softmax). Optionally the entropy of each row's (truncated) distribution,
without gradient. The backward gives the gradients of hidden and of the LM head.

Blocks. The [N, V] logits never exist at once: tokens are cut into chunks of `chunk_size` rows
(by default all of them up to a bound) and the vocabulary into chunks of `vocab_chunk` columns,
so that one [rows, cols] block stays near DEFAULT_BLOCK_BYTES (256 MiB: 4,096 tokens x ~32K
vocab in bf16). Cutting the vocabulary rather than the tokens keeps each weight-gradient GEMM
dz^T h the shape of the unchunked one (contraction over all tokens), written once into its
rows of the gradient instead of read-modified-written once per token chunk (1.85 GB for
DeepSeek-V3.2's head each time); the hidden gradient [N, D], which is small, is what
accumulates over the vocabulary chunks (addmm in the hidden dtype).

Forward, per block: one matmul in the model dtype (the logits are rounded to it, as the sampler's
LM head rounds them), then one kernel, one program per row, that folds the block into the row's
running online logsumexp (and the running sum for the entropy), picks up the target logit and
the logits at the kept ids that fall in the block, and after the last block writes log pi, the
normaliser logZ and the kept probabilities. Truncated rows skip the dense scan: their normaliser
is over their K kept logits only.

Backward, per block: the logits are recomputed with one matmul, except the forward's last block,
which is kept (its buffer is the one the forward already held, so the peak is still one block)
and consumed first; one kernel overwrites the block in place with dz = (onehot(target) - p) g /
temperature in the model dtype (p = exp(z - logZ) for untruncated rows, zero for truncated
ones), a second small kernel writes the truncated rows' K entries from the saved kept
probabilities, then dh (+)= dz @ W[cols] and dW[cols] = dz^T @ h. That is 3 + (blocks - 1) /
blocks GEMMs of the bare [N, D] x [D, V] size against the 3 of the unchunked forward+backward,
so fwd+bwd costs at least ~1.25x the bare GEMMs at 4 vocabulary chunks (fewer chunks, a larger
block budget, bring it down) and the forward ~1x.

`masked_logprobs_reference` is the plain torch version with the full logits. Under
TRITON_INTERPRET=1 the same code runs on CPU tensors (small float32/float64 shapes, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kept import check_kept_ids, masked_logprobs_reference  # noqa: F401 (public here)

# One [rows, cols] logits block, in bytes of the model dtype.
DEFAULT_BLOCK_BYTES = 256 << 20
# Default token chunks stay small enough that a block still spans this many vocabulary columns
# (narrower blocks would make the per-block GEMMs inefficient).
MIN_VOCAB_CHUNK = 8192


@triton.jit
def _forward_kernel(
    z_ptr,
    stride_z,
    v0,
    n_cols,
    targets_ptr,
    kept_ptr,
    stride_kept,
    K,
    temp_ptr,
    m_ptr,
    s_ptr,
    u_ptr,
    zt_ptr,
    zk_ptr,
    logp_ptr,
    logz_ptr,
    ent_ptr,
    pk_ptr,
    HAS_KEPT: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    FIRST: tl.constexpr,
    FINAL: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    # One row of a [rows, n_cols] logits block holding vocabulary ids v0 .. v0 + n_cols - 1.
    # Running state between blocks: m (max), s = sum exp(z - m), u = sum exp(z - m) (z - m),
    # the target logit zt and the kept logits zk [K]; FIRST/FINAL: the row's first/last block.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    temperature = tl.load(temp_ptr)

    target = tl.load(targets_ptr + row)
    t_here = (target >= v0) & (target < v0 + n_cols)
    z_t = tl.load(z_row + tl.where(t_here, target - v0, 0), mask=t_here, other=0.0)
    z_t = z_t.to(ACC) / temperature
    if not FIRST:
        z_t = tl.where(t_here, z_t, tl.load(zt_ptr + row))

    n_dense = n_cols
    if HAS_KEPT:
        offs_k = tl.arange(0, K_PAD)
        in_k = offs_k < K
        kept = tl.load(kept_ptr + row * stride_kept + offs_k, mask=in_k, other=-1)
        on = kept >= 0
        truncated = tl.max(kept, 0) >= 0
        # A truncated row's normaliser is over its kept ids alone: no dense scan at all.
        n_dense = tl.where(truncated, 0, n_cols)
        k_here = on & (kept >= v0) & (kept < v0 + n_cols)
        z_k = tl.load(z_row + tl.where(k_here, kept - v0, 0), mask=k_here, other=0.0)
        z_k = z_k.to(ACC) / temperature
        if not FIRST:
            z_k = tl.where(k_here, z_k, tl.load(zk_ptr + row * K + offs_k, mask=in_k, other=0.0))

    if FIRST:
        m = tl.full([], float("-inf"), ACC)
        s = tl.full([], 0.0, ACC)
        u = tl.full([], 0.0, ACC)
    else:
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        u = tl.full([], 0.0, ACC)
        if WANT_ENTROPY:
            u = tl.load(u_ptr + row)
    offs_v = tl.arange(0, BLOCK_V)
    for start in range(0, n_dense, BLOCK_V):
        cols = start + offs_v
        in_v = cols < n_cols
        z = tl.load(z_row + cols, mask=in_v, other=float("-inf")).to(ACC) / temperature
        m_new = tl.maximum(m, tl.max(z, 0))  # finite: every tile holds a column
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if WANT_ENTROPY:
            # u rescales as sum exp(z - m')(z - m') = alpha (u + s (m - m')); while s is 0,
            # m is -inf and s (m - m') would be 0 * inf.
            shift = tl.where(s > 0, m - m_new, 0.0)
            u = alpha * (u + s * shift) + tl.sum(e * tl.where(in_v, z - m_new, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new

    if FINAL:
        s_safe = tl.where(s > 0, s, 1.0)  # truncated rows scanned nothing; replaced below
        log_s = tl.log(s_safe)
        logz = m + log_s
        ent = log_s - u / s_safe
        if HAS_KEPT:
            zk_on = tl.where(on, z_k, float("-inf"))
            m_k = tl.where(truncated, tl.max(zk_on, 0), 0.0)
            e_k = tl.where(on, tl.exp(zk_on - m_k), 0.0)
            s_k = tl.where(truncated, tl.sum(e_k, 0), 1.0)
            log_sk = tl.log(s_k)
            logz = tl.where(truncated, m_k + log_sk, logz)
            mean_k = tl.sum(e_k * tl.where(on, zk_on - m_k, 0.0), 0) / s_k
            ent = tl.where(truncated, log_sk - mean_k, ent)
            # The backward's truncated entries; 0 for untruncated rows (e_k is 0 there).
            tl.store(pk_ptr + row * K + offs_k, e_k / s_k, mask=in_k)
        tl.store(logp_ptr + row, z_t - logz)
        tl.store(logz_ptr + row, logz)
        if WANT_ENTROPY:
            tl.store(ent_ptr + row, ent)
    else:
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        if WANT_ENTROPY:
            tl.store(u_ptr + row, u)
        tl.store(zt_ptr + row, z_t)
        if HAS_KEPT:
            tl.store(zk_ptr + row * K + offs_k, z_k, mask=k_here)


@triton.jit
def _backward_dense_kernel(
    z_ptr,
    stride_z,
    v0,
    n_cols,
    targets_ptr,
    kept_ptr,
    stride_kept,
    K,
    temp_ptr,
    grad_ptr,
    logz_ptr,
    HAS_KEPT: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    # Overwrites one [BLOCK_V] tile of a row's logits with dz = (onehot - p) g / T; truncated
    # rows get zeros here (their kept entries are written by _backward_kept_kernel afterwards).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = cols < n_cols
    n_dense = n_cols
    if HAS_KEPT:
        offs_k = tl.arange(0, K_PAD)
        kept = tl.load(kept_ptr + row * stride_kept + offs_k, mask=offs_k < K, other=-1)
        n_dense = tl.where(tl.max(kept, 0) < 0, n_cols, 0)
    dense = cols < n_dense  # (not in_v & scalar: the interpreter mistypes that broadcast)
    temperature = tl.load(temp_ptr)
    g = tl.load(grad_ptr + row).to(ACC) / temperature
    logz = tl.load(logz_ptr + row)
    target = tl.load(targets_ptr + row) - v0
    z_row = z_ptr + row * stride_z
    z = tl.load(z_row + cols, mask=dense, other=0.0).to(ACC) / temperature
    dz = tl.where(cols == target, g, 0.0) - tl.exp(z - logz) * g
    dz = tl.where(dense, dz, 0.0)
    tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=in_v)


@triton.jit
def _backward_kept_kernel(
    z_ptr,
    stride_z,
    v0,
    n_cols,
    targets_ptr,
    kept_ptr,
    stride_kept,
    K,
    temp_ptr,
    grad_ptr,
    pk_ptr,
    K_PAD: tl.constexpr,
    ACC: tl.constexpr,
):
    # A truncated row's dz at its kept ids in this block: (onehot - p_kept) g / T. Untruncated
    # rows hold only -1 ids, which no block contains.
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    in_k = offs_k < K
    kept = tl.load(kept_ptr + row * stride_kept + offs_k, mask=in_k, other=-1)
    here = (kept >= v0) & (kept < v0 + n_cols)
    temperature = tl.load(temp_ptr)
    g = tl.load(grad_ptr + row).to(ACC) / temperature
    target = tl.load(targets_ptr + row)
    p = tl.load(pk_ptr + row * K + offs_k, mask=in_k, other=0.0)
    dz = tl.where(kept == target, g, 0.0) - p * g
    z_row = z_ptr + row * stride_z
    tl.store(z_row + tl.where(here, kept - v0, 0), dz.to(z_ptr.dtype.element_ty), mask=here)


def _spans(total: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, total)) for i in range(0, total, size)]


def _plan(
    n: int, v: int, elem: int, chunk_size: int | None, vocab_chunk: int | None, budget: int
) -> tuple[int, int]:
    """Rows and columns of one logits block: given sizes are kept as they are, defaults are
    balanced (equal chunks) and bounded by `budget` bytes."""
    rows = chunk_size
    if rows is None:
        cap = max(1, budget // (MIN_VOCAB_CHUNK * elem))
        rows = triton.cdiv(n, triton.cdiv(n, cap)) if n else 1
    cols = vocab_chunk
    if cols is None:
        cap = max(128, budget // (rows * elem) // 128 * 128)
        # Equal chunks, each a multiple of 128 columns (GEMM tiles, aligned rows).
        cols = min(v, triton.cdiv(triton.cdiv(v, triton.cdiv(v, cap)), 128) * 128)
    return max(1, rows), max(1, cols)


class _MaskedLogProbsTriton(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: ANN001
        ctx,
        hidden,
        weight,
        targets,
        kept,
        temperature,
        rows,
        cols,
        want_entropy,
        keep_block,
        block_v,
        num_warps,
    ):
        n, v = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        dev = hidden.device
        k = 0 if kept is None else kept.shape[1]
        logp = torch.empty(n, dtype=acc, device=dev)
        logz = torch.empty(n, dtype=acc, device=dev)
        entropy = torch.zeros(n, dtype=acc, device=dev)
        pk = torch.zeros(n, k, dtype=acc, device=dev)
        temp = torch.tensor([temperature], dtype=acc, device=dev)
        # Running per-row state between the vocabulary blocks of a token chunk.
        state = torch.empty(4, min(rows, n), dtype=acc, device=dev)  # m, s, u, z_target
        zk = torch.empty(min(rows, n), k, dtype=acc, device=dev) if k else state[0]
        flat = torch.empty(min(rows, n) * min(cols, v), dtype=hidden.dtype, device=dev)
        kept_arg = targets if kept is None else kept
        vspans = _spans(v, cols)
        last = None
        for r0, r1 in _spans(n, rows):
            h = hidden[r0:r1]
            for v0, v1 in vspans:
                z = flat[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
                torch.mm(h, weight[v0:v1].t(), out=z)
                _forward_kernel[(r1 - r0,)](
                    z,
                    z.stride(0),
                    v0,
                    v1 - v0,
                    targets[r0:r1],
                    kept_arg[r0:r1],
                    kept_arg.stride(0) if kept is not None else 0,
                    k,
                    temp,
                    state[0],
                    state[1],
                    state[2],
                    state[3],
                    zk,
                    logp[r0:r1],
                    logz[r0:r1],
                    entropy[r0:r1],
                    pk[r0:r1] if k else logp,
                    HAS_KEPT=k > 0,
                    WANT_ENTROPY=want_entropy,
                    FIRST=v0 == 0,
                    FINAL=v1 == v,
                    K_PAD=triton.next_power_of_2(max(k, 1)),
                    BLOCK_V=block_v,
                    ACC=tl.float64 if acc == torch.float64 else tl.float32,
                    num_warps=num_warps,
                )
                last = (r0, v0, z)
        ctx.save_for_backward(hidden, weight, targets, kept, logz, pk)
        ctx.temperature, ctx.rows, ctx.cols = temperature, rows, cols
        ctx.block_v, ctx.num_warps = block_v, num_warps
        # The last block's logits serve the backward as they are (one GEMM fewer), in the
        # buffer it will reuse for the other blocks anyway. A plain attribute, not a saved
        # tensor: the backward overwrites it in place and drops it, so a second backward
        # (retain_graph) recomputes that block too.
        ctx.block = (last, flat) if keep_block and last is not None else None
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):  # noqa: ANN001
        hidden, weight, targets, kept, logz, pk = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_h or want_w):
            return (None,) * 11
        n, v = hidden.shape[0], weight.shape[0]
        k = 0 if kept is None else kept.shape[1]
        acc = logz.dtype
        dev = hidden.device
        rows, cols = ctx.rows, ctx.cols
        grad = grad_logp.contiguous()  # .sum()'s gradient arrives expanded (stride 0)
        temp = torch.tensor([ctx.temperature], dtype=acc, device=dev)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if want_h else None
        # Each vocabulary slice of the weight gradient is written by the first token chunk and
        # accumulated by the others in the weight's dtype (addmm sums each product in float32
        # and rounds once per chunk; a float32 accumulator would be twice a bf16 head's size).
        grad_w = None
        if want_w:
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
            if n == 0:
                grad_w.zero_()
        saved, flat = ctx.block if ctx.block is not None else (None, None)
        ctx.block = None
        if flat is None:
            flat = torch.empty(min(rows, n) * min(cols, v), dtype=weight.dtype, device=dev)
        kept_arg = targets if kept is None else kept
        k_pad = triton.next_power_of_2(max(k, 1))
        acc_tl = tl.float64 if acc == torch.float64 else tl.float32
        # Reverse order: the forward's last block comes first, before its buffer is reused.
        tspans = _spans(n, rows)[::-1]
        vspans = _spans(v, cols)[::-1]
        for ti, (r0, r1) in enumerate(tspans):
            h = hidden[r0:r1]
            for vi, (v0, v1) in enumerate(vspans):
                if saved is not None and saved[:2] == (r0, v0):
                    z = saved[2]
                else:
                    z = flat[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
                    torch.mm(h, weight[v0:v1].t(), out=z)
                args = (z, z.stride(0), v0, v1 - v0, targets[r0:r1], kept_arg[r0:r1])
                args += (kept_arg.stride(0) if kept is not None else 0, k, temp, grad[r0:r1])
                grid = (r1 - r0, triton.cdiv(v1 - v0, ctx.block_v))
                _backward_dense_kernel[grid](
                    *args,
                    logz[r0:r1],
                    HAS_KEPT=k > 0,
                    K_PAD=k_pad,
                    BLOCK_V=ctx.block_v,
                    ACC=acc_tl,
                    num_warps=ctx.num_warps,
                )
                if k:
                    _backward_kept_kernel[(r1 - r0,)](
                        *args, pk[r0:r1], K_PAD=k_pad, ACC=acc_tl, num_warps=1
                    )
                # z now holds dz in the model dtype, as autograd's F.linear backward uses.
                if want_h:
                    if vi == 0:
                        torch.mm(z, weight[v0:v1], out=grad_h[r0:r1])
                    else:
                        grad_h[r0:r1].addmm_(z, weight[v0:v1])
                if want_w:
                    if ti == 0:
                        torch.mm(z.t(), h, out=grad_w[v0:v1])
                    else:
                        grad_w[v0:v1].addmm_(z.t(), h)
            saved = None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def masked_logprobs_triton(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    kept_ids: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    vocab_chunk: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    block_v: int = 4096,
    num_warps: int = 8,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(targets) [N] (float32, float64 for float64 inputs) from hidden [N, D] and the
    LM head [V, D], both in one dtype (bf16, fp16, fp32 or fp64).

    kept_ids [N, K] (-1 padded) restricts and renormalises each row to its kept set; None
    uses the full softmax everywhere. With return_entropy, also the entropy [N] of each row's
    (truncated) distribution, without gradient.

    Blocks: chunk_size tokens (default: all, up to a bound) by vocab_chunk vocabulary ids
    (default: what keeps a block within block_bytes; a larger budget means fewer blocks to
    recompute in the backward). block_v, num_warps: the kernels' tile width and warps.
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"shapes hidden {tuple(hidden.shape)}, lm_head_weight {tuple(lm_head_weight.shape)}"
        )
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"dtypes differ: hidden {hidden.dtype}, weight {lm_head_weight.dtype}")
    n, v = hidden.shape[0], lm_head_weight.shape[0]
    targets = targets.long().contiguous()
    if targets.shape != (n,):
        raise ValueError(f"targets {tuple(targets.shape)} for {n} tokens")
    if kept_ids is not None:
        kept_ids = kept_ids.long().contiguous()
        if kept_ids.dim() != 2 or kept_ids.shape[0] != n:
            raise ValueError(f"kept_ids {tuple(kept_ids.shape)} for {n} tokens")
        if kept_ids.shape[1] == 0:
            kept_ids = None  # no kept ids at all: every row untruncated
    check_kept_ids(targets, kept_ids, v)
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v {block_v} must be a power of two >= 16")
    rows, cols = _plan(n, v, hidden.element_size(), chunk_size, vocab_chunk, block_bytes)
    keep_block = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    logp, entropy = _MaskedLogProbsTriton.apply(
        hidden,
        lm_head_weight,
        targets,
        kept_ids,
        float(temperature),
        rows,
        cols,
        return_entropy,
        keep_block,
        block_v,
        num_warps,
    )
    return (logp, entropy) if return_entropy else logp
