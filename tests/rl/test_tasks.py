"""Task sources and the char tokenizer."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rewards
from rl.tasks import TaskStream, load_file
from rl.tokenizer import CharTokenizer


def test_builtin_tasks_are_reproducible_and_verifiable():
    a = TaskStream("arithmetic", None, seed=3, task_kwargs={"max_operand": 9}).take(50)
    b = TaskStream("arithmetic", None, seed=3, task_kwargs={"max_operand": 9}).take(50)
    assert a == b
    verify = rewards.get("math")
    for t in a[:10]:
        assert verify(rewards.Sample(t.prompt, t.reference["answer"], t.reference))["reward"] == 1


def test_stream_resumes_where_it_stopped():
    s = TaskStream("digit_sum", None, seed=1)
    first, second = s.take(5), s.take(5)
    resumed = TaskStream("digit_sum", None, seed=1, position=5)
    assert resumed.take(5) == second and s.position == 10 and first != second


def test_jsonl_and_parquet_files(tmp_path):
    rows = [{"prompt": f"q{i}", "reference": {"answer": str(i)}} for i in range(4)]
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    pqf = tmp_path / "t.parquet"
    pq.write_table(
        pa.Table.from_pylist([{**r, "reference": json.dumps(r["reference"])} for r in rows]), pqf
    )
    for path in (jl, pqf):
        tasks = load_file(path)
        assert [t.reference["answer"] for t in tasks] == ["0", "1", "2", "3"]
        epoch = TaskStream(None, str(path), seed=0).take(8)
        assert sorted(t.prompt for t in epoch[:4]) == ["q0", "q1", "q2", "q3"]
    jl.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="needs 'prompt' and 'reference'"):
        load_file(jl)
    jl.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:1: not JSON"):
        load_file(jl)


def test_char_tokenizer_round_trip():
    tok = CharTokenizer()
    ids = tok.encode("12+30= 42")
    assert min(ids) >= 2 and tok.decode(ids + [tok.eos_id]) == "12+30= 42"
    with pytest.raises(ValueError, match="outside the char tokenizer"):
        tok.encode("é")
