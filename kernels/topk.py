"""Deterministic top-k token selection of DeepSeek Sparse Attention, as a Triton kernel and its
reference.

`topk_indices(scores, k)` selects, per row of scores [B, T, S] (float32, -inf where a key is
not allowed), exactly the set `policy.indexer.select_topk` selects: the k highest scores, ties
going to the earlier position (ReLU'd index scores tie at exactly 0.0 very often, and replay
and incremental decoding need the same selection however many masked keys follow), -inf never
selected. Output: int32 [B, T, min(k, S)], the selected positions in ascending order followed
by -1 in the slots left over when fewer than k keys are allowed. The order is part of the
contract (`topk_indices_reference` sorts the reference the same way): the sparse attention
does not depend on it, and ascending positions make its gathers walk memory forwards.

`select_indices(q, k, w, topk)` is the whole DSA selection (lightning-indexer scores, causal
and key-padding masks, top-k) without ever holding the [T, S] score matrix: it scores a chunk
of queries at a time with kernels/indexer.py and reduces each chunk to its indices at once.

The kernel is a radix select, one program per row, looping over the row in blocks so a row of
128K keys never sits in registers:
  * each score maps to an order-preserving uint32 key (sign bit flipped for positives, all bits
    flipped for negatives), after -0.0 is canonicalised to +0.0: the reference's sort treats
    them as ties, and two bit patterns would split them. -inf maps below every finite score;
    -inf scores are simply left out of the selection (they are never selected, and leaving
    them out changes nothing about which finite scores are the k highest).
  * up to 4 histogram passes of 8-bit digits, most significant first, each counting only the
    keys that match the digits found so far, find the k-th largest key (the threshold) and
    how many keys equal to it are needed (the rest of k after every larger key). A pass is
    skipped once the threshold's bin holds exactly the keys still needed, and all passes are
    skipped when the row has at most k allowed keys (all are selected).
  * one pass writes every position whose key is above the threshold and the earliest
    positions equal to it, in ascending order: an exclusive cumsum within the block gives
    each selected position its slot, a running count carries across blocks. Then -1 padding.
So a row is read at most 5 times and nothing but the output is written. When the scores are
causal (`causal_offset`), positions past the diagonal are never read at all. Parallelism is
one program per row: a prefill chunk has thousands of rows, but a decode step with a handful
of rows leaves most of the device idle (splitting rows across programs would serve it better).
Under TRITON_INTERPRET=1 the same code runs on CPU tensors (small shapes, for tests). Scores
must not be NaN (the indexer never produces one from finite inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.indexer import indexer_scores, indexer_scores_reference, quantize_fp8

# select_indices' default bound on one query chunk's float32 scores [B, chunk, S]: about 1 GiB
# on CUDA (the indexer writes them, top-k reads them up to 5 times), small on the CPU where
# the interpreter runs.
_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 22}


def topk_indices_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k by a stable sort (ties to the earlier position, -inf never selected; what the
    policy's `select_topk` does) in topk_indices' layout: int32 [B, T, min(k, S)], positions
    ascending, -1 at the end."""
    k = min(k, scores.shape[-1])
    vals, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    ids = ids[..., :k].masked_fill(vals[..., :k] == float("-inf"), -1)
    big = torch.iinfo(ids.dtype).max
    ids = ids.masked_fill(ids < 0, big).sort(dim=-1).values  # -1 sorts last as a huge id
    return ids.masked_fill(ids == big, -1).to(torch.int32)


@triton.jit
def _load_keys(row_ptr, valid_row, offs, limit, own, HAS_VALID: tl.constexpr):
    """Order-preserving uint32 keys of the scores at offs, and which of them take part: inside
    the row (offs < limit), not -inf and, with key_valid, a real key or the query's own slot."""
    inside = offs < limit
    x = tl.load(row_ptr + offs, mask=inside, other=float("-inf"))
    part = inside & (x != float("-inf"))
    if HAS_VALID:
        real = tl.load(valid_row + offs, mask=inside, other=0)
        part = part & ((real != 0) | (offs == own))
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == 0.0: both become +0.0, one key, ties kept
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return key, part


