"""The policy on a CUDA device: agreement with the CPU, and the real DeepSeek-V3.2 layer shapes.

Run with `pytest -m gpu` on a machine with a CUDA device (skipped elsewhere).
"""

from __future__ import annotations

import pytest
import torch

from policy import Transformer, preset

pytestmark = pytest.mark.gpu


def test_cuda_matches_cpu_and_replays_exactly(make_model, tokens):
    cpu = make_model(index_topk=8)
    gpu = make_model(index_topk=8).cuda()
    ref = cpu(tokens)
    out = gpu(tokens.cuda())
    # TF32 may be on for matmuls on the device; logits are O(1).
    torch.testing.assert_close(out.logits.cpu(), ref.logits, rtol=0, atol=2e-3)
    again = gpu(tokens.cuda(), replay_routing=out.routing)
    assert torch.equal(again.logits, out.logits)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_width_layers(dtype):
    """Two blocks at the released widths (16 of the 256 experts), 4096 tokens, top-2048 DSA."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    args = preset(
        "deepseek-v3.2",
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_group=8,
        topk_group=4,
        vocab_size=4096,
    )
    with torch.device("cuda"):
        # The reference's DSA: this checks DSA's definition (tests/policy/test_dsa_kernels.py
        # checks the kernels against it).
        model = Transformer(args, attention="reference").to(dtype).eval()
    ids = torch.randint(0, args.vocab_size, (1, 4096), device="cuda")
    sparse = model(ids)
    dense = model(ids, dsa=False)
    absorbed = model(ids, absorb=True)
    assert sparse.routing.shape == (1, 4096, 1, 8)
    assert torch.isfinite(sparse.logits).all()
    diff = (sparse.logits.float() - dense.logits.float()).abs().amax(-1)[0]
    routing_agree = (absorbed.routing == sparse.routing).all(-1).float().mean().item()
    print(
        f"{dtype}: DSA-dense gap head {diff[:2048].max():.2e} tail {diff[2048:].max():.2e}; "
        f"MHA vs absorbed routing agreement {routing_agree:.4f}"
    )
    assert diff[2048:].max() > 10 * diff[:2048].max()  # only positions past index_topk change
    if dtype == torch.float32:
        torch.testing.assert_close(absorbed.logits, sparse.logits, rtol=1e-3, atol=1e-2)
    else:
        # bf16 rounds the two evaluation orders differently and near-tie expert choices flip
        # (measured on an H100: 90% of tokens keep all 8 experts); this is the
        # training/inference routing mismatch that Keep Routing removes.
        assert routing_agree > 0.8
