"""The lightning indexer and top-k token selection of DeepSeek Sparse Attention (DSA).

For every query t the indexer scores every visible key s, I[t, s] = sum_j w[t, j] *
ReLU(q[t, j] . k[s]), cheaply (few heads, one shared key per token, float32), and the
attention of policy/attention.py then reads only the index_topk keys with the highest scores.
`indexer_kl` is the indexer's training signal: KL from the main attention's distribution.

Shapes: B batch, T new (query) tokens, S cached + new (key) tokens, H attention heads,
P = qk_rope_head_dim, Hi/Di = indexer heads / head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .rope import apply_rope

# Bound on the [chunk, Hi, S] intermediate of the reference indexer (elements).
_INDEXER_CHUNK_ELEMS = 1 << 26


def select_topk(index_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k key positions per query. index_scores: [B, T, S], already -inf where not allowed.

    Returns ids [B, T, min(k, S)] (int64), with -1 in slots whose score is -inf, so a query
    with fewer than k visible keys selects all of them and nothing else. Ties (common: ReLU
    makes exact-zero scores) go to the earlier position, via a stable sort, so the selection
    does not depend on how many (masked) keys follow: incremental decoding selects exactly
    what a full forward selects.
    """
    k = min(k, index_scores.shape[-1])
    vals, ids = torch.sort(index_scores, dim=-1, descending=True, stable=True)
    vals, ids = vals[..., :k], ids[..., :k]
    return ids.masked_fill(vals == float("-inf"), -1)


def selection_mask(ids: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean [B, T, S] with True at the selected ids [B, T, k] (-1 entries ignored)."""
    out = torch.zeros(*ids.shape[:-1], num_keys + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(-1, ids.masked_fill(ids < 0, num_keys), True)
    return out[..., :num_keys]


class Indexer(nn.Module):
    """The lightning indexer: I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]).

    wq_b: q_lora_rank -> Hi*Di (reads MLA's compressed query qr); wk: D -> Di (one key per
    token, shared by every indexer head); k_norm: LayerNorm(Di) with bias; weights_proj:
    D -> Hi, scaled by Hi^-0.5 * Di^-0.5. RoPE covers the first P dims of q and k, half-split
    (not interleaved) unless `indexer_rope_interleave`. Scores are float32. The deployed
    FP8 path adds a Hadamard rotation, which is orthonormal and leaves q.k unchanged; the
    bf16/fp32 reference here omits it.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.rope_dim, self.index_topk = args.qk_rope_head_dim, args.index_topk
        self.interleaved = args.indexer_rope_interleave
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.scale = (self.n_heads**-0.5) * (self.head_dim**-0.5)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pe, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(pe, cos, sin, interleaved=self.interleaved), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Indexer keys [B, T, Di] for hidden states x [B, T, D]."""
        k = F.layer_norm(
            self.wk(x).float(),
            (self.head_dim,),
            self.k_norm.weight.float(),
            self.k_norm.bias.float(),
            self.k_norm.eps,
        )
        return self._rope(k, cos, sin)

    def queries(
        self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer's roped queries q [B, T, Hi, Di] and head weights w [B, T, Hi] (scale
        folded in), float32."""
        b, t, _ = x.shape
        q = self._rope(self.wq_b(qr).float().view(b, t, self.n_heads, self.head_dim), cos, sin)
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.scale
        return q, w

    def forward(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """Index scores [B, T, S] (float32, unmasked) of queries x, qr [B, T, *] against
        keys [B, S, Di]."""
        b = x.shape[0]
        q, w = self.queries(x, qr, cos, sin)
        t = q.shape[1]
        keys = keys.float()
        step = max(1, _INDEXER_CHUNK_ELEMS // max(1, b * self.n_heads * keys.shape[1]))
        out = []
        for i in range(0, t, step):
            logits = torch.einsum("bthd,bsd->bths", q[:, i : i + step], keys).relu_()
            out.append(torch.einsum("bths,bth->bts", logits, w[:, i : i + step]))
        return torch.cat(out, dim=1)


def indexer_kl(
    probs: torch.Tensor,
    index_scores: torch.Tensor,
    support: torch.Tensor,
    query_valid: torch.Tensor,
) -> torch.Tensor:
    """Mean over valid queries of KL(p[t, :] || softmax(I[t, :])) on the support set.

    probs: main attention [B, H, T, S] (detached here: it is the target); p is their sum over
    heads, L1-normalised. support [B, T, S]: the keys both distributions live on (all visible
    keys in the dense warm-up, the selected set S_t in the sparse stage).
    """
    p = probs.detach().sum(1).masked_fill(~support, 0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    log_q = index_scores.masked_fill(~support, float("-inf")).log_softmax(-1)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p)).sum(-1)
    return (kl * query_valid).sum() / query_valid.sum().clamp_min(1)