@triton.jit
def _topk_kernel(
    scores_ptr,
    valid_ptr,
    out_ptr,
    S,
    K,
    causal_offset,
    stride_sb,
    stride_st,
    stride_vb,
    stride_ob,
    stride_ot,
    CAUSAL: tl.constexpr,
    HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, b = tl.program_id(0), tl.program_id(1)
    # int64 row bases: B * T * S exceeds 2**31 elements at long contexts.
    row_ptr = scores_ptr + b.to(tl.int64) * stride_sb + t.to(tl.int64) * stride_st
    out_row = out_ptr + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot
    valid_row = valid_ptr + b.to(tl.int64) * stride_vb
    own = t + causal_offset  # the query's own key slot: visible even when key_valid is False
    limit = S
    if CAUSAL:  # keys after the query are -inf: do not even read them
        limit = tl.minimum(S, own + 1)
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)

    # Radix passes. The threshold is known down to the bits in `mask` (their value: `prefix`);
    # `need` counts the keys still to take among those matching it.
    prefix = tl.zeros((), tl.uint32)
    mask = tl.zeros((), tl.uint32)
    need = K
    done = K <= 0
    for p in tl.static_range(4):
        shift = 24 - 8 * p  # constexpr: the loop is unrolled
        hist = tl.zeros((256,), tl.int32)
        left_out = 0
        for start in range(0, tl.where(done, 0, limit), BLOCK):
            offs = start + lanes
            key, part = _load_keys(row_ptr, valid_row, offs, limit, own, HAS_VALID)
            part = part & ((key & mask) == prefix)
            # Keys not taking part go to bin 0 and are taken back out below (histogram's own
            # mask argument is missing from older Triton releases).
            digits = tl.where(part, (key >> shift) & 0xFF, 0).to(tl.int32)
            hist += tl.histogram(digits, 256)
            left_out += tl.sum(tl.where(part, 0, 1))
        hist -= tl.where(bins == 0, left_out, 0)
        total = tl.sum(hist)
        if p == 0:
            # At most K allowed keys: all of them are selected (mask = 0 matches every key).
            need = tl.minimum(need, total)
            done = done | (total <= K)
        at_least = total - tl.cumsum(hist, 0) + hist  # keys whose digit is >= each bin
        digit = tl.sum((at_least >= need).to(tl.int32)) - 1  # the threshold's digit
        above = tl.sum(tl.where(bins > digit, hist, 0))
        in_bin = tl.sum(tl.where(bins == digit, hist, 0))
        prefix = tl.where(done, prefix, prefix | (digit.to(tl.uint32) << shift))
        mask = tl.where(done, mask, mask | (0xFF << shift))
        need = tl.where(done, need, need - above)
        # Every key left in the threshold's bin is needed: lower digits cannot change the set.
        done = done | (in_bin == need)

    # Selection: keys above the threshold, and the earliest `need` keys equal to it.
    written = 0
    equal_seen = 0
    for start in range(0, limit, BLOCK):
        offs = start + lanes
        key, part = _load_keys(row_ptr, valid_row, offs, limit, own, HAS_VALID)
        high = key & mask
        equal = (part & (high == prefix)).to(tl.int32)
        rank = equal_seen + tl.cumsum(equal, 0) - equal  # among equal keys, in position order
        sel = ((part & (high > prefix)) | ((equal != 0) & (rank < need))).to(tl.int32)
        slot = written + tl.cumsum(sel, 0) - sel
        tl.store(out_row + slot, offs, mask=sel != 0)
        written += tl.sum(sel)
        equal_seen += tl.sum(equal)
    for start in range(written, K, BLOCK):
        offs = start + lanes
        tl.store(out_row + offs, tl.full((BLOCK,), -1, tl.int32), mask=offs < K)


def _launch(
    scores: torch.Tensor,
    out: torch.Tensor,
    causal_offset: int | None,
    key_valid: torch.Tensor | None,
    block: int,
    num_warps: int,
) -> None:
    """Top-k of scores [B, T, S] into out [B, T, K] (K = out's last dim, <= S)."""
    b, t, s = scores.shape
    if scores.stride(2) != 1:
        scores = scores.contiguous()
    valid = out if key_valid is None else key_valid  # a dummy pointer when there is none
    _topk_kernel[(t, b)](
        scores,
        valid,
        out,
        s,
        out.shape[2],
        0 if causal_offset is None else causal_offset,
        scores.stride(0),
        scores.stride(1),
        0 if key_valid is None else key_valid.stride(0),
        out.stride(0),
        out.stride(1),
        CAUSAL=causal_offset is not None,
        HAS_VALID=key_valid is not None,
        BLOCK=block,
        num_warps=num_warps,
    )


