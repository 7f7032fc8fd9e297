"""The supervised warm-start: its batches, its three DeepSeek-V3.2 stages (each trains what it
should on the loss it should), its cache key, and its config section."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from policy import Transformer, preset
from policy.model import indexer_parameters
from rl.config import (
    ConfigError,
    IndexerWarmupConfig,
    SparseSFTConfig,
    WarmStartConfig,
    load_config,
)
from rl.tasks import TaskStream
from rl.tokenizer import CharTokenizer
from rl.warm_start import (
    _real_tokens,
    cache_key,
    sft_batch,
    train_indexer_warmup,
    train_sft,
    train_sparse_sft,
    warm_start,
)

TOK = CharTokenizer()


@pytest.fixture
def stream() -> TaskStream:
    return TaskStream("arithmetic", None, seed=0, task_kwargs={"max_operand": 9})


@pytest.fixture
def sparse_policy() -> Transformer:
    """index_topk 4 is below every arithmetic sequence's length (7-8 tokens): DSA is sparse."""
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=128, index_topk=4))


def _snapshot(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _indexer_names(model: Transformer) -> set[str]:
    ids = {id(p) for p in indexer_parameters(model)}
    return {k for k, p in model.named_parameters() if id(p) in ids}


def _changed(model: Transformer, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}


def _kl(model: Transformer, ids: torch.Tensor, mode: str) -> float:
    with torch.no_grad():
        real = _real_tokens(ids, TOK.eos_id)
        out = model(ids, attention_mask=real, dsa=mode == "sparse", indexer_loss=mode)
    return out.indexer_loss.item()


def test_sft_batch_targets_only_the_answer(stream):
    ids, targets = sft_batch(stream.take(2), TOK)
    for row in range(2):
        answer = targets[row][targets[row] >= 0].tolist()
        assert answer[-1] == TOK.eos_id and TOK.decode(answer[:-1]).lstrip("-").isdigit()


def test_real_tokens_end_at_the_first_eos():
    ids = torch.tensor([[0, 5, 6, 1, 1, 1], [0, 5, 6, 7, 8, 1]])
    assert _real_tokens(ids, 1).tolist() == [[True] * 4 + [False] * 2, [True] * 6]


def test_dense_sft_matches_dsa_sft_when_index_topk_covers_every_sequence(stream):
    """Stage 1 runs dense attention; with index_topk >= every sequence (the quickstart's 256)
    that is exactly what the former DSA warm-start computed, so its effect is unchanged."""
    torch.manual_seed(0)
    dense = Transformer(preset("tiny", vocab_size=128))
    dsa = Transformer(preset("tiny", vocab_size=128))
    dsa.load_state_dict(dense.state_dict())
    losses = train_sft(dense, stream, TOK, steps=5, batch_size=16, lr=1e-3)
    replay = TaskStream("arithmetic", None, seed=0, task_kwargs={"max_operand": 9})
    opt = torch.optim.AdamW(dsa.parameters(), lr=1e-3)
    for loss in losses:  # the former loop: model(ids), whose default is dsa=True
        ids, targets = sft_batch(replay.take(16), TOK)
        ref = torch.nn.functional.cross_entropy(dsa(ids).logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        ref.backward()
        opt.step()
        assert ref.item() == pytest.approx(loss, rel=1e-5)


def test_indexer_warmup_trains_only_the_indexer_and_lowers_its_kl(sparse_policy, stream):
    model = sparse_policy
    train_sft(model, stream, TOK, steps=20, batch_size=32, lr=1e-3)  # a main attention to copy
    held_out, _ = sft_batch(TaskStream("arithmetic", None, 99, {"max_operand": 9}).take(64), TOK)
    kl_before = _kl(model, held_out, "dense")
    before = _snapshot(model)
    kls = train_indexer_warmup(model, stream, TOK, steps=40, batch_size=32, lr=1e-3)
    assert len(kls) == 40 and sum(kls[-5:]) < 0.5 * sum(kls[:5])
    assert _kl(model, held_out, "dense") < 0.5 * kl_before
    assert _changed(model, before) == _indexer_names(model)  # every indexer tensor, nothing else
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone


def test_sparse_sft_routes_each_loss_to_its_own_parameters(sparse_policy, stream):
    """The premise of stage 3's plain loss sum: the LM loss reaches no indexer parameter and
    the indexer's KL reaches only indexer parameters."""
    model = sparse_policy
    ids, targets = sft_batch(stream.take(16), TOK)
    out = model(ids, attention_mask=_real_tokens(ids, TOK.eos_id), indexer_loss="sparse")
    lm = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    names = _indexer_names(model)
    params = dict(model.named_parameters())
    for loss, reached in [(lm, set(params) - names), (out.indexer_loss, names)]:
        grads = torch.autograd.grad(
            loss, list(params.values()), retain_graph=True, allow_unused=True
        )
        nonzero = {k for k, g in zip(params, grads, strict=True) if g is not None and g.any()}
        assert nonzero <= reached and nonzero


def test_sparse_sft_trains_both_at_their_own_rates(sparse_policy, stream):
    model = sparse_policy
    train_sft(model, stream, TOK, steps=20, batch_size=32, lr=1e-3)
    train_indexer_warmup(model, stream, TOK, steps=20, batch_size=32, lr=1e-3)
    before = _snapshot(model)
    history = train_sparse_sft(
        model, stream, TOK, steps=30, batch_size=32, lr=1e-3, indexer_lr=1e-3
    )
    assert set(history) == {"lm", "indexer_kl"} and len(history["lm"]) == 30
    assert sum(history["lm"][-5:]) < sum(history["lm"][:5])
    assert _indexer_names(model) < _changed(model, before)  # the indexer and more
    before = _snapshot(model)
    train_sparse_sft(model, stream, TOK, steps=3, batch_size=32, lr=1e-3, indexer_lr=0.0)
    assert not _changed(model, before) & _indexer_names(model)  # indexer_lr alone moves it


def test_warm_start_learns_and_caches(tmp_path, stream):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=128))
    settings = {"model": "tiny", "seed": 0}
    cfg = WarmStartConfig(enabled=True, steps=60, batch_size=32, lr=1e-3, cache_dir=str(tmp_path))
    kw = dict(config=cfg, settings=settings)
    path = warm_start(model, stream, TOK, **kw)
    losses = json.loads((path / "warm_start.json").read_text())["losses"]
    assert list(losses) == ["dense_sft"]  # no stage asked for: dense SFT alone, as before
    lm = losses["dense_sft"]["lm"]
    assert sum(lm[-10:]) < 0.5 * sum(lm[:10])
    stamp = (path / "config.json").stat().st_mtime_ns
    again = warm_start(model, stream, TOK, **kw)
    assert again == path and (path / "config.json").stat().st_mtime_ns == stamp
    assert stream.position == 60 * 32  # the cached call trained nothing


