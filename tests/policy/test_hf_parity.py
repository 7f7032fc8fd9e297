"""Parity with Hugging Face transformers' DeepSeek-V3 implementation.

A DSA policy whose sequences fit in index_topk is exactly DeepSeek-V3 (dense MLA), so the same
checkpoint, loaded by transformers as `DeepseekV3ForCausalLM`, must give the same log-probs:
an independent check of MLA, interleaved RoPE, the sigmoid group-limited gate, shared experts
and the checkpoint names. Weights are scaled up so the outputs depend strongly on attention.
"""

from __future__ import annotations

import json

import torch

from policy import save_pretrained
from policy.checkpoint import dense_equivalent_config
from policy.testing import tiny_policy


def test_matches_transformers_deepseek_v3(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_policy(0, vocab_size=128)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    save_pretrained(model, tmp_path)
    cfg = dense_equivalent_config(json.loads((tmp_path / "config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager"
    )
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(ids).logits.log_softmax(-1)
        ours = model(ids).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
