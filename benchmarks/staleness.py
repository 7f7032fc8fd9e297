"""Asynchronous rollouts: the quickstart run with rollout.max_staleness 0 and 1, one after the
other on the same machine, each in its own `keeprl train` process.

Prints, per setting, the median wall time between consecutive steps (each step's progress
line is timestamped as it arrives, so the warm-start and start-up are left out), the whole
run's wall time, and the mean reward over the first and the last 10 steps; then the time ratio
(1 / 0). With 1, step s is sampled while the learner trains on step s - 1, so a step costs
about max(rollout, learner) instead of their sum, where the machine has the cores to run both.

    python benchmarks/staleness.py [--config configs/quickstart.yaml] [--steps 60]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"step (\d+)/(\d+)\s+reward ([0-9.]+)")


def run(config: str, steps: int, staleness: int, out: Path) -> dict[str, float]:
    args = [
        sys.executable, "-m", "rl.cli", "train", config,
        f"trainer.output_dir={out}", f"trainer.total_steps={steps}",
        f"rollout.max_staleness={staleness}",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    stamps, rewards = [], []
    for line in proc.stdout:
        m = STEP.search(line)
        if m:
            stamps.append(time.perf_counter())
            rewards.append(float(m.group(3)))
    if proc.wait() != 0:
        raise SystemExit(f"keeprl train exited {proc.returncode} (max_staleness {staleness})")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "step_s": statistics.median(gaps),
        "run_s": time.perf_counter() - start,
        "first10": statistics.mean(rewards[:10]),
        "last10": statistics.mean(rewards[-10:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=60)
    a = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (0, 1):
            results[n] = run(a.config, a.steps, n, Path(tmp) / f"staleness{n}")
            print(f"max_staleness {n}: {results[n]}", flush=True)
    print("max_staleness | median s/step | run s | reward first 10 | reward last 10")
    for n, r in results.items():
        print(
            f"{n} | {r['step_s']:.2f} | {r['run_s']:.0f} | {r['first10']:.2f} | {r['last10']:.2f}"
        )
    print(f"step time 1 / 0: {results[1]['step_s'] / results[0]['step_s']:.2f}x")


if __name__ == "__main__":
    main()
