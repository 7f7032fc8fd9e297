"""The Parquet rollout store: one schema-versioned file of trajectories per training step.

`RolloutStore(dir).write_step(step, trajectories, rewards=..., subscores=...)` writes
`<dir>/step_000042.parquet`; `read_step(step)` gives the trajectories back exactly (numpy
dtypes included) with the trainer's columns (group id, reward, verifier sub-scores, failure).

Crash safety. A step is written to a hidden temp name in the same directory, flushed and
fsynced, then renamed into place (and the directory fsynced), so a step file either holds a
complete table or does not exist. Temp files a crash leaves behind never match `step_*.parquet`;
`clean_temp_files()` removes them.

Duplicate steps. Step files are append-only: writing a step that exists is a no-op when the
content is identical (so retrying a write whose outcome is unknown is safe) and a
`StepExistsError` otherwise; `overwrite=True` replaces it atomically. On resume from a
checkpoint that has seen steps up to s, the trainer calls `discard_after(s)`: the later steps
the crashed run stored are regenerated and written again, so no step is lost or duplicated.

Representation. Token ids, log-probs and kept ids are Arrow lists (list<int32>,
list<float32>, list<list<int32>>; an empty kept set is an empty list). Routing
[tokens, n_moe_layers, top_k] is the raw little-endian bytes of its uint8/int16 array with
the shape and dtype in their own columns: exact, 1-2 bytes per expert id, and one memcpy each
way, where a triply nested list would add an offset per token and per layer and Parquet
repetition levels per id. Sampling parameters are a struct, sub-scores a map<string, float64>,
`extra` the JSON of Trajectory.extra. The reader validates bytes (magic, footer, column-chunk
extents, page checksums), then the schema version and every column's type, then values, and
names the file and the byte offset or column that is wrong.

Footer guard. Parquet checksums pages but not its footer, and pyarrow can abort the whole
process on some corrupt footers (a flipped bit, seen in a flip-every-bit sweep). So the writer
puts a 44-byte block between the data and the footer, which Parquet readers never look at:
b"KEEPRLFG", the footer's length and the SHA-256 of the footer. The reader checks it before it
lets pyarrow parse the footer; a file without the block (written elsewhere) is read unguarded.

(Longer than the ~500 lines the style guide aims for, on purpose: the writer and the reader
share the schema, its byte layout and its invariants, and a reader's check sits next to the
writer's choice it checks.)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .trajectory import Sampling, Trajectory

SCHEMA_VERSION = 1
VERSION_KEY = b"keeprl.schema_version"
STEP_KEY = b"keeprl.step"
ROWS_PER_GROUP = 64  # bounds Arrow list offsets per batch and lets readers skip row groups
ROUTING_DTYPES = {"uint8": np.dtype("u1"), "int16": np.dtype("<i2")}
_MAGIC = b"PAR1"
_GUARD_MAGIC = b"KEEPRLFG"
_GUARD_SIZE = len(_GUARD_MAGIC) + 4 + 32  # magic, footer length (u32 LE), SHA-256 of the footer
_STEP_FILE = re.compile(r"^step_(\d+)\.parquet$")
_TEMP_SUFFIX = ".tmp"
_WRITE_OPTIONS: dict[str, Any] = {
    "row_group_size": ROWS_PER_GROUP,
    "compression": "zstd",
    # Only these strings repeat enough for a dictionary to pay; routing blobs never do.
    "use_dictionary": ["routing_dtype", "finish_reason", "engine"],
    "write_page_checksum": True,  # lets the reader tell a flipped bit from a valid value
}

_SAMPLING = pa.struct(
    [
        pa.field("temperature", pa.float64(), nullable=False),
        pa.field("top_p", pa.float64(), nullable=False),
        pa.field("top_k", pa.int64(), nullable=False),
        pa.field("max_tokens", pa.int64(), nullable=False),
        pa.field("seed", pa.int64()),
        pa.field("stop_token_ids", pa.list_(pa.int64()), nullable=False),
    ]
)
SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("group_id", pa.int64(), nullable=False),
        pa.field("prompt_index", pa.int64(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("routing", pa.large_binary(), nullable=False),
        pa.field("routing_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("routing_dtype", pa.string(), nullable=False),
        pa.field("kept_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("sampling", _SAMPLING, nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("engine", pa.string(), nullable=False),
        pa.field("weight_version", pa.int64(), nullable=False),
        pa.field("reward", pa.float64()),  # null: not scored
        pa.field("subscores", pa.map_(pa.string(), pa.float64()), nullable=False),
        pa.field("failure", pa.string()),  # null: the verifier ran cleanly
        pa.field("extra", pa.string(), nullable=False),
    ]
)


class RolloutFileError(ValueError):
    """A rollout file that cannot be trusted; the message names the file and what is wrong."""

    def __init__(
        self, path: Path, what: str, *, column: str | None = None, offset: int | None = None
    ) -> None:
        super().__init__(f"{path}: {what}")
        self.path, self.column, self.offset = path, column, offset


class CorruptFileError(RolloutFileError):
    """Bytes are missing or damaged (a truncated write, a flipped bit); `offset` says where."""


class SchemaError(RolloutFileError):
    """A column is missing, mistyped or holds impossible values, or the schema version is not
    this reader's; `column` names it."""