def topk_indices(
    scores: torch.Tensor,
    k: int,
    *,
    causal_offset: int | None = None,
    block: int = 2048,
    num_warps: int = 8,
) -> torch.Tensor:
    """The kernel's selection: int32 [B, T, min(k, S)] of scores [B, T, S] float32, the same
    set as select_topk, positions ascending, -1 padding at the end (see the module docstring).

    causal_offset: when given, scores[b, t, s] with s > t + causal_offset are taken as -inf
    without being read (they must be -inf, as indexer scores are), halving the reads of a
    causal prefill. block must be a power of two >= 256."""
    if scores.dim() != 3 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 [B, T, S], got {scores.dtype} {scores.shape}")
    if k < 0 or block < 256 or block & (block - 1):
        raise ValueError(f"k = {k} must be >= 0, block = {block} a power of two >= 256")
    b, t, s = scores.shape
    out = torch.empty(b, t, min(k, s), dtype=torch.int32, device=scores.device)
    if out.numel():
        _launch(scores, out, causal_offset, None, block, num_warps)
    return out


def _default_chunk(b: int, s: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * b * max(1, s)))


def select_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    *,
    offset: int = 0,
    key_valid: torch.Tensor | None = None,
    query_chunk: int | None = None,
    fp8: bool = False,
    block: int = 2048,
    num_warps: int = 8,
) -> torch.Tensor:
    """DSA's selection for queries q [B, T, H, D] (weights w [B, T, H]) over keys k [B, S, D]:
    int32 [B, T, min(topk, S)], as topk_indices. fp8: score in FP8 (kernels.indexer's
    quantize_fp8 of q and k, the deployed format) instead of q's dtype.

    Query t sits at key slot t + offset (offset: keys before the queries, e.g. a KV cache) and
    sees the keys s <= t + offset that are real (key_valid [B, S] bool; None: all real), and
    always its own slot, as in policy/model.py. Scores are computed query_chunk queries at a
    time (default: about 1 GiB of float32 scores on CUDA), each chunk only against the keys it
    can see, and reduced at once, so [T, S] never exists."""
    b, t, _, d = q.shape
    s = k.shape[1]
    if k.shape != (b, s, d) or w.shape != q.shape[:3]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}")
    if key_valid is not None:
        if key_valid.shape != (b, s):
            raise ValueError(f"key_valid has shape {tuple(key_valid.shape)}, expected {(b, s)}")
        key_valid = key_valid.to(device=q.device, dtype=torch.uint8).contiguous()
    if topk < 0:
        raise ValueError(f"topk = {topk} must be >= 0")
    if query_chunk is None:
        query_chunk = _default_chunk(b, s, q.device)
    out = torch.empty(b, t, min(topk, s), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    q_scale = k_scale = None
    if fp8:  # quantised once; each chunk reads its rows and scales
        (q, q_scale), (k, k_scale) = quantize_fp8(q), quantize_fp8(k)
    for c0 in range(0, t, query_chunk):
        c1 = min(t, c0 + query_chunk)
        seen = max(1, min(s, c1 + offset))  # keys after the chunk's last query: invisible
        scales = {}
        if fp8:
            scales = {"q_scale": q_scale[:, c0:c1], "k_scale": k_scale[:, :seen]}
        scores = indexer_scores(q[:, c0:c1], k[:, :seen], w[:, c0:c1], offset + c0, **scales)
        valid = None if key_valid is None else key_valid[:, :seen]
        _launch(scores, out[:, c0:c1], offset + c0, valid, block, num_warps)
    return out


def select_indices_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    *,
    offset: int = 0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """select_indices by the torch references: indexer_scores_reference, masked with
    policy/model.py's visibility (causal, real keys, and the query's own slot), then
    select_topk, in topk_indices' layout. Holds [T, H, S]: small shapes only."""
    scores = indexer_scores_reference(q, k, w, offset)
    if key_valid is not None:
        t_slot = torch.arange(q.shape[1], device=q.device)[:, None] + offset
        s_slot = torch.arange(k.shape[1], device=q.device)[None, :]
        hidden = ~key_valid.to(device=q.device, dtype=torch.bool)[:, None, :] & (s_slot != t_slot)
        scores = scores.masked_fill(hidden, float("-inf"))
    return topk_indices_reference(scores, topk)
