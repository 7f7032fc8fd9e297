"""The Parquet rollout store: exact round trips, truncated/damaged/schema-broken files rejected
with the byte offset or column named, crash-safe writes, and the duplicate-step policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout.store import (
    ROWS_PER_GROUP,
    CorruptFileError,
    RolloutStore,
    SchemaError,
    StepExistsError,
    read_file,
)
from rollout.trajectory import Sampling, Trajectory


def make_traj(
    rng: np.random.Generator,
    *,
    n_prompt: int = 4,
    n_resp: int = 3,
    experts: int = 16,
    short: bool = False,
    truncated: bool = True,
    index: int = 0,
) -> Trajectory:
    """A trajectory with every field exercised: uint8 or int16 routing (experts > 256),
    routing one row short of the tokens, empty or non-empty kept sets."""
    tokens = n_prompt + n_resp - int(short)
    routing = rng.integers(0, experts, size=(tokens, 3, 2))
    kept = [
        np.sort(rng.choice(1000, size=int(rng.integers(1, 6)), replace=False)).astype(np.int32)
        if truncated
        else np.empty(0, np.int32)
        for _ in range(n_resp)
    ]
    return Trajectory(
        prompt_ids=rng.integers(0, 1000, n_prompt).tolist(),
        response_ids=rng.integers(0, 1000, n_resp).tolist(),
        logprobs=-rng.random(n_resp, dtype=np.float32),
        routing=routing.astype(np.uint8 if experts <= 256 else np.int16),
        kept_ids=kept,
        sampling=Sampling(
            temperature=0.7, top_k=5 if truncated else 0, max_tokens=9, seed=index or None
        ),
        finish_reason="stop" if index % 2 else "length",
        engine="native",
        weight_version=3,
        prompt_index=index // 2,
        extra={"worker": index % 3, "tags": ["a", "b"]} if index % 4 else {},
    )


def assert_same(a: Trajectory, b: Trajectory) -> None:
    assert a.prompt_ids == b.prompt_ids and a.response_ids == b.response_ids
    for x, y in [(a.logprobs, b.logprobs), (a.routing, b.routing)]:
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
        assert y.flags.writeable
    assert len(a.kept_ids) == len(b.kept_ids)
    for x, y in zip(a.kept_ids, b.kept_ids, strict=True):
        assert x.dtype == y.dtype == np.int32 and np.array_equal(x, y)
    for name in ("sampling", "finish_reason", "engine", "weight_version", "prompt_index", "extra"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.fixture
def store(tmp_path):
    return RolloutStore(tmp_path / "rollouts")


@pytest.fixture
def trajs():
    rng = np.random.default_rng(0)
    shapes = [
        dict(),
        dict(experts=300),  # int16 routing
        dict(short=True),  # the last token never went through the model
        dict(truncated=False),  # empty kept sets
        dict(n_resp=1, experts=300, short=True, truncated=False),
    ]
    # More rows than one row group, so multi-batch reading is exercised too.
    return [make_traj(rng, index=i, **shapes[i % len(shapes)]) for i in range(ROWS_PER_GROUP + 6)]


def test_round_trip_is_exact(store, trajs):
    n = len(trajs)
    rewards = [None if i % 7 == 0 else i / 3 for i in range(n)]
    subscores = [{"format": 1.0, "answer": None} if i % 2 else None for i in range(n)]
    failures = [f"timeout after {i}s" if i % 5 == 0 else None for i in range(n)]
    groups = [100 + i // 4 for i in range(n)]
    path = store.write_step(
        42, trajs, rewards=rewards, subscores=subscores, failures=failures, group_ids=groups
    )
    assert path.name == "step_000042.parquet" and store.steps() == [42]
    got = store.read_step(42)
    assert got.step == 42 and len(got.trajectories) == n
    for a, b in zip(trajs, got.trajectories, strict=True):
        assert_same(a, b)
    assert {t.routing.dtype for t in got.trajectories} == {np.dtype(np.uint8), np.dtype(np.int16)}
    assert got.rewards == rewards and got.failures == failures and got.group_ids == groups
    assert got.subscores == [s or {} for s in subscores]
    # Defaults: one group per prompt, nothing scored yet.
    store.write_step(43, trajs[:3])
    plain = store.read_step(43)
    assert plain.group_ids == [t.prompt_index for t in trajs[:3]]
    assert plain.rewards == [None] * 3 and plain.subscores == [{}] * 3


def test_round_trip_of_real_native_engine_output(store, tmp_path):
    import torch

    import policy
    from rollout.native import NativeEngine

    torch.manual_seed(0)
    policy.save_pretrained(policy.Transformer(policy.preset("tiny")), tmp_path / "ckpt")
    engine = NativeEngine(tmp_path / "ckpt")
    out = engine.generate([[1, 2, 3], [4]], Sampling(top_p=0.8, top_k=20, max_tokens=5), n=2)
    store.write_step(0, out, rewards=[1.0, 0.0, 0.5, None])
    for a, b in zip(out, store.read_step(0).trajectories, strict=True):
        assert_same(a, b)


def test_an_empty_step_round_trips(store):
    store.write_step(5, [])
    assert store.read_step(5).trajectories == [] and store.steps() == [5]


@pytest.mark.parametrize("cut", [1, 4, 8, 100, "half", "all-but-11"])
def test_a_truncated_file_is_rejected_naming_file_and_offset(store, trajs, cut):
    path = store.write_step(1, trajs)
    data = path.read_bytes()
    keep = (
        {"half": len(data) // 2, "all-but-11": 11}[cut] if isinstance(cut, str) else len(data) - cut
    )
    path.write_bytes(data[:keep])
    with pytest.raises(CorruptFileError, match="byte offset") as e:
        store.read_step(1)
    assert str(path) in str(e.value) and e.value.path == path
    assert e.value.offset == (keep - 4 if keep >= 12 else keep)


def test_a_damaged_column_chunk_is_named_with_its_offset(store, trajs):
    path = store.write_step(1, trajs)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(6)  # 'routing'
    assert chunk.path_in_schema == "routing"
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + chunk.total_compressed_size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="column 'routing'") as e:
        read_file(path)
    assert e.value.column == "routing" and e.value.offset == start


def rewrite(path, table: pa.Table, metadata: dict | None = None) -> None:
    """Write `table` over `path` with its keeprl metadata (changed by `metadata`)."""
    meta = dict(table.schema.metadata or {}) | (metadata or {})
    pq.write_table(table.replace_schema_metadata(meta), path)


@pytest.mark.parametrize(
    "breakage,column",
    [
        ("drop reward", "reward"),
        ("drop routing_shape", "routing_shape"),
        ("logprobs as float64", "logprobs"),
        ("kept_ids as int64", "kept_ids"),
        ("extra column", "surprise"),
        ("version 2", "keeprl.schema_version"),
        ("no version", "keeprl.schema_version"),
        ("routing_shape wrong", "routing_shape"),
        ("routing bytes short", "routing"),
        ("routing dtype int64", "routing_dtype"),
    ],
)
def test_a_schema_broken_file_names_the_column(store, trajs, breakage, column):
    path = store.write_step(2, trajs)
    t = pq.read_table(path)
    meta = None
    if breakage.startswith("drop"):
        t = t.drop_columns([column])
    elif breakage == "logprobs as float64":
        t = t.set_column(5, "logprobs", t["logprobs"].cast(pa.list_(pa.float64())))
    elif breakage == "kept_ids as int64":
        t = t.set_column(9, column, t[column].cast(pa.list_(pa.list_(pa.int64()))))
    elif breakage == "extra column":
        t = t.append_column("surprise", pa.array([0] * t.num_rows))
    elif breakage == "version 2":
        meta = {b"keeprl.schema_version": b"2"}
    elif breakage == "no version":
        t = t.replace_schema_metadata({b"keeprl.step": b"2"})
    elif breakage == "routing_shape wrong":
        t = t.set_column(7, column, pa.array([[1, 2, 3]] * t.num_rows, pa.list_(pa.int32())))
    elif breakage == "routing bytes short":
        t = t.set_column(6, column, pa.array([b"\x00"] * t.num_rows, pa.large_binary()))
    elif breakage == "routing dtype int64":
        t = t.set_column(8, column, pa.array(["int64"] * t.num_rows))
    rewrite(path, t, meta)
    with pytest.raises(SchemaError, match=f"'{column}'") as e:
        store.read_step(2)
    assert e.value.column == column and str(path) in str(e.value)


def test_a_write_that_dies_before_the_rename_leaves_no_step(store, trajs, tmp_path):
    # A real crash: the writing process exits between fsync and rename.
    script = textwrap.dedent(
        f"""
        import os, pickle, sys
        from rollout.store import RolloutStore
        trajs = pickle.loads(sys.stdin.buffer.read())
        os.link = os.replace = lambda *a, **k: os._exit(3)
        RolloutStore({str(store.directory)!r}).write_step(7, trajs)
        """
    )
    import pickle

    proc = subprocess.run(
        [sys.executable, "-c", script], input=pickle.dumps(trajs), capture_output=True
    )
    assert proc.returncode == 3, proc.stderr.decode()
    leftovers = [p for p in store.directory.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".step_000007.parquet.")
    assert leftovers[0].stat().st_size > 0  # a complete-looking temp file ...
    assert store.steps() == [] and not store.has_step(7)  # ... is not a step
    with pytest.raises(FileNotFoundError, match="step 7 is not stored"):
        store.read_step(7)
    assert store.clean_temp_files() == leftovers and list(store.directory.iterdir()) == []
    store.write_step(7, trajs)
    assert store.steps() == [7]


def test_a_failed_write_cleans_its_temp_file(store, trajs, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "link", fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_step(3, trajs)
    assert list(store.directory.iterdir()) == []


def test_duplicate_steps_are_idempotent_or_refused(store, trajs):
    path = store.write_step(4, trajs, rewards=[1.0] * len(trajs))
    inode = path.stat().st_ino
    # The same content again (a retried write): a no-op, the file untouched.
    assert store.write_step(4, trajs, rewards=[1.0] * len(trajs)) == path
    assert path.stat().st_ino == inode
    # Different content: refused, naming the file; the stored step is unchanged.
    with pytest.raises(StepExistsError, match="step_000004.parquet.*different content"):
        store.write_step(4, trajs, rewards=[0.0] * len(trajs))
    assert store.read_step(4).rewards == [1.0] * len(trajs)
    # An explicit overwrite replaces it atomically.
    store.write_step(4, trajs[:2], overwrite=True)
    assert len(store.read_step(4).trajectories) == 2
    # Resume support: steps after the restored one are discarded.
    for step in (5, 6, 7):
        store.write_step(step, trajs[:1])
    assert [p.name for p in store.discard_after(5)] == [
        "step_000006.parquet",
        "step_000007.parquet",
    ]
    assert store.steps() == [4, 5]


def test_steps_ignore_foreign_and_temp_files(store, trajs):
    store.write_step(12, trajs[:1])
    store.write_step(3, trajs[:1])
    (store.directory / "notes.txt").write_text("x")
    (store.directory / ".step_000009.parquet.abc.tmp").write_bytes(b"PAR1")
    assert store.steps() == [3, 12]
    assert [p.name for p in store.clean_temp_files()] == [".step_000009.parquet.abc.tmp"]


def test_a_step_file_under_the_wrong_name_is_refused(store, trajs):
    store.write_step(1, trajs[:1])
    os.rename(store.path(1), store.path(2))
    with pytest.raises(SchemaError, match="holds step 1, not 2"):
        store.read_step(2)


def test_writes_refuse_what_would_not_round_trip(store, trajs):
    t = trajs[0]
    bad = [
        (dict(logprobs=t.logprobs.astype(np.float64)), TypeError, "logprobs must be 1-D float32"),
        (dict(routing=t.routing.astype(np.int64)), TypeError, "routing dtype int64"),
        (dict(kept_ids=[k.astype(np.int64) for k in t.kept_ids]), TypeError, "kept_ids"),
        (dict(extra={"pair": (1, 2)}), ValueError, "does not survive JSON"),
    ]
    for change, error, message in bad:
        broken = Trajectory(**(vars(t) | change))
        with pytest.raises(error, match=message):
            store.write_step(0, [t, broken])
    with pytest.raises(ValueError, match="rewards: 1 values for 2 trajectories"):
        store.write_step(0, trajs[:2], rewards=[1.0])
    assert store.steps() == []


_FLIP_SWEEP = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from rollout.store import RolloutFileError, _GUARD_SIZE, read_file, read_table
    path = Path(sys.argv[1])
    good, table = path.read_bytes(), read_table(path)
    footer_len = int.from_bytes(good[-8:-4], "little")
    start = len(good) - 8 - footer_len - _GUARD_SIZE  # the guard, the footer and the tail
    errors, silent = set(), []
    for byte in range(start, len(good)):
        for bit in range(8):
            bad = bytearray(good)
            bad[byte] ^= 1 << bit
            path.write_bytes(bad)
            try:
                read_file(path)
            except RolloutFileError as e:
                assert "\\n" not in str(e) and str(path) in str(e), str(e)
                errors.add(type(e).__name__)
                continue
            if not read_table(path).equals(table):  # read back as something else: silent
                silent.append((byte, bit))
    print(json.dumps({"flips": 8 * (len(good) - start), "silent": silent, "kinds": sorted(errors)}))
    """
)


def test_every_bit_flip_in_the_footer_is_a_one_line_error(store, trajs):
    # pyarrow aborts the whole process on some damaged footers (exit 134), so the sweep runs
    # in a child: without the footer guard it died, or raised a bare KeyError, on a few flips.
    # A flip may pass only where it changes nothing read (the guard's own magic: the file is
    # then read as an unguarded Parquet file, whose footer is intact).
    path = store.write_step(1, trajs[:4])
    done = subprocess.run(
        [sys.executable, "-c", _FLIP_SWEEP, str(path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["flips"] > 1000 and report["silent"] == [], report