class StepExistsError(FileExistsError):
    """The step is already stored with different content."""


@dataclass
class StepRollouts:
    """One stored step: the trajectories and, row for row, the trainer's columns."""

    step: int
    trajectories: list[Trajectory]
    group_ids: list[int]
    rewards: list[float | None]
    subscores: list[dict[str, float | None]]
    failures: list[str | None]


class RolloutStore:
    """A directory of step files, `step_000042.parquet`, one per training step."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        """Where step `step` lives (whether or not it is written yet)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.directory / f"step_{step:06d}.parquet"

    def steps(self) -> list[int]:
        """Stored steps, ascending. Temp files and foreign files are not steps."""
        found = (_STEP_FILE.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def has_step(self, step: int) -> bool:
        return self.path(step).exists()

    def write_step(
        self,
        step: int,
        trajectories: Sequence[Trajectory],
        *,
        rewards: Sequence[float | None] | None = None,
        subscores: Sequence[dict[str, float | None] | None] | None = None,
        failures: Sequence[str | None] | None = None,
        group_ids: Sequence[int] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Store one step atomically and return its path.

        group_ids default to each trajectory's prompt_index (one GRPO group per prompt);
        rewards default to null (not scored), sub-scores to empty, failures to null. An
        existing step is left alone when identical, replaced with overwrite=True, and is a
        StepExistsError otherwise.
        """
        table = build_table(step, trajectories, rewards, subscores, failures, group_ids)
        final = self.path(step)
        if final.exists() and not overwrite:
            return self._existing(final, table)
        tmp = self.directory / f".{final.name}.{uuid.uuid4().hex}{_TEMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(guarded_parquet(table))
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, final)
            else:
                try:  # link() refuses to clobber: a racing writer of the same step cannot win
                    os.link(tmp, final)
                except FileExistsError:
                    return self._existing(final, table)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        return final

    def _existing(self, final: Path, table: pa.Table) -> Path:
        if read_table(final).equals(table):
            return final
        raise StepExistsError(
            f"{final}: step already stored with different content; the store is append-only "
            "(pass overwrite=True to replace it, or discard_after() when resuming)"
        )

    def read_step(self, step: int) -> StepRollouts:
        """The validated content of one step (FileNotFoundError when it is not stored)."""
        path = self.path(step)
        if not path.exists():
            raise FileNotFoundError(f"{path}: step {step} is not stored")
        rollouts = read_file(path)
        if rollouts.step != step:
            raise SchemaError(path, f"holds step {rollouts.step}, not {step}", column="step")
        return rollouts

    def discard_after(self, step: int) -> list[Path]:
        """Delete every stored step after `step` (resume support); returns the removed paths."""
        removed = [self.path(s) for s in self.steps() if s > step]
        for p in removed:
            p.unlink()
        if removed:
            _fsync_dir(self.directory)
        return removed

    def clean_temp_files(self) -> list[Path]:
        """Remove temp files left by crashed writes. Call it only when no other process is
        writing to this directory (e.g. at trainer start)."""
        stale = sorted(self.directory.glob(f".step_*{_TEMP_SUFFIX}"))
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- writing -----------------------------------------------------------------------------


def _per_row(values: Sequence[Any] | None, n: int, name: str, default: Any) -> list[Any]:
    if values is None:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} trajectories")
    return list(values)


def _check_trajectory(i: int, t: Trajectory) -> None:
    """The dtypes Trajectory documents, so that what is read back is what was written."""
    if t.logprobs.dtype != np.float32 or t.logprobs.ndim != 1:
        raise TypeError(f"trajectory {i}: logprobs must be 1-D float32, got {t.logprobs.dtype}")
    if t.routing.dtype.name not in ROUTING_DTYPES:
        raise TypeError(
            f"trajectory {i}: routing dtype {t.routing.dtype} is not uint8 or int16 "
            "(rollout.compact_routing makes it so)"
        )
    for j, k in enumerate(t.kept_ids):
        if k.dtype != np.int32 or k.ndim != 1:
            raise TypeError(f"trajectory {i}: kept_ids[{j}] must be 1-D int32, got {k.dtype}")
    for name in ("prompt_ids", "response_ids"):
        ids = np.asarray(getattr(t, name), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError(f"trajectory {i}: {name} holds ids outside [0, 2**31)")


def _extra_json(i: int, extra: dict[str, Any]) -> str:
    """JSON of Trajectory.extra, refused when reading it back would not give it back."""
    text = json.dumps(extra, sort_keys=True)
    if json.loads(text) != extra:
        raise ValueError(
            f"trajectory {i}: extra {extra!r} does not survive JSON unchanged (tuples, "
            "non-string keys?); store lists and string keys"
        )
    return text


def _list_array(arrays: list[np.ndarray], dtype: np.dtype) -> pa.Array:
    """list<dtype> from 1-D numpy arrays, built from one concatenation and its offsets."""
    offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int64)
    if offsets[-1] > np.iinfo(np.int32).max:  # Arrow list offsets are int32
        raise ValueError(f"{offsets[-1]} values in one row group; lower ROWS_PER_GROUP")
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))


def _batch(step: int, rows: list[tuple[Any, ...]]) -> pa.RecordBatch:
    """Rows of (trajectory, group id, reward, sub-scores, failure, extra JSON)."""
    trajs = [r[0] for r in rows]
    columns = {
        "step": pa.array([step] * len(rows), pa.int64()),
        "group_id": pa.array([r[1] for r in rows], pa.int64()),
        "prompt_index": pa.array([t.prompt_index for t in trajs], pa.int64()),
        "prompt_ids": _list_array([np.asarray(t.prompt_ids, np.int64) for t in trajs], np.int32),
        "response_ids": _list_array(
            [np.asarray(t.response_ids, np.int64) for t in trajs], np.int32
        ),
        "logprobs": _list_array([t.logprobs for t in trajs], np.float32),
        "routing": pa.array([_routing_bytes(t.routing) for t in trajs], pa.large_binary()),
        "routing_shape": pa.array([list(t.routing.shape) for t in trajs], pa.list_(pa.int32())),
        "routing_dtype": pa.array([t.routing.dtype.name for t in trajs], pa.string()),
        "kept_ids": pa.ListArray.from_arrays(
            pa.array(np.cumsum([0] + [len(t.kept_ids) for t in trajs], dtype=np.int32)),
            _list_array([k for t in trajs for k in t.kept_ids], np.int32),
        ),
        "sampling": pa.array([asdict(t.sampling) for t in trajs], _SAMPLING),
        "finish_reason": pa.array([t.finish_reason for t in trajs], pa.string()),
        "engine": pa.array([t.engine for t in trajs], pa.string()),
        "weight_version": pa.array([t.weight_version for t in trajs], pa.int64()),
        "reward": pa.array([r[2] for r in rows], pa.float64()),
        "subscores": pa.array([list(r[3].items()) for r in rows], SCHEMA.field("subscores").type),
        "failure": pa.array([r[4] for r in rows], pa.string()),
        "extra": pa.array([r[5] for r in rows], pa.string()),
    }
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=SCHEMA)


def _routing_bytes(routing: np.ndarray) -> bytes:
    """C-order, little-endian bytes: the same file reads the same on any machine."""
    return np.ascontiguousarray(routing, ROUTING_DTYPES[routing.dtype.name]).tobytes()


def guarded_parquet(table: pa.Table) -> bytes:
    """The Parquet bytes of `table` with the footer guard (module docstring) spliced in."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **_WRITE_OPTIONS)
    data = buf.getvalue()
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    footer = data[start : len(data) - 8]
    guard = _GUARD_MAGIC + footer_len.to_bytes(4, "little") + hashlib.sha256(footer).digest()
    return data[:start] + guard + data[start:]


def build_table(
    step: int,
    trajectories: Sequence[Trajectory],
    rewards: Sequence[float | None] | None = None,
    subscores: Sequence[dict[str, float | None] | None] | None = None,
    failures: Sequence[str | None] | None = None,
    group_ids: Sequence[int] | None = None,
) -> pa.Table:
    """The Arrow table write_step stores (schema version and step in its metadata)."""
    n = len(trajectories)
    for i, t in enumerate(trajectories):
        _check_trajectory(i, t)
    extras = [_extra_json(i, t.extra) for i, t in enumerate(trajectories)]
    groups = group_ids if group_ids is not None else [t.prompt_index for t in trajectories]
    rows = list(
        zip(
            trajectories,
            _per_row(groups, n, "group_ids", None),
            [None if r is None else float(r) for r in _per_row(rewards, n, "rewards", None)],
            [
                {k: None if v is None else float(v) for k, v in (s or {}).items()}
                for s in _per_row(subscores, n, "subscores", None)
            ],
            _per_row(failures, n, "failures", None),
            extras,
            strict=True,
        )
    )
    batches = [_batch(step, rows[i : i + ROWS_PER_GROUP]) for i in range(0, n, ROWS_PER_GROUP)]
    meta = {VERSION_KEY: str(SCHEMA_VERSION).encode(), STEP_KEY: str(step).encode()}
    return pa.Table.from_batches(batches, schema=SCHEMA.with_metadata(meta))


# --- reading -----------------------------------------------------------------------------


def read_file(path: str | Path) -> StepRollouts:
    """Read and validate one step file (any path: `keeprl replay` reads copies too)."""
    path = Path(path)
    table = read_table(path)
    step = int(table.schema.metadata[STEP_KEY])
    out = StepRollouts(step, [], [], [], [], [])
    for batch in table.to_batches():
        _read_batch(path, batch, step, out)
    return out


def read_table(path: str | Path) -> pa.Table:
    """The step file as an Arrow table, after its bytes and schema are validated."""
    path = Path(path)
    pf = _open_checked(path)
    try:
        _check_schema(path, pf.schema_arrow)
        try:
            return pf.read()
        except (pa.ArrowException, OSError) as e:
            raise _locate_damage(path, pf, e) from e
    finally:
        pf.close()


def _open_checked(path: Path) -> pq.ParquetFile:
    """Open a Parquet file whose container is intact: both magics, a footer that fits, and
    column chunks that lie between them. A write cut short fails here, naming the offset."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 8, 0))
        tail = f.read(8)
    if size < 12:
        raise CorruptFileError(
            path,
            f"truncated: the file ends at byte offset {size}, too short for Parquet "
            "(magics and footer length need 12 bytes)",
            offset=size,
        )
    if head != _MAGIC:
        raise CorruptFileError(path, f"no 'PAR1' magic at byte offset 0 (found {head!r})", offset=0)
    if tail[4:] != _MAGIC:
        raise CorruptFileError(
            path,
            f"truncated or corrupt: no 'PAR1' end magic at byte offset {size - 4} of this "
            f"{size}-byte file (found {tail[4:]!r})",
            offset=size - 4,
        )
    footer_len = int.from_bytes(tail[:4], "little")
    footer_start = size - 8 - footer_len
    if footer_start < 4:
        raise CorruptFileError(
            path,
            f"footer length {footer_len} read at byte offset {size - 8} exceeds the "
            f"{size - 12} bytes before it",
            offset=size - 8,
        )
    _check_guard(path, size, footer_len, footer_start)
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise CorruptFileError(
            path, f"unreadable footer at byte offset {footer_start}: {e}", offset=footer_start
        ) from e
    md = pf.metadata
    for i in range(md.num_row_groups):
        for j in range(md.num_columns):
            c = md.row_group(i).column(j)
            start = _chunk_start(c)
            end = start + c.total_compressed_size
            if c.total_compressed_size and (start < 4 or end > footer_start):
                pf.close()
                raise CorruptFileError(
                    path,
                    f"row group {i}, column '{c.path_in_schema}': bytes [{start}, {end}) lie "
                    f"outside the data region [4, {footer_start})",
                    offset=start,
                    column=c.path_in_schema.split(".")[0],
                )
    return pf


def _check_guard(path: Path, size: int, footer_len: int, footer_start: int) -> None:
    """CorruptFileError unless the footer matches its guard (files without one pass)."""
    with open(path, "rb") as f:
        f.seek(max(footer_start - _GUARD_SIZE, 0))
        guard = f.read(_GUARD_SIZE)
        if guard[: len(_GUARD_MAGIC)] != _GUARD_MAGIC:
            # The footer length may be what is damaged: look for the guard elsewhere.
            f.seek(0)
            at = f.read().rfind(_GUARD_MAGIC)
            if at < 0:
                return  # no guard: written by another Parquet writer
            raise CorruptFileError(
                path,
                f"footer length {footer_len} at byte offset {size - 8} does not match the "
                f"footer guard at byte offset {at}: the end of the file is damaged",
                offset=size - 8,
            )
        f.seek(footer_start)
        footer = f.read(footer_len)
    recorded = int.from_bytes(guard[8:12], "little")
    if recorded != footer_len or hashlib.sha256(footer).digest() != guard[12:]:
        raise CorruptFileError(
            path,
            f"footer at byte offset {footer_start} ({footer_len} bytes) is damaged: it does not "
            "match its SHA-256 guard",
            offset=footer_start,
        )


def _chunk_start(c: pq.ColumnChunkMetaData) -> int:
    return c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset


def _locate_damage(path: Path, pf: pq.ParquetFile, error: Exception) -> CorruptFileError:
    """Re-read column chunk by column chunk to say which one is damaged, and where."""
    md = pf.metadata
    for i in range(md.num_row_groups):
        for j in range(md.num_columns):
            c = md.row_group(i).column(j)
            name = c.path_in_schema.split(".")[0]
            try:
                pf.read_row_group(i, columns=[name])
            except (pa.ArrowException, OSError) as e:
                start = _chunk_start(c)
                return CorruptFileError(
                    path,
                    f"row group {i}, column '{name}' (chunk at byte offset {start}, "
                    f"{c.total_compressed_size} bytes) is damaged: {e}",
                    offset=start,
                    column=name,
                )
    return CorruptFileError(path, f"unreadable data: {error}")


def _check_schema(path: Path, schema: pa.Schema) -> None:
    """Schema version, then every column's presence and type, then no unknown columns."""
    meta = schema.metadata or {}
    key = VERSION_KEY.decode()
    if VERSION_KEY not in meta:
        raise SchemaError(
            path, f"no '{key}' in the Parquet metadata: not a keeprl rollout file", column=key
        )
    if meta[VERSION_KEY] != str(SCHEMA_VERSION).encode():
        raise SchemaError(
            path,
            f"schema version {meta[VERSION_KEY].decode(errors='replace')!r} (metadata '{key}'); "
            f"this reader reads version {SCHEMA_VERSION}",
            column=key,
        )
    if STEP_KEY not in meta or not meta[STEP_KEY].isdigit():
        raise SchemaError(path, f"no step number in metadata '{STEP_KEY.decode()}'", column="step")
    for want in SCHEMA:
        where = schema.get_all_field_indices(want.name)
        if len(where) != 1:
            what = "is missing" if not where else f"appears {len(where)} times"
            raise SchemaError(
                path, f"column '{want.name}' {what} (expected {want.type})", column=want.name
            )
        got = schema.field(where[0])
        if not got.type.equals(want.type) or got.nullable != want.nullable:
            raise SchemaError(
                path,
                f"column '{want.name}' has type {got.type}{'' if got.nullable else ' not null'}, "
                f"expected {want.type}{'' if want.nullable else ' not null'}",
                column=want.name,
            )
    for name in schema.names:
        if SCHEMA.get_field_index(name) < 0:
            raise SchemaError(
                path, f"unexpected column '{name}' in schema version {SCHEMA_VERSION}", column=name
            )


def _lists(path: Path, batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, pa.Array]:
    """(offsets, child values) of a list column; a null element is a schema error."""
    arr = batch.column(name)
    if arr.values.null_count:
        raise SchemaError(path, f"column '{name}' holds null elements", column=name)
    return arr.offsets.to_numpy(), arr.values


def _read_batch(path: Path, batch: pa.RecordBatch, step: int, out: StepRollouts) -> None:
    """Append one record batch's rows to `out`, checking what the schema cannot express."""
    row0 = len(out.trajectories)
    po, pv = _lists(path, batch, "prompt_ids")
    ro, rv = _lists(path, batch, "response_ids")
    lo, lv = _lists(path, batch, "logprobs")
    ko, kv = _lists(path, batch, "kept_ids")
    pv, rv = pv.to_numpy(), rv.to_numpy()
    lv = lv.to_numpy().copy()  # one copy makes every row's slice writable
    if kv.null_count:
        raise SchemaError(path, "column 'kept_ids' holds null kept sets", column="kept_ids")
    kio, kiv = kv.offsets.to_numpy(), kv.values.to_numpy().copy()
    cols = {
        name: batch.column(name).to_pylist()
        for name in ("step", "group_id", "prompt_index", "sampling", "finish_reason")
        + ("engine", "weight_version", "reward", "subscores", "failure", "extra")
    }
    for r in range(batch.num_rows):
        row = row0 + r

        def bad(column: str, what: str, row: int = row) -> SchemaError:
            return SchemaError(path, f"row {row}: column '{column}' {what}", column=column)

        if cols["step"][r] != step:
            raise bad("step", f"says step {cols['step'][r]}, the file's metadata says {step}")
        prompt, response = pv[po[r] : po[r + 1]].tolist(), rv[ro[r] : ro[r + 1]].tolist()
        if lo[r + 1] - lo[r] != len(response):
            raise bad("logprobs", f"has {lo[r + 1] - lo[r]} entries for {len(response)} tokens")
        if ko[r + 1] - ko[r] != len(response):
            raise bad("kept_ids", f"has {ko[r + 1] - ko[r]} sets for {len(response)} tokens")
        kept = [kiv[kio[j] : kio[j + 1]] for j in range(ko[r], ko[r + 1])]
        routing = _routing_of(batch, r, len(prompt) + len(response), bad)
        sampling, extra = _objects_of(cols["sampling"][r], cols["extra"][r], bad)
        out.trajectories.append(
            Trajectory(
                prompt_ids=prompt,
                response_ids=response,
                logprobs=lv[lo[r] : lo[r + 1]],
                routing=routing,
                kept_ids=kept,
                sampling=sampling,
                finish_reason=cols["finish_reason"][r],
                engine=cols["engine"][r],
                weight_version=cols["weight_version"][r],
                prompt_index=cols["prompt_index"][r],
                extra=extra,
            )
        )
        out.group_ids.append(cols["group_id"][r])
        out.rewards.append(cols["reward"][r])
        out.subscores.append(dict(cols["subscores"][r]))
        out.failures.append(cols["failure"][r])


def _objects_of(sampling: dict[str, Any], extra: str, bad: Any) -> tuple[Sampling, dict]:
    """The Sampling record and the extra dict of one row."""
    try:
        params = Sampling(**sampling | {"stop_token_ids": tuple(sampling["stop_token_ids"])})
    except (ValueError, TypeError) as e:
        raise bad("sampling", f"is invalid: {e}") from e
    try:
        obj = json.loads(extra)
    except ValueError as e:
        raise bad("extra", f"is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise bad("extra", "is not a JSON object")
    return params, obj


def _routing_of(batch: pa.RecordBatch, r: int, total: int, bad: Any) -> np.ndarray:
    """Row r's routing array from its bytes, shape and dtype, each checked."""
    name = batch.column("routing_dtype")[r].as_py()
    if name not in ROUTING_DTYPES:
        raise bad("routing_dtype", f"is {name!r}, not one of {sorted(ROUTING_DTYPES)}")
    shape = tuple(batch.column("routing_shape")[r].as_py())
    if len(shape) != 3 or min(shape) < 0 or shape[0] not in (total, total - 1):
        raise bad("routing_shape", f"is {list(shape)}: not [{total} or {total - 1}, layers, k]")
    buf = batch.column("routing")[r].as_buffer()
    dtype = ROUTING_DTYPES[name]
    need = math.prod(shape) * dtype.itemsize
    if need != buf.size:
        raise bad("routing", f"has {buf.size} bytes; {name} of shape {list(shape)} needs {need}")
    return np.frombuffer(buf, dtype).reshape(shape).astype(name)  # native order, writable