def test_warm_start_runs_the_configured_stages(tmp_path, sparse_policy, stream):
    cfg = WarmStartConfig(
        enabled=True,
        steps=4,
        batch_size=8,
        lr=1e-3,
        indexer_warmup=IndexerWarmupConfig(steps=3),
        sparse_sft=SparseSFTConfig(steps=2),
        cache_dir=str(tmp_path),
    )
    path = warm_start(sparse_policy, stream, TOK, config=cfg, settings={"model": "tiny"})
    losses = json.loads((path / "warm_start.json").read_text())["losses"]
    assert {k: len(next(iter(v.values()))) for k, v in losses.items()} == {
        "dense_sft": 4,
        "indexer_warmup": 3,
        "sparse_sft": 2,
    }
    assert stream.position == (4 + 3 + 2) * 8


def _settings(**changes) -> dict:
    w = dataclasses.asdict(WarmStartConfig(enabled=True))
    for path, value in changes.items():
        node = w
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return {"model": "tiny", "seed": 0, "warm_start": w}


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 1},
        {"batch_size": 2},
        {"lr": 0.5},
        {"indexer_warmup__steps": 7},
        {"indexer_warmup__lr": 0.5},
        {"sparse_sft__steps": 7},
        {"sparse_sft__lr": 0.5},
        {"sparse_sft__indexer_lr": 0.5},
    ],
)
def test_cache_key_changes_with_every_stage_setting(change):
    assert cache_key(_settings(**change)) != cache_key(_settings())


def test_the_config_enters_the_cache_key(tmp_path, sparse_policy, stream):
    """A stage setting given only through `config` (not in `settings`) keys the cache."""
    paths = set()
    for lr in (1e-3, 2e-3):
        cfg = WarmStartConfig(
            steps=0,
            batch_size=4,
            lr=1e-3,
            indexer_warmup=IndexerWarmupConfig(lr=lr),
            cache_dir=str(tmp_path),
        )
        paths.add(warm_start(sparse_policy, stream, TOK, config=cfg, settings={"model": "tiny"}))
    assert len(paths) == 2


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "warm_start.indexer_warmup.stpes=3",
            r"unknown config key 'warm_start\.indexer_warmup\.stpes'; "
            r"did you mean 'warm_start\.indexer_warmup\.steps'\?",
        ),
        (
            "warm_start.indexr_warmup.steps=3",
            r"unknown config key 'warm_start\.indexr_warmup'; "
            r"did you mean 'warm_start\.indexer_warmup'\?",
        ),
        (
            "warm_start.sparse_sft.indexer_rate=1e-3",
            r"did you mean 'warm_start\.sparse_sft\.indexer_lr'\?",
        ),
        ("warm_start.sparse_sft.steps=-1", r"warm_start\.sparse_sft\.steps must be >= 0"),
        ("warm_start.indexer_warmup.lr=fast", r"warm_start\.indexer_warmup\.lr: expected float"),
        ("warm_start.sparse_sft=3", r"warm_start\.sparse_sft: expected a mapping"),
    ],
)
def test_config_errors_name_the_stage_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_stages_are_off_unless_asked_for():
    cfg = load_config(None, ["warm_start.indexer_warmup.steps=5"]).warm_start
    assert cfg.indexer_warmup.steps == 5 and cfg.indexer_warmup.lr == 1e-3
    assert cfg.sparse_sft.steps == 0 and WarmStartConfig().indexer_warmup.steps == 0
