"""Benchmark: sandboxed code executions per second against plain `subprocess`, same programs.

Usage: python benchmarks/sandbox.py [--runs 200] [--workers 2] [--write docs/benchmarks.md]

Both sides run the same small Python programs (a print, a short compute loop, a stdin
echo) with the same interpreter flags (`-I -S`) and the same number of concurrent workers,
in alternating rounds so a change in machine load hits both alike:
- baseline: `subprocess.run` in a fresh temporary directory, no isolation at all;
- sandboxed: `rewards.sandbox.run_python` (namespaces, private root, limits, see
  docs/rewards.md).
It prints runs per second for each, the ratio, and one-run latency, then writes the figures
with the machine named. A last line times the full code verifier (harness + 3 stdin/stdout
cases per sample), which has no unsandboxed counterpart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Run from a checkout without installing: make `rewards` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import cpu_name, write_section  # noqa: E402

from rewards import Sample, sandbox  # noqa: E402
from rewards.code import verify_code  # noqa: E402

PROGRAMS = [
    ("print", "print('hello')", ""),
    ("loop", "total = 0\nfor i in range(200_000):\n    total += i * i\nprint(total)", ""),
    ("stdin", "import sys\nprint(sys.stdin.read()[::-1])", "abc" * 1000),
]


def plain_run(source: str, stdin: str) -> bool:
    workdir = tempfile.mkdtemp(prefix="keeprl-bench-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(source)
        res = subprocess.run(
            [sandbox.PYTHON, "-I", "-S", "main.py"],
            input=stdin.encode(),
            capture_output=True,
            cwd=workdir,
            timeout=30,
        )
        return res.returncode == 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def sandboxed_run(source: str, stdin: str) -> bool:
    return sandbox.run_python(source, stdin=stdin).ok


def timed_batch(fn, runs: int, workers: int) -> float:
    """Seconds to run `runs` programs with `workers` threads (each run is a process)."""
    jobs = [PROGRAMS[i % len(PROGRAMS)] for i in range(runs)]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(lambda job: fn(job[1], job[2]), jobs))
    elapsed = time.perf_counter() - start
    if not all(ok):
        raise RuntimeError(f"{fn.__name__}: {ok.count(False)} of {runs} runs failed")
    return elapsed


def throughputs(runs: int, workers: int, rounds: int = 5) -> tuple[float, float]:
    """Runs/s for plain and sandboxed, alternating rounds so both see the same machine load."""
    plain = boxed = 0.0
    per_round = max(runs // rounds, 1)
    for _ in range(rounds):
        plain += timed_batch(plain_run, per_round, workers)
        boxed += timed_batch(sandboxed_run, per_round, workers)
    return per_round * rounds / plain, per_round * rounds / boxed


def latency_ms(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(PROGRAMS[0][1], "")
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def verifier_throughput(samples: int, workers: int) -> float:
    io = [{"input": f"{i} {i + 1}\n", "output": str(2 * i + 1)} for i in range(3)]
    sample = Sample("", "a, b = map(int, input().split())\nprint(a + b)", {"io": io})
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        rewards = list(pool.map(lambda _: verify_code(sample)["reward"], range(samples)))
    if rewards != [1.0] * samples:
        raise RuntimeError("code verifier benchmark: a correct solution did not pass")
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--write", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    report = sandbox.capabilities()
    if not report.isolated:
        raise SystemExit(f"sandbox not available here: {report.error}")
    plain_run(*PROGRAMS[0][1:])  # warm the page cache for both sides
    sandboxed_run(*PROGRAMS[0][1:])
    plain, boxed = throughputs(args.runs, args.workers)
    plain_ms, boxed_ms = latency_ms(plain_run), latency_ms(sandboxed_run)
    verifier = verifier_throughput(max(args.runs // 4, 8), args.workers)
    device = f"this CPU machine ({cpu_name()})"
    rows = [
        ("plain subprocess, no isolation", f"{plain:.1f}", f"{plain_ms:.1f}"),
        ("rewards.sandbox", f"{boxed:.1f}", f"{boxed_ms:.1f}"),
    ]
    lines = [
        "## Sandbox throughput (`benchmarks/sandbox.py`)",
        "",
        f"Device: {device}. Python {sys.version.split()[0]}, {args.workers} concurrent "
        f"workers, {args.runs} runs per side over {len(PROGRAMS)} small programs "
        f"({', '.join(name for name, _, _ in PROGRAMS)}), measured in one run of "
        "`python benchmarks/sandbox.py`; the two sides alternate in 5 rounds so both see the "
        f"same machine load (1-minute load average at the start: {load_before:.1f}).",
        "",
        "| mode | runs/s | median latency of one run (ms) |",
        "| --- | ---: | ---: |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"Sandboxed / plain throughput: **{boxed / plain:.2f}x** "
        f"(amortised over the batch, {1000 / boxed - 1000 / plain:.1f} ms more per run "
        f"with {args.workers} workers).",
        "",
        f"Full code verifier (sandbox + harness + 3 stdin/stdout cases per sample): "
        f"{verifier:.1f} samples/s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, "sandbox", text)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
