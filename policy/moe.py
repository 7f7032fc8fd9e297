"""The DeepSeek-V3.2 mixture-of-experts FFN: sigmoid gate with group-limited routing.

Keep Routing lives here: `Gate.forward(x, replay_ids)` skips expert *selection* and uses the
recorded ids, but still computes the expert *weights* from the current gate scores at those
ids, so the gate keeps receiving gradients while the sampler's routing is reproduced exactly.

Routed experts are stored stacked ([E, ...] tensors) so a grouped matmul can run them; the
checkpoint layer splits them into the per-expert HF names `mlp.experts.{e}.{gate,up,down}_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .layers import MLP, upcast


class Gate(nn.Module):
    """Sigmoid router with an auxiliary-loss-free selection bias.

    weight: [E, D]; e_score_correction_bias: [E] (a buffer: it is adjusted by load balancing,
    not by gradients). forward(x [N, D], replay_ids [N, k] | None) -> (weights [N, k] in >= float32,
    ids [N, k] int64 used, own_ids [N, k] int64: the gate's own choice, which replay overrides).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32)
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        # Keep the selection bias in float32 whatever dtype the model is cast to: it decides
        # near-ties between experts, and the released checkpoint stores it in float32.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Steps 2-3 of the gate: biased, group-limited top-k selection. scores: [N, E]."""
        biased = scores + self.e_score_correction_bias.to(scores.dtype)
        if self.n_group > 1:
            grouped = biased.view(biased.shape[0], self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, n_group]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.top_k, dim=-1).indices

    def forward(
        self, x: torch.Tensor, replay_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xf = upcast(x)
        scores = F.linear(xf, self.weight.to(xf.dtype)).sigmoid()  # step 1
        # Selected even under replay: the learner reports how often it disagrees with the
        # sampler's routing, which Keep Routing overrides (a top-k over E experts: cheap).
        own = self.select(scores)
        ids = own if replay_ids is None else replay_ids.long()
        weights = scores.gather(1, ids)  # step 4: the unbiased scores at the chosen experts
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.routed_scaling_factor, ids, own


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes these operands: it runs forward and backward on
    CUDA (Hopper and newer) for bf16 with 16-byte-aligned rows; elsewhere the segment loop."""
    grouped = getattr(torch, "_grouped_mm", None)
    return (
        grouped is not None
        and x.is_cuda
        and x.dtype == weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and x.shape[-1] % 8 == 0
        and weight.shape[1] % 8 == 0
    )


class _SegmentLinear(torch.autograd.Function):
    """y[seg_e] = x[seg_e] @ W[e]^T for contiguous segments of rows, one per expert.

    The backward writes each expert's weight gradient into one [E, out, in] buffer: autograd of
    `W[e]` slices would instead give every slice a zero gradient the size of the whole stacked
    weight and add it, E times per projection."""

    @staticmethod
    def forward(ctx, x, weight, counts):  # noqa: ANN001
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        y = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(x[start : start + c], weight[e].t(), out=y[start : start + c])
                start += c
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        x, weight = ctx.saved_tensors
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for e, c in enumerate(ctx.counts):
            if c:
                seg = slice(start, start + c)
                if dx is not None:
                    torch.mm(dy[seg], weight[e], out=dx[seg])
                if dw is not None:
                    torch.mm(dy[seg].t(), x[seg], out=dw[e])
                start += c
        return dx, dw, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [M, in] sorted by expert, counts[e] rows for expert e, times weight [E, out, in]
    transposed: [M, out]. One grouped GEMM: torch._grouped_mm where it runs; on other CUDA
    devices in bf16/fp16, the Triton kernel (kernels/grouped_gemm.py); else (the CPU, float32
    models, which are for checking) a loop over the experts' segments with a single stacked
    weight gradient."""
    if _grouped_mm_ok(x, weight):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
        from kernels.grouped_gemm import grouped_linear_triton

        return grouped_linear_triton(x.contiguous(), weight, counts)
    return _SegmentLinear.apply(x, weight, counts.tolist())


class Experts(nn.Module):
    """E routed SwiGLU experts stored stacked.

    gate_proj, up_proj: [E, I, D]; down_proj: [E, D, I] (each slice is the HF expert's
    `.weight`). forward(x [N, D], ids [N, k], weights [N, k]) -> [N, D]: the N*k token slots
    are sorted by expert once, each projection is one grouped matmul over all experts
    (grouped_linear), and the slots go back to token order.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # token slots grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0])
        xs = x[order // k]
        h = F.silu(grouped_linear(xs, self.gate_proj, counts)) * grouped_linear(
            xs, self.up_proj, counts
        )
        per_slot = grouped_linear(h, self.down_proj, counts)
        per_slot = per_slot[order.argsort()].view(n, k, -1)  # back to (token, slot) order
        # Summing the k slots in a fixed order keeps the result deterministic (bit-exact replay).
        return (upcast(per_slot) * weights.unsqueeze(-1)).sum(1).to(x.dtype)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts.

    forward(x [B, T, D], replay_ids [B, T, k] | None) -> (y [B, T, D], ids [B, T, k]).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        self.shared_experts = MLP(
            args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
        )

    def forward(
        self, x: torch.Tensor, replay_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        replay = None if replay_ids is None else replay_ids.reshape(b * t, -1)
        weights, ids, own = self.gate(flat, replay)
        y = self.experts(flat, ids, weights) + self.shared_experts(flat)
        return y.view(b, t, d), ids.view(b, t, -1), own.view(b, t, -1)
