"""RoPE: both pair layouts, relative-position property, and the YaRN frequency ramp."""

from __future__ import annotations

import torch

from policy import preset
from policy.rope import RotaryEmbedding, apply_rope, rope_frequencies


def _rotate(x, pos, interleaved, args=None):
    rope = RotaryEmbedding(args or preset("tiny"))
    cos, sin = rope(torch.tensor([[pos]]))
    return apply_rope(x.view(1, 1, -1), cos, sin, interleaved=interleaved).view(-1)


def test_layouts_are_the_same_rotation_on_permuted_dims():
    x = torch.randn(64, dtype=torch.float64).float()
    perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])  # interleaved -> halves
    inter = _rotate(x, 37, interleaved=True)
    half = _rotate(x[perm], 37, interleaved=False)
    torch.testing.assert_close(inter[perm], half)
    assert not torch.allclose(_rotate(x, 37, True), _rotate(x, 37, False))


def test_dot_product_depends_only_on_offset():
    q, k = torch.randn(64), torch.randn(64)
    for interleaved in (True, False):
        a = _rotate(q, 10, interleaved) @ _rotate(k, 3, interleaved)
        b = _rotate(q, 107, interleaved) @ _rotate(k, 100, interleaved)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_rotate(q, 55, interleaved).norm(), q.norm())


def test_yarn_ramp():
    plain, s0 = rope_frequencies(preset("deepseek-v3.2", rope_scaling=None))
    yarn, s1 = rope_frequencies(preset("deepseek-v3.2"))
    assert s0 == 1.0 and s1 == 1.0  # mscale == mscale_all_dim in the released config
    torch.testing.assert_close(yarn[:8], plain[:8])  # fast dims keep their frequency
    torch.testing.assert_close(yarn[-4:], plain[-4:] / 40)  # slow dims are interpolated
    assert torch.all(yarn <= plain)
