"""Token log-probs under the sampling mask, computed in chunks from the final hidden states.

Keep Sampling Mask: the sampler drew each token from a top-k/top-p truncated distribution, so
pi_old is a probability renormalised over the kept set. The learner must score pi_theta (and
pi_ref) over the same set, log pi(token) = z_token - logsumexp(z[kept]), z = h W^T / temperature,
or the ratio pi_theta / pi_old is biased even when the weights are identical.

The full [tokens, vocab] float32 logits are never materialised: a custom autograd function
processes `chunk_size` tokens at a time in the forward and recomputes each chunk's logits in the
backward, so peak memory is one chunk's logits, not all of them (4,096 tokens at vocab 129,280
would be 2.1 GB). `masked_logprobs_reference` is the plain torch version it is tested against.

Kept ids are [N, K] padded with -1. A row of all -1 means "not truncated": the full softmax
(no top-k/top-p was applied at that position, so nothing was recorded).

`token_logprobs(model, batch, keep_routing=..., keep_sampling_mask=...)` is the one way a
batch's response tokens are scored (the learner, its reference model and `keeprl replay` all
use it), and `routing_disagreement` the one measure of how the model's own gates differ from
the routing the sampler recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels.kept import check_kept_ids, masked_logprobs_reference  # noqa: F401 (public here)
from policy.layers import upcast

if TYPE_CHECKING:
    from policy import Transformer

    from .batch import Batch

# Default bound on one chunk's [chunk, V] float32 logits, in elements: 64 MiB on the CPU,
# 256 MiB on a GPU, where chunks of ~500 rows at vocab 129,280 keep the matmuls efficient.
DEFAULT_CHUNK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 26}


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    # Matmul in the model dtype (as the sampler's LM head does), softmax maths in >= float32.
    return upcast(F.linear(h, weight)) / temperature


def _normaliser(z: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over each row's support [c], and which rows are truncated [c] bool.

    Truncated rows sum over their K kept logits only (a gather, no [c, V] mask); the others
    over the whole vocabulary.
    """
    if kept is None:
        return z.logsumexp(-1), torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    truncated = (kept >= 0).any(-1)
    zk = z.gather(1, kept.clamp_min(0)).masked_fill(kept < 0, float("-inf"))
    logz = zk.logsumexp(-1)
    if not bool(truncated.all()):
        logz = torch.where(truncated, logz, z.logsumexp(-1))
    return logz, truncated


