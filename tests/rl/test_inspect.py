"""keeprl inspect: a hand-made logged step printed token by token (decoded tokens, pi_old, kept
sets, routing), its JSON matching the store, and one-line errors (exit 2) for a missing run,
step or index and for a damaged step file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rl.cli import main as cli
from rl.tokenizer import CharTokenizer
from rollout.store import RolloutStore
from rollout.trajectory import Sampling, Trajectory

TOK = CharTokenizer()


def _traj(prompt: str, response: str, index: int, *, truncated: bool = True) -> Trajectory:
    """A trajectory of decodable tokens; routing row i is [[i, i+1], [i+10, i+11]] so a test can
    tell which row was shown, and is one row short (the final token never went through the
    sampler's model)."""
    prompt_ids = [TOK.bos_id, *TOK.encode(prompt)]
    response_ids = [*TOK.encode(response), TOK.eos_id]
    n = len(response_ids)
    tokens = len(prompt_ids) + n - 1
    routing = np.array([[[i, i + 1], [i + 10, i + 11]] for i in range(tokens)], np.uint8)
    kept = [
        np.array(sorted({r, *TOK.encode("xyz")}), np.int32) if truncated else np.empty(0, np.int32)
        for r in response_ids
    ]
    return Trajectory(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        logprobs=-np.arange(1, n + 1, dtype=np.float32) / 8,  # -0.125, -0.25, ...
        routing=routing,
        kept_ids=kept,
        sampling=Sampling(temperature=0.7, top_k=4 if truncated else 0, max_tokens=8, seed=5),
        finish_reason="stop",
        engine="native",
        weight_version=2,
        prompt_index=index // 2,
        extra={"reference": str(index)},
    )


@pytest.fixture
def run(tmp_path):
    """A run directory with step 3 logged: 10 trajectories, the second untruncated and failed."""
    trajs = [_traj("3+4=", "7 ", 0), _traj("3+4=", "8", 1, truncated=False)]
    trajs += [_traj("1+1=", "2", i) for i in range(2, 10)]
    RolloutStore(tmp_path / "rollouts").write_step(
        3,
        trajs,
        rewards=[1.0, 0.0] + [0.5] * 8,
        subscores=[{"answer": 1.0, "format": None}, {}] + [{}] * 8,
        failures=[None, "verifier timed out"] + [None] * 8,
        group_ids=[30 + i // 2 for i in range(10)],
    )
    return tmp_path


def test_prints_decoded_tokens_logprobs_kept_sets_and_routing(run, capsys):
    assert cli(["inspect", str(run), "--step", "3", "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert "step 3  trajectory 0  group 30" in out and "weights v2" in out
    assert "reward 1.000  subscores {answer 1.000, format none}" in out
    assert "reference '0'" in out and "top_k=4" in out and "seed=5" in out
    assert "prompt   '3+4='" in out and "response '7 '" in out
    rows = out.splitlines()[-3:]
    # Response token t was produced at position len(prompt) - 1 + t = 4 + t: routing row 4 + t.
    first, space, eos = (r.split() for r in rows)
    assert first[:5] == ["0", str(TOK.encode("7")[0]), "'7'", "-0.1250", "4"]
    assert "'7' 'x' 'y' 'z'" in rows[0] and rows[0].endswith("4,5 | 14,15")
    assert "' '" in rows[1] and "-0.2500" in rows[1] and rows[1].endswith("5,6 | 15,16")
    assert eos[2] == "<eos>" and rows[2].endswith("6,7 | 16,17")


def test_untruncated_sampling_and_failures(run, capsys):
    assert cli(["inspect", str(run), "--step", "3", "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "failure verifier timed out" in out and "top_k=0" in out
    assert all(" all  -" in row for row in out.splitlines()[-2:])  # no kept set recorded


def test_shows_the_first_trajectories_with_a_note(run, capsys):
    assert cli(["inspect", str(run), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("showing 8 of the 10 trajectories of step 3")
    assert "trajectory 7 " in out and "trajectory 8 " not in out
    assert cli(["inspect", str(run), "--step", "3", "--limit", "0"]) == 0
    assert "trajectory 9 " in capsys.readouterr().out


def test_json_matches_the_store(run, tmp_path, capsys):
    out = tmp_path / "step3.json"
    assert cli(["inspect", str(run), "--step", "3", "--limit", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    logged = RolloutStore(run / "rollouts").read_step(3)
    assert report["step"] == 3 and report["total"] == 10 and len(report["trajectories"]) == 10
    for i, (r, t) in enumerate(zip(report["trajectories"], logged.trajectories, strict=True)):
        assert r["prompt_ids"] == t.prompt_ids and r["response_ids"] == t.response_ids
        assert (r["reward"], r["failure"], r["group_id"]) == (
            logged.rewards[i],
            logged.failures[i],
            logged.group_ids[i],
        )
        assert r["reference"] == t.extra["reference"] and r["sampling"]["seed"] == 5
        rows = r["tokens"]
        assert np.array_equal(np.array([x["logprob"] for x in rows], np.float32), t.logprobs)
        for x, kept in zip(rows, t.kept_ids, strict=True):
            assert x["kept_ids"] == kept.tolist() and x["kept_size"] == len(kept)
        start = len(t.prompt_ids) - 1
        assert [x["experts"] for x in rows] == t.routing[start:].tolist()
        assert r["response"] == TOK.decode(t.response_ids)


def test_reads_a_single_step_file(run, capsys):
    path = run / "rollouts" / "step_000003.parquet"
    assert cli(["inspect", str(path), "--index", "2"]) == 0
    assert "prompt   '1+1='" in capsys.readouterr().out
    assert cli(["inspect", str(path), "--step", "4"]) == 2
    assert "holds step 3, not step 4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "7"], "step 7 is not stored; available steps: 3"),
        (["--step", "3", "--index", "10"], "has 10 trajectories (indices 0-9)"),
        ([], "--step is required for a run directory; available steps: 3"),
    ],
)
def test_missing_step_or_index_is_one_line(run, capsys, args, message):
    assert cli(["inspect", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keeprl inspect: ") and err.count("\n") == 1 and message in err


def test_missing_run_dir_is_an_error_and_not_created(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli(["inspect", str(missing), "--step", "0"]) == 2
    assert "no such run directory or step file" in capsys.readouterr().err
    assert not missing.exists()


def test_corrupt_step_file_names_the_damage(run, capsys):
    path = run / "rollouts" / "step_000003.parquet"
    path.write_bytes(path.read_bytes()[:-20])  # a write cut short
    assert cli(["inspect", str(run), "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "truncated or corrupt" in err
