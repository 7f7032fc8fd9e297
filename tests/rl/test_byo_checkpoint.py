"""Bring your own checkpoint: a local policy checkpoint with its own byte-level BPE tokenizer
and chat template (both made here with the `tokenizers` library: nothing is downloaded), JSONL
prompts with references, and `keeprl train` for two steps with each engine, then `keeprl
replay` and `keeprl inspect`, all tokenizing and decoding with the checkpoint's tokenizer."""

from __future__ import annotations

import json
import os

import pytest

from policy import save_pretrained
from policy.testing import tiny_policy
from rl.cli import main as cli
from rl.inspect import token_text
from rl.tokenizer import HFTokenizer
from rollout import RolloutStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = "{{ bos_token }}User: {{ messages[0]['content'] }}\nAssistant:"
TASKS = [(f"{a}+{b}=", str(a + b)) for a in range(3, 9) for b in range(2, 5)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny policy (vocab 320) beside a BPE tokenizer trained on the task text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("byo")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],  # ids 0 and 1: the checkpoint's BOS and EOS
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [f"User: {p}\nAssistant: {a}" for p, a in TASKS] * 20
    bpe.train_from_iterator(text, trainer)
    ckpt = save_pretrained(tiny_policy(0, vocab_size=320), root / "policy")
    bpe.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    data = root / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "reference": {"answer": a}}) + "\n" for p, a in TASKS)
    )
    return ckpt, data


def test_the_checkpoints_tokenizer_and_chat_template(checkpoint):
    tok = HFTokenizer(checkpoint[0])
    assert (tok.bos_id, tok.eos_id) == (0, 1) and 258 < tok.vocab_size <= 300  # bytes + merges
    ids = tok.prompt_ids("3+4=")
    assert ids[0] == tok.bos_id and tok.decode(ids) == "User: 3+4=\nAssistant:"
    assert len(ids) < len("User: 3+4=\nAssistant:")  # merges, not one id per character


@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_train_replay_and_inspect_with_the_checkpoints_tokenizer(
    checkpoint, tmp_path, monkeypatch, engine
):
    monkeypatch.chdir(ROOT)
    ckpt, data = checkpoint
    run = tmp_path / "run"
    overrides = [
        f"model.checkpoint={ckpt}",
        "data.task=null",
        f"data.path={data}",
        f"rollout.engine={engine}",
        "rollout.sampling={temperature: 1.0, top_k: 20, max_tokens: 4}",
        "data.prompts_per_step=2",
        "rollout.samples_per_prompt=4",
        "trainer.total_steps=2",
        "checkpoint.every=1",
        f"trainer.output_dir={run}",
        "ray.num_cpus=2",
    ]
    assert cli(["train", "configs/native-sparse.yaml", *overrides]) == 0
    tok = HFTokenizer(ckpt)
    logged = RolloutStore(run / "rollouts").read_step(1)
    prompts = {p for p, _ in TASKS}
    for t in logged.trajectories:
        assert t.engine == engine and t.prompt_ids[0] == tok.bos_id
        text = tok.decode(t.prompt_ids)
        assert text.removeprefix("User: ").removesuffix("\nAssistant:") in prompts
    out = tmp_path / "inspect.json"
    assert cli(["inspect", str(run), "--step", "1", "--json", str(out)]) == 0
    shown = json.loads(out.read_text())["trajectories"]
    for row, t in zip(shown, logged.trajectories, strict=False):
        assert row["prompt"] == tok.decode(t.prompt_ids) and row["prompt"].endswith("Assistant:")
        assert [r["text"] for r in row["tokens"]] == [token_text(tok, i) for i in t.response_ids]
    out = tmp_path / "replay.json"
    assert cli(["replay", str(run), "--step", "1", "--json", str(out), "--verifier", "math"]) == 0
    report = json.loads(out.read_text())
    assert report["rescored"]["rescored_mean"] == report["rescored"]["logged_mean"]
    both = report["variants"]["routing+mask"]
    assert both["gap_max"] < (1e-4 if engine == "native" else 0.15)
