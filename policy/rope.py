"""Rotary position embeddings with YaRN, as DeepSeek-V3.2 uses them.

One set of frequencies serves both MLA and the lightning indexer; they differ only in layout:
MLA rotates interleaved pairs (x[2i], x[2i+1]), the indexer rotates half-split pairs
(x[i], x[i + d/2]). Angles are computed from explicit positions, so left-padded batches and
incremental decoding share one code path.
"""

from __future__ import annotations

import math

import torch

from .args import ModelArgs
from .layers import upcast


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [qk_rope_head_dim // 2] (float32) and the cos/sin scale.

    Under YaRN, dimensions that rotate fewer than beta_slow times over the original context
    are interpolated by 1/factor, those rotating more than beta_fast times are kept, with a
    linear ramp in between. The cos/sin scale is mscale(mscale) / mscale(mscale_all_dim),
    which is 1 for the published config (both 1.0); the attention side of YaRN lives in
    ModelArgs.softmax_scale.
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    y = args.yarn
    if y is None or y["factor"] <= 1:
        return freqs.float(), 1.0
    orig = y["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(y["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    keep = 1 - ramp  # 1 where the dimension keeps its original frequency
    freqs = freqs / y["factor"] * (1 - keep) + freqs * keep
    scale = _yarn_mscale(y["factor"], y["mscale"]) / _yarn_mscale(y["factor"], y["mscale_all_dim"])
    return freqs.float(), scale


class RotaryEmbedding(torch.nn.Module):
    """Maps positions [B, T] to (cos, sin) [B, T, qk_rope_head_dim // 2] in float32."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # A plain attribute, not a buffer: module-wide .to(bfloat16) or to_empty() must never
        # touch the float32 frequencies (bf16 frequencies would shift every angle).
        self.inv_freq, self.scale = rope_frequencies(args)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool
) -> torch.Tensor:
    """Rotate x [B, T, ..., d] by (cos, sin) [B, T, d/2], in >= float32, returned in x.dtype.

    interleaved=True pairs (x[2i], x[2i+1]) (MLA); False pairs (x[i], x[i+d/2]) (indexer).
    """
    extra = x.dim() - cos.dim()
    shape = cos.shape[:2] + (1,) * extra + cos.shape[2:]
    xf = upcast(x)
    cos, sin = cos.view(shape).to(xf.dtype), sin.view(shape).to(xf.dtype)
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = xf.chunk(2, dim=-1)
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.to(x.dtype)
