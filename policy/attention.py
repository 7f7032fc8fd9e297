"""MLA attention with DeepSeek Sparse Attention (DSA): each query attends to the keys the
lightning indexer selected for it (policy/indexer.py).

Shapes: B batch, T new (query) tokens, S cached + new (key) tokens, H attention heads,
R = kv_lora_rank, P = qk_rope_head_dim.

Masks are boolean `allowed [B, T, S]` (True = query t may see key s): causal, padding-aware,
and always letting a query see itself so no row is empty. DSA narrows `allowed` to the
indexer's top-k; the same causal mask is applied before the top-k (so no future position can
be selected) and again on the attention scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .indexer import Indexer, indexer_kl, select_topk, selection_mask
from .layers import RMSNorm
from .rope import apply_rope


@dataclass
class AttnContext:
    """What every attention layer of one forward shares.

    cos/sin: [B, T, P/2] rope of the new tokens; allowed: [B, T, S] visibility; query_valid:
    [B, T] real (non-padding) new tokens; start: cache slot of the first new token.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    allowed: torch.Tensor
    query_valid: torch.Tensor
    start: int = 0


@dataclass
class LayerCache:
    """One attention layer's incremental-decoding state (slots along dim 1).

    latent: [B, S_max, R] (kv_a_layernorm'd c), k_rope: [B, S_max, P] (roped shared key),
    index_k: [B, S_max, Di] (roped, normed indexer key).
    """

    latent: torch.Tensor
    k_rope: torch.Tensor
    index_k: torch.Tensor


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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ctx.allowed: [B, T, S], S = ctx.start + T; cache slots [start, start+T) are written."""
        b, t, _ = x.shape
        cos, sin, allowed = ctx.cos, ctx.sin, ctx.allowed
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(b, t, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c = self.kv_a_layernorm(c)
        k_pe = apply_rope(k_pe, cos, sin, interleaved=True)
        # The indexer learns only from its own loss: its inputs are cut from the main graph.
        index_k = self.indexer.keys(x.detach(), cos, sin)
        if cache is not None:
            start, end = ctx.start, ctx.start + t
            cache.latent[:, start:end] = c
            cache.k_rope[:, start:end] = k_pe
            cache.index_k[:, start:end] = index_k
            c, k_pe, index_k = cache.latent[:, :end], cache.k_rope[:, :end], cache.index_k[:, :end]

        index_scores = None
        if dsa or indexer_loss:
            index_scores = self.indexer(x.detach(), qr.detach(), cos, sin, index_k)
        attend_mask = allowed
        if dsa:
            ids = select_topk(
                index_scores.masked_fill(~allowed, float("-inf")), self.indexer.index_topk
            )
            attend_mask = allowed & selection_mask(ids, allowed.shape[-1])

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
            if indexer_loss not in ("dense", "sparse"):
                raise ValueError(f"indexer_loss must be 'dense' or 'sparse', not {indexer_loss!r}")
            support = allowed if indexer_loss == "dense" else attend_mask
            kl = indexer_kl(probs, index_scores, support, ctx.query_valid.float())
        return out, kl
