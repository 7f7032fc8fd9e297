"""MLA attention with DeepSeek Sparse Attention (DSA): each query attends to the keys the
lightning indexer selected for it (policy/indexer.py).

Shapes: B batch, T new (query) tokens, S cached + new (key) tokens, H attention heads,
R = kv_lora_rank, P = qk_rope_head_dim.

Masks are boolean `allowed [B, T, S]` (True = query t may see key s): causal, padding-aware,
and always letting a query see itself so no row is empty. DSA narrows `allowed` to the
indexer's top-k; the same causal mask is applied before the top-k (so no future position can
be selected) and again on the attention scores.

Two implementations of DSA compute the same thing. "reference": the torch code here, with the
[B, T, S] mask and scores (the CPU path and the oracle). "triton": index-based end to end
(kernels/): the indexer scores a chunk of queries at a time and a deterministic top-k reduces
each chunk to int32 indices [B, T, k]; sparse MLA in absorbed mode attends to those rows only,
and the sparse indexer loss works on the same indices, so no [T, S] tensor exists. "auto" picks
triton on CUDA when the shapes suit the kernels (heads a multiple of 16; kv_lora_rank,
qk_rope_head_dim and index_head_dim powers of two >= 16), else the reference. The dense stage
(dsa=False), the dense indexer loss and sequences of at most index_topk keys (where DSA selects
every visible key, i.e. is dense attention: MHA through SDPA) run the reference; on the triton
path, the first index_topk queries of a longer fresh sequence likewise run as dense MHA
attention (`MLA._dense_head`) and the rest through the kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .indexer import Indexer, indexer_kl, select_topk, selection_mask
from .layers import RMSNorm
from .rope import apply_rope

ATTENTION_IMPLS = ("auto", "reference", "triton")


@dataclass
class AttnContext:
    """What every attention layer of one forward shares.

    cos/sin: [B, T, P/2] rope of the new tokens; key_valid: [B, S] real (non-padding) key
    slots; query_valid: [B, T] real new tokens; start: cache slot of the first new token;
    attention: "reference" or "triton" (resolved, never "auto").
    """

    cos: torch.Tensor
    sin: torch.Tensor
    key_valid: torch.Tensor
    query_valid: torch.Tensor
    start: int = 0
    attention: str = "reference"
    _allowed: torch.Tensor | None = None

    @property
    def allowed(self) -> torch.Tensor:
        """[B, T, S] visibility (see `visibility`). Built on first use: the index-based path
        never asks for it."""
        if self._allowed is None:
            self._allowed = visibility(self.start, self.query_valid.shape[1], self.key_valid)
        return self._allowed


def visibility(start: int, t: int, key_valid: torch.Tensor) -> torch.Tensor:
    """[B, t, S] bool for queries at slots start .. start + t - 1 over keys key_valid [B, S]:
    causal over slots, real keys only, and a query always sees itself (no empty rows)."""
    s, dev = key_valid.shape[1], key_valid.device
    q_slot = torch.arange(start, start + t, device=dev).view(1, t, 1)
    k_slot = torch.arange(s, device=dev).view(1, 1, s)
    return ((k_slot <= q_slot) & key_valid.unsqueeze(1)) | (k_slot == q_slot)


def triton_supported(args: ModelArgs) -> str | None:
    """None if the DSA kernels take this model's shapes, else why not."""

    def pow2(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0

    if args.num_attention_heads % 16:
        return f"num_attention_heads = {args.num_attention_heads} is not a multiple of 16"
    for name in ("kv_lora_rank", "qk_rope_head_dim", "index_head_dim"):
        if not pow2(getattr(args, name)):
            return f"{name} = {getattr(args, name)} is not a power of two >= 16"
    return None


def resolve_attention(impl: str, args: ModelArgs, device: torch.device) -> str:
    """ "auto" -> "triton" on CUDA when the shapes suit the kernels, else "reference"; an explicit
    "triton" that cannot run is an error naming why."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, not {impl!r}")
    why = triton_supported(args)
    if impl == "auto":
        return "triton" if device.type == "cuda" and why is None else "reference"
    # Off CUDA the kernels run only in Triton's interpreter (tests, on small shapes).
    off_device = device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    if impl == "triton" and (why or off_device):
        raise ValueError(f"attention 'triton' cannot run here: {why or 'the model is not on CUDA'}")
    return impl


class LayerCache:
    """One attention layer's incremental-decoding state (slots along dim 1).

    kv: [B, S_max, R + P], each slot the kv_a_layernorm'd latent c and the roped shared key,
    side by side, as absorbed MQA attention reads them (the sparse kernels take a slice of it
    without a copy); latent [B, S_max, R] and k_rope [B, S_max, P] are views of its two parts.
    index_k: [B, S_max, Di] (roped, normed indexer key).
    """

    def __init__(self, kv: torch.Tensor, kv_lora_rank: int, index_k: torch.Tensor) -> None:
        self.kv = kv
        self.latent, self.k_rope = kv[..., :kv_lora_rank], kv[..., kv_lora_rank:]
        self.index_k = index_k


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    need_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked softmax attention. q [B, H, T, d], k [B, H|1, S, d], v [B, H|1, S, dv].

    Returns (out [B, H, T, dv], probs [B, H, T, S] float32 or None). Without probs it goes
    through torch's fused SDPA; with probs it is computed explicitly (indexer training).
    """
    mask = allowed.unsqueeze(1)
    if not need_probs:
        k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.matmul(probs.to(v.dtype), v), probs


class MLA(nn.Module):
    """Multi-head Latent Attention with DSA.

    q_a_proj: D -> q_lora_rank, q_a_layernorm (its output `qr` also feeds the indexer),
    q_b_proj: q_lora_rank -> H*(nope+P); kv_a_proj_with_mqa: D -> R+P (latent c | shared
    rope key), kv_a_layernorm on c; kv_b_proj: R -> H*(nope+v) expands c into per-head k_nope
    and v; o_proj: H*v -> D. MLA RoPE is interleaved.

    Two equivalent evaluation orders: MHA mode expands k and v per head (training/prefill);
    absorbed MQA mode folds kv_b_proj's key part into the query so every head attends to the
    shared 576-dim [c | k_rope] entry, then expands the attended latent with the value part
    (decode). forward(x [B, T, D], ...) -> (out [B, T, D], indexer KL or None).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.nope, self.rope = (
            args.num_attention_heads,
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
        )
        self.v_dim, self.kv_rank = args.v_head_dim, args.kv_lora_rank
        self.scale = args.softmax_scale
        self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.q_b_proj = nn.Linear(args.q_lora_rank, self.n_heads * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.hidden_size, bias=False)
        self.indexer = Indexer(args)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttnContext,
        *,
        cache: LayerCache | None = None,
        absorb: bool = False,
        dsa: bool = True,
        indexer_loss: str | None = None,
        indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S = ctx.start + T keys; cache slots [start, start+T) are written. indices [B, T, k]
        (int, -1 = unused), if given, replace the indexer's own selection (e.g. the sampler's)."""
        if indexer_loss not in (None, "dense", "sparse"):
            raise ValueError(f"indexer_loss must be 'dense' or 'sparse', not {indexer_loss!r}")
        b, t, _ = x.shape
        cos, sin = ctx.cos, ctx.sin
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(b, t, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c = self.kv_a_layernorm(c)
        k_pe = apply_rope(k_pe, cos, sin, interleaved=True)
        # The indexer learns only from its own loss: its inputs are cut from the main graph.
        # Without an indexer loss the indexer only feeds the (non-differentiable) top-k: no
        # autograd graph, or its parameters would keep every chunk's [chunk, Hi, S] scores alive.
        indexer_grad = torch.is_grad_enabled() and indexer_loss is not None
        with torch.set_grad_enabled(indexer_grad):
            index_k = self.indexer.keys(x.detach(), cos, sin)
        if cache is not None:
            start, end = ctx.start, ctx.start + t
            cache.latent[:, start:end] = c
            cache.k_rope[:, start:end] = k_pe
            cache.index_k[:, start:end] = index_k
            c, k_pe, index_k = cache.latent[:, :end], cache.k_rope[:, :end], cache.index_k[:, :end]
            ctx_kv = cache.kv[:, :end]
        else:
            ctx_kv = None

        # Up to index_topk keys DSA selects every visible key: exactly dense attention, which
        # needs neither the indexer (unless it is being trained) nor the sparse kernels.
        prunes = indices is not None or c.shape[1] > self.indexer.index_topk
        if dsa and prunes and ctx.attention == "triton" and indexer_loss != "dense":
            return self._sparse(
                x, qr, q_nope, q_pe, c, k_pe, index_k, ctx, indexer_loss, indices, ctx_kv
            )
        allowed = ctx.allowed
        index_scores = None
        if (dsa and prunes) or indexer_loss:
            with torch.set_grad_enabled(indexer_grad):
                index_scores = self.indexer(x.detach(), qr.detach(), cos, sin, index_k)
        attend_mask = allowed
        if dsa and prunes:
            ids = indices
            if ids is None:
                ids = select_topk(
                    index_scores.masked_fill(~allowed, float("-inf")), self.indexer.index_topk
                )
            attend_mask = allowed & selection_mask(ids.long(), allowed.shape[-1])

        need_probs = indexer_loss is not None
        if absorb:
            w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
            q_lat = torch.einsum("bthd,hdr->bhtr", q_nope, w[:, : self.nope])
            qq = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)
            kk = torch.cat([c, k_pe], dim=-1).unsqueeze(1)
            o_lat, probs = _attend(qq, kk, c.unsqueeze(1), attend_mask, self.scale, need_probs)
            out = torch.einsum("bhtr,hvr->bthv", o_lat, w[:, self.nope :])
        else:
            s = c.shape[1]
            kv = self.kv_b_proj(c).view(b, s, self.n_heads, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
            qq = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
            o, probs = _attend(
                qq, k.transpose(1, 2), v.transpose(1, 2), attend_mask, self.scale, need_probs
            )
            out = o.transpose(1, 2)
        out = self.o_proj(out.reshape(b, t, self.n_heads * self.v_dim))

        kl = None
        if indexer_loss is not None:
            support = allowed if indexer_loss == "dense" else attend_mask
            kl = indexer_kl(probs, index_scores, support, ctx.query_valid.float())
        return out, kl

    def _dense_head(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        k_pe: torch.Tensor,
        key_valid: torch.Tensor,
        n: int,
    ) -> torch.Tensor:
        """Attention of a fresh sequence's first n queries to its first n keys in MHA mode, with
        AttnContext's visibility (causal, real keys, always itself): [B, n, H, v]."""
        b = c.shape[0]
        kv = self.kv_b_proj(c[:, :n]).view(b, n, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :n, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope[:, :n], q_pe[:, :n]], dim=-1)
        allowed = visibility(0, n, key_valid[:, :n])
        o, _ = _attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed, self.scale, False
        )
        return o.transpose(1, 2)

    def _sparse(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        k_pe: torch.Tensor,
        index_k: torch.Tensor,
        ctx: AttnContext,
        indexer_loss: str | None,
        indices: torch.Tensor | None,
        cached_kv: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DSA through the kernels: index-based, absorbed MQA mode, nothing of size [T, S].

        The indexer's queries and keys go to the kernels in the model's dtype (bf16 on tensor
        cores; float32 models multiply in IEEE float32, to stay comparable with the reference),
        its scores accumulate in float32. With a KV cache the kernels read its [c | k_rope] slots
        in place (cached_kv); without one, c and k_rope are concatenated once per forward."""
        from kernels.indexer_loss import sparse_indexer_kl
        from kernels.sparse_mla import head_summed_probs, sparse_mla, sparse_mla_decode
        from kernels.topk import select_indices

        b, t = x.shape[:2]
        dtype = c.dtype
        # The first index_topk queries of a fresh sequence see at most index_topk keys, all of
        # which DSA selects: for them DSA is dense causal attention, which SDPA runs in MHA mode
        # at the tensor cores' rate, where the sparse kernels would gather every visible row
        # for a few heads. Not with a cache or given indices (decoding, replay: one path for
        # all queries) nor with the indexer loss (it needs every query's selection).
        n_dense = 0
        if cached_kv is None and indices is None and indexer_loss is None and ctx.start == 0:
            n_dense = min(t, self.indexer.index_topk)
        x_s, qr_s = x[:, n_dense:].detach(), qr[:, n_dense:].detach()
        cos_s, sin_s = ctx.cos[:, n_dense:], ctx.sin[:, n_dense:]
        with torch.set_grad_enabled(torch.is_grad_enabled() and indexer_loss is not None):
            q_idx, w_idx = self.indexer.queries(x_s, qr_s, cos_s, sin_s)
        q_idx, k_idx = q_idx.to(dtype), index_k.to(dtype)
        if indices is None:
            with torch.no_grad():
                indices = select_indices(
                    q_idx, k_idx, w_idx, self.indexer.index_topk,
                    offset=ctx.start + n_dense, key_valid=ctx.key_valid,
                )  # fmt: skip
        indices = indices.to(torch.int32)
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope[:, n_dense:], w[:, : self.nope])
        q = torch.cat([q_lat, q_pe[:, n_dense:]], dim=-1)
        kv = torch.cat([c, k_pe], dim=-1) if cached_kv is None else cached_kv
        if t == 1 and not torch.is_grad_enabled():  # decoding: split over the slots
            o_lat, lse = sparse_mla_decode(q, kv, indices, self.scale, self.kv_rank)
        else:
            o_lat, lse = sparse_mla(q, kv, indices, self.scale, self.kv_rank)
        out = torch.einsum("bthr,hvr->bthv", o_lat, w[:, self.nope :])
        if n_dense:
            head = self._dense_head(q_nope, q_pe, c, k_pe, ctx.key_valid, n_dense)
            out = torch.cat([head, out], dim=1)
        out = self.o_proj(out.reshape(b, t, self.n_heads * self.v_dim))
        kl = None
        if indexer_loss == "sparse":
            # The target is the main attention's head-summed distribution on the selected set
            # (detached: the indexer learns from it, the attention does not learn from the KL).
            target = head_summed_probs(
                q.detach(), kv.detach(), indices, lse, self.scale, self.kv_rank
            )
            precision = "ieee" if dtype == torch.float32 else "tf32"
            kl = sparse_indexer_kl(
                q_idx, k_idx, w_idx, indices, target, ctx.query_valid, input_precision=precision
            )
        return out, kl