def _softmax_parts(
    z: torch.Tensor, kept: torch.Tensor | None, logz: torch.Tensor, truncated: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The support's probabilities: dense [c, V] for untruncated rows (None if there are none)
    and [c, K] at the kept ids for truncated rows (None without kept ids); each zero elsewhere."""
    dense = None
    if not bool(truncated.all()):
        dense = torch.where(truncated[:, None], 0.0, (z - logz[:, None]).exp())
    sparse = None
    if kept is not None:
        zk = z.gather(1, kept.clamp_min(0))
        on = (kept >= 0) & truncated[:, None]
        sparse = torch.where(on, (zk - logz[:, None]).exp(), 0.0)
    return dense, sparse


class _MaskedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, kept, temperature, chunk, want_entropy):  # noqa: ANN001
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=upcast(hidden[:0]).dtype, device=hidden.device)
        entropy = torch.zeros_like(logp)
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            k = None if kept is None else kept[sl]
            z = _chunk_logits(hidden[sl], weight, temperature)
            logz, truncated = _normaliser(z, k)
            logp[sl] = z.gather(1, targets[sl, None]).squeeze(1) - logz
            if want_entropy:  # H = logZ - E_p[z] over the support
                dense, sparse = _softmax_parts(z, k, logz, truncated)
                mean_z = torch.zeros_like(logz)
                if dense is not None:
                    mean_z = mean_z + (dense * z).sum(-1)
                if sparse is not None:
                    mean_z = mean_z + (sparse * z.gather(1, k.clamp_min(0))).sum(-1)
                entropy[sl] = logz - mean_z
        ctx.save_for_backward(hidden, weight, targets, kept)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):  # noqa: ANN001
        hidden, weight, targets, kept = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        # The weight gradient accumulates in the weight's dtype (addmm sums each chunk's
        # product in float32, then rounds once per chunk): a float32 accumulator for a bf16
        # [V, D] head would itself be twice the head's size (3.7 GB at DeepSeek-V3.2's).
        grad_w = torch.zeros_like(weight) if want_w else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            h, k = hidden[sl], None if kept is None else kept[sl]
            z = _chunk_logits(h, weight, ctx.temperature)
            logz, truncated = _normaliser(z, k)
            dense, sparse = _softmax_parts(z, k, logz, truncated)
            # d logp / d z = onehot(target) - softmax(z over the support); chain through 1/T.
            g = upcast(grad_logp[sl])
            dz = torch.zeros_like(z) if dense is None else -dense * g[:, None]
            if sparse is not None:
                dz.scatter_add_(1, k.clamp_min(0), -sparse * g[:, None])
            dz.scatter_add_(1, targets[sl, None], g[:, None])
            dz /= ctx.temperature
            # Products in the weight's dtype, as autograd would do for F.linear (no float32
            # copy of a [V, D] head).
            dz = dz.to(weight.dtype)
            if want_h:
                grad_h[sl] = (dz @ weight).to(hidden.dtype)
            if want_w:
                grad_w.addmm_(dz.t(), h.to(weight.dtype))
        return grad_h, grad_w, None, None, None, None, None


def masked_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    kept_ids: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(targets) [N] (float32, float64 for float64 inputs) from hidden [N, D] and the
    LM head [V, D].

    kept_ids [N, K] (-1 padded) restricts and renormalises each row to its kept set; None
    uses the full softmax everywhere. With return_entropy, also the entropy [N] of each row's
    (truncated) distribution, without gradient.

    On a CUDA device this is kernels.logprobs.masked_logprobs_triton (same contract; GEMMs on
    cuBLAS, the elementwise passes over the logits in Triton), elsewhere the torch chunks below.
    """
    if hidden.is_cuda:
        # Imported here: the CPU path (and the CPU test suite) must not need Triton compiled.
        from kernels.logprobs import masked_logprobs_triton

        return masked_logprobs_triton(
            hidden,
            lm_head_weight,
            targets,
            kept_ids,
            temperature=temperature,
            chunk_size=chunk_size,
            return_entropy=return_entropy,
        )
    if kept_ids is not None:
        kept_ids = kept_ids.long()
    targets = targets.long()
    check_kept_ids(targets, kept_ids, lm_head_weight.shape[0])
    budget = DEFAULT_CHUNK_ELEMS.get(hidden.device.type, DEFAULT_CHUNK_ELEMS["cpu"])
    chunk = chunk_size or max(1, budget // lm_head_weight.shape[0])
    logp, entropy = _MaskedLogProbs.apply(
        hidden, lm_head_weight, targets, kept_ids, float(temperature), chunk, return_entropy
    )
    return (logp, entropy) if return_entropy else logp


def token_logprobs(
    model: Transformer,
    batch: Batch,
    *,
    keep_routing: bool,
    keep_sampling_mask: bool,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Score a batch's response tokens with `model`.

    keep_routing: the forward replays the sampler's recorded experts (batch.routing);
    keep_sampling_mask: log-probs are renormalised over the sampler's kept ids.
    Returns log pi(token) [B, T] at response positions (0 elsewhere), its entropy [B, T] (or
    None), and the routing the model's own gates chose [B, T, n_moe, k], which is what the
    forward used unless Keep Routing replayed the sampler's.
    """
    out = model(
        batch.input_ids,
        replay_routing=batch.routing if keep_routing else None,
        attention_mask=batch.attention_mask,
        return_logits=False,
    )
    # Token p is predicted from the hidden state at p - 1.
    sel = batch.response_mask[:, 1:]
    kept = batch.kept_ids[:, 1:][sel] if keep_sampling_mask and batch.kept_ids is not None else None
    logp, ent = masked_logprobs(
        out.hidden[:, :-1][sel],
        model.lm_head.weight,
        batch.input_ids[:, 1:][sel],
        kept,
        temperature=batch.temperature,
        return_entropy=True,
    )
    full = torch.zeros(batch.input_ids.shape, dtype=logp.dtype, device=logp.device)
    logp_full = full.masked_scatter(batch.response_mask, logp)
    ent_full = full.masked_scatter(batch.response_mask, ent) if entropy else None
    return logp_full, ent_full, out.own_routing


def routing_disagreement(
    own_routing: torch.Tensor, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How the model's own expert choice [B, T, n_moe, k] differs from the routing the sampler
    recorded (batch.routing), over the tokens the sampler routed: (tokens whose expert set
    differs in any MoE layer, the same per layer [n_moe], routed tokens). Counts, as tensors on
    the batch's device (no host synchronisation), so micro-batches add up; divide by the last
    for fractions."""
    same = (own_routing.sort(-1).values == batch.routing.sort(-1).values).all(-1)  # [B, T, L]
    valid = batch.routed_mask
    differs = ~same & valid[..., None]
    return differs.any(-1).sum(), differs.sum((0, 1)), valid.sum()
