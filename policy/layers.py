"""Small building blocks of the DSA policy: RMSNorm and the SwiGLU feed-forward network.

Attribute names (`gate_proj`, `up_proj`, `down_proj`, `weight`) are the DeepSeek-V3.2 HF
checkpoint names, so state_dict keys are checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (float64 stays float64): the precision of norms and rotations."""
    return x.float() if x.element_size() < 4 else x


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 or wider. x: [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). x: [..., dim] -> [..., dim].

    Used as the dense FFN of the first `first_k_dense_replace` blocks and as the MoE's
    shared experts (width moe_intermediate_size * n_shared_experts).
    """

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
