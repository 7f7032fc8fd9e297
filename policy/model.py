"""The DSA policy: a DeepSeek-V3.2-layout decoder (MLA + lightning indexer + sigmoid MoE).

`Transformer(args)(input_ids, replay_routing=..., cache=...)` returns the logits, the final-normed
hidden states (so log-probs can be computed in chunks without full logits) and the experts every
token was routed to in every MoE layer. Module attribute names are the HF checkpoint names, so
`state_dict()` keys are `model.layers.{i}.self_attn.q_a_proj.weight` and so on (routed experts
are stacked; policy.checkpoint splits them per expert).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from .args import ModelArgs
from .attention import MLA, AttnContext, LayerCache, resolve_attention
from .layers import MLP, RMSNorm
from .moe import Experts, MoE
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    """logits [B, T, V] (None when return_logits=False); hidden [B, T, D] final-normed;
    routing [B, T, n_moe_layers, num_experts_per_tok] int64 expert ids the forward used;
    own_routing: the same shape, the ids the gates chose themselves (equal to routing unless
    replay_routing overrode them); indexer_loss: scalar mean KL over layers when requested,
    else None."""

    logits: torch.Tensor | None
    hidden: torch.Tensor
    routing: torch.Tensor
    own_routing: torch.Tensor
    indexer_loss: torch.Tensor | None = None


class KVCache:
    """Incremental-decoding state for a batch: per layer the MLA latent cache [c | k_rope] and
    the indexer key cache, plus which slots hold real tokens (left padding) and how many real
    tokens each row has seen (its next RoPE position).

    Slots are shared across the batch: every forward appends T slots to every row.
    """

    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        def buf(dim: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(batch_size, max_len, dim, device=device, dtype=dt)

        self.layers = [
            LayerCache(
                buf(args.kv_lora_rank + args.qk_rope_head_dim),
                args.kv_lora_rank,
                buf(args.index_head_dim, torch.float32),
            )
            for _ in range(args.num_hidden_layers)
        ]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len


class Block(nn.Module):
    """RMSNorm -> MLA(+DSA) -> residual; RMSNorm -> FFN (dense SwiGLU or MoE) -> residual."""

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.is_moe = args.moe_layer(layer_id)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if self.is_moe else MLP(args.hidden_size, args.intermediate_size)

    def forward(
        self,
        h: torch.Tensor,
        *,
        ctx: AttnContext,
        cache: LayerCache | None = None,
        absorb: bool = False,
        dsa: bool = True,
        indexer_loss: str | None = None,
        replay: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """h [B, T, D] -> (h, indexer KL or None, routing ids [B, T, k] and the gate's own ids,
        or None for a dense FFN). replay: the experts Keep Routing forces, or None."""
        attn, kl = self.self_attn(
            self.input_layernorm(h),
            ctx,
            cache=cache,
            absorb=absorb,
            dsa=dsa,
            indexer_loss=indexer_loss,
        )
        h = h + attn
        x = self.post_attention_layernorm(h)
        ids = own = None
        if self.is_moe:
            ffn, ids, own = self.mlp(x, replay)
        else:
            ffn = self.mlp(x)
        return h + ffn, kl, ids, own


class Backbone(nn.Module):
    """embed_tokens [V, D], layers, final norm: the HF `model.` prefix of the checkpoint."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """The DSA policy. forward(input_ids [B, T], ...) -> ModelOutput.

    replay_routing [B, T, n_moe_layers, k] forces those experts (Keep Routing); the gate still
    weights them with its current scores. attention_mask [B, T] (1 = real token) supports left
    padding. With a KVCache the new tokens are appended to it (absorbed MQA attention by
    default once the cache holds tokens, MHA for the first chunk). dsa=False runs dense MLA
    (the indexer's dense warm-up stage); indexer_loss='dense'|'sparse' adds the indexer KL.
    `attention` picks DSA's implementation (policy/attention.py); the kernels' sparse path
    always runs absorbed MQA mode, whatever `absorb` says.
    """

    def __init__(self, args: ModelArgs, *, attention: str = "auto") -> None:
        super().__init__()
        self.args = args
        # How DSA runs (policy/attention.py): "auto" | "reference" | "triton". Not a weight or an
        # architecture fact, so it is not saved with the checkpoint; set it on a loaded model.
        self.attention = attention
        # Recompute each block in the backward (memory for time): a learner setting, not saved.
        self.activation_checkpointing = False
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) projections and embeddings, unit norms, zero selection bias."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, Experts):
                for p in m.parameters():
                    nn.init.normal_(p, std=std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for layer in self.model.layers:
            if layer.is_moe:
                nn.init.normal_(layer.mlp.gate.weight, std=std)
                layer.mlp.gate.e_score_correction_bias.zero_()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache on this model's device and dtype."""
        p = self.lm_head.weight
        return KVCache(self.args, batch_size, max_len, device=p.device, dtype=p.dtype)

    def _context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> AttnContext:
        b, t = input_ids.shape
        dev = input_ids.device
        valid = (
            torch.ones(b, t, dtype=torch.bool, device=dev)
            if attention_mask is None
            else attention_mask.to(device=dev, dtype=torch.bool)
        )
        start = 0 if cache is None else cache.length
        seen = torch.zeros(b, dtype=torch.long, device=dev) if cache is None else cache.n_real
        positions = (seen.unsqueeze(1) + valid.long().cumsum(1) - 1).clamp_min(0)
        if cache is None:
            key_valid = valid
        else:
            if start + t > cache.max_len:
                raise ValueError(f"KVCache full: {start} + {t} tokens > max_len {cache.max_len}")
            cache.key_valid[:, start : start + t] = valid
            key_valid = cache.key_valid[:, : start + t]
        cos, sin = self.rotary(positions)
        attention = resolve_attention(self.attention, self.args, dev)
        return AttnContext(cos, sin, key_valid, valid, start, attention)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        replay_routing: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        absorb: bool | None = None,
        dsa: bool = True,
        indexer_loss: str | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        b, t = input_ids.shape
        n_moe, top_k = self.args.n_moe_layers, self.args.num_experts_per_tok
        if replay_routing is not None and tuple(replay_routing.shape) != (b, t, n_moe, top_k):
            raise ValueError(
                f"replay_routing has shape {tuple(replay_routing.shape)}, expected "
                f"[B, T, n_moe_layers, num_experts_per_tok] = {[b, t, n_moe, top_k]}"
            )
        ctx = self._context(input_ids, attention_mask, cache)
        if absorb is None:
            absorb = cache is not None and cache.length > 0
        h = self.model.embed_tokens(input_ids)
        routing, own_routing, kls = [], [], []
        # Recompute each block in the backward instead of keeping its activations: only when
        # training with gradients and no KV cache (the cache is written in the forward).
        recompute = (
            self.activation_checkpointing and self.training and cache is None
        ) and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            replay = None
            if layer.is_moe and replay_routing is not None:
                replay = replay_routing[:, :, len(routing)]
            run = functools.partial(
                layer, ctx=ctx, cache=None if cache is None else cache.layers[i],
                absorb=absorb, dsa=dsa, indexer_loss=indexer_loss, replay=replay,
            )  # fmt: skip
            if recompute:
                h, kl, ids, own = torch.utils.checkpoint.checkpoint(run, h, use_reentrant=False)
            else:
                h, kl, ids, own = run(h)
            if layer.is_moe:
                routing.append(ids)
                own_routing.append(own)
            if kl is not None:
                kls.append(kl)
        if cache is not None:
            cache.n_real += ctx.query_valid.sum(1)
            cache.length += t
        hidden = self.model.norm(h)

        def stacked(ids: list[torch.Tensor]) -> torch.Tensor:
            if ids:
                return torch.stack(ids, dim=2)
            return torch.zeros(b, t, 0, top_k, dtype=torch.long, device=input_ids.device)

        return ModelOutput(
            logits=self.lm_head(hidden) if return_logits else None,
            hidden=hidden,
            routing=stacked(routing),
            own_routing=stacked(own_routing),
            indexer_loss=torch.stack(kls).mean() if kls else None,
        )


def indexer_parameters(model: Transformer) -> list[nn.Parameter]:
    """The lightning indexers' parameters (wq_b, wk, k_norm, weights_proj of every layer)."""
    return [p for layer in model.model.layers for p in layer.self_attn.indexer.parameters()]


def freeze_all_but_indexer(model: Transformer, freeze: bool = True) -> list[nn.Parameter]:
    """Dense warm-up: only indexer parameters train (freeze=False unfreezes everything).

    Returns the parameters left trainable.
    """
    keep = {id(p) for p in indexer_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(not freeze or id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]
