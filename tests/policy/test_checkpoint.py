"""Checkpoints: exact round trip, the HF tensor names, sharding, FP8 dequantisation, MTP
skipping, bad input naming the tensor, and the full-size preset on the meta device."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from policy import Transformer, indexer_parameters, load_pretrained, preset, save_pretrained
from policy.checkpoint import INDEX_FILE, hf_tensors

HF_NAMES = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_a_proj.weight",
    "model.layers.0.self_attn.q_a_layernorm.weight",
    "model.layers.0.self_attn.q_b_proj.weight",
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
    "model.layers.0.self_attn.kv_a_layernorm.weight",
    "model.layers.0.self_attn.kv_b_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.indexer.wq_b.weight",
    "model.layers.0.self_attn.indexer.wk.weight",
    "model.layers.0.self_attn.indexer.k_norm.weight",
    "model.layers.0.self_attn.indexer.k_norm.bias",
    "model.layers.0.self_attn.indexer.weights_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.gate.weight",
    "model.layers.1.mlp.gate.e_score_correction_bias",
    "model.layers.1.mlp.experts.0.gate_proj.weight",
    "model.layers.1.mlp.experts.7.up_proj.weight",
    "model.layers.1.mlp.experts.3.down_proj.weight",
    "model.layers.1.mlp.shared_experts.gate_proj.weight",
    "model.layers.1.mlp.shared_experts.up_proj.weight",
    "model.layers.1.mlp.shared_experts.down_proj.weight",
]


def _assert_same(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard", ["5GB", "300KB"])
def test_round_trip_is_exact(make_model, tmp_path, shard, tokens):
    model = make_model()
    save_pretrained(model, tmp_path, max_shard_size=shard)
    assert (tmp_path / INDEX_FILE).exists() == (shard == "300KB")
    loaded = load_pretrained(tmp_path)
    _assert_same(model, loaded)
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_hf_names_and_config(make_model, tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    missing = [n for n in HF_NAMES if n not in tensors]
    assert not missing
    assert len(tensors) == len(list(hf_tensors(model)))
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].shape == (64, 128)
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV32ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16


def _rewrite(tmp_path, fn):
    tensors = load_file(tmp_path / "model.safetensors")
    fn(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


def test_missing_tensor_is_named(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.self_attn.indexer.wk.weight"))
    with pytest.raises(
        ValueError, match=r"missing 1 tensors: model\.layers\.1\.self_attn\.indexer\.wk"
    ):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["garbled header", "truncated header", "cut short"])
def test_a_damaged_weight_file_is_one_line_naming_it(make_model, tmp_path, damage):
    path = save_pretrained(make_model(), tmp_path / "ckpt")
    weights = next(path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    if damage == "garbled header":
        data[8:24] = b"{not json at all"
    elif damage == "truncated header":
        data = data[:20]
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged safetensors file") as err:
        load_pretrained(path)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)


def test_wrong_shape_is_named(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["q_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"tensor model\.layers\.0\.self_attn\.\S+ has shape .*implies \[.*48.*\]"
    ):
        load_pretrained(tmp_path)


def test_unexpected_tensor_is_named(make_model, tmp_path):
    save_pretrained(make_model(), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.extra"):
        load_pretrained(tmp_path)


def test_mtp_layer_is_skipped_with_a_message(make_model, tmp_path, caplog, tokens):
    model = make_model()
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _rewrite(
        tmp_path,
        lambda t: t.update(
            {
                "model.layers.2.eh_proj.weight": torch.ones(128, 256),
                "model.layers.2.self_attn.q_a_proj.weight": torch.ones(64, 128),
            }
        ),
    )
    with caplog.at_level(logging.WARNING):
        loaded = load_pretrained(tmp_path)
    assert "skipped 2 multi-token-prediction tensors" in caplog.text
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_fp8_block_checkpoint_is_dequantised(make_model, tmp_path, tokens):
    model = make_model()
    save_pretrained(model, tmp_path)
    name = "model.layers.0.self_attn.kv_b_proj.weight"  # [4*(32+32), 512]: 2 x 4 blocks of 128

    def quantise(t):
        w = t[name].float()
        blocks = w.view(2, 128, 4, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0
        q = (blocks / scale[:, None, :, None]).view_as(w).to(torch.float8_e4m3fn)
        t[name], t[name + "_scale_inv"] = q, scale

    _rewrite(tmp_path, quantise)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(tmp_path)
    got, want = loaded.state_dict()[name], model.state_dict()[name]
    assert not torch.equal(got, want)  # really went through FP8
    torch.testing.assert_close(got, want, rtol=0.07, atol=1e-3)  # e4m3 keeps 3 mantissa bits


def test_full_size_preset_on_meta():
    with torch.device("meta"):
        model = Transformer(preset("deepseek-v3.2"))
    total = sum(p.numel() for p in model.parameters())
    indexer = sum(p.numel() for p in indexer_parameters(model))
    # 671B published (without the MTP block) plus 61 indexers of ~14M parameters each
    assert 670.5e9 < total - indexer < 671.5e9
    assert indexer == 61 * (1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64)


@pytest.mark.parametrize("shard", ["5GB", "300KB"])
def test_the_checkpoint_format_helpers(make_model, tmp_path, shard):
    from policy.checkpoint import (
        checkpoint_files,
        checkpoint_tensors,
        dense_equivalent_config,
        keeps_float32,
        tensor_names,
        weight_files,
    )

    model = make_model()
    path = save_pretrained(model, tmp_path, dtype=torch.bfloat16, max_shard_size=shard)
    files = weight_files(path)
    assert (len(files) > 1) == (shard == "300KB")
    assert checkpoint_files(path) == sorted(files) + ([INDEX_FILE] if len(files) > 1 else [])
    names = tensor_names(path)
    assert names == {name for name, _ in hf_tensors(model)}
    stored = dict(checkpoint_tensors(path))
    assert stored.keys() == names
    for name, t in stored.items():  # the float32 rule, as save_pretrained applied it
        assert (t.dtype == torch.float32) == keeps_float32(name, t), name
    assert any(keeps_float32(n, t) for n, t in stored.items())  # the selection bias
    dense = dense_equivalent_config(json.loads((path / "config.json").read_text()))
    assert dense["architectures"] == ["DeepseekV3ForCausalLM"]
    assert not any(k.startswith("index") for k in dense)
