"""Benchmark: chunked masked log-probs (rl.logprobs) vs the naive full-logits version.

Both compute log pi(token) under a top-k sampling mask (K = 20 kept ids per token) at the real
vocabulary size (129,280), forward + backward, in one run on one device. Printed: time and
peak-memory ratios (naive / chunked), plus absolute times on a GPU.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what the inputs hold; on the CPU,
the growth of the process's peak RSS (VmHWM), each variant measured in a fresh subprocess.

    python benchmarks/logprobs.py                       # CPU (hidden 256 keeps it minutes)
    python benchmarks/logprobs.py --device cuda --hidden 7168 --dtype bfloat16
    python benchmarks/logprobs.py ... --json out.json   # also save the figures
    python benchmarks/logprobs.py --render out.json --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import cpu_name, write_section  # noqa: E402

from rl.logprobs import masked_logprobs, masked_logprobs_reference  # noqa: E402

VOCAB = 129_280
VARIANTS = {"chunked": masked_logprobs, "naive": masked_logprobs_reference}


def _inputs(args: argparse.Namespace):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    h = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, dtype)
    w = (torch.randn(VOCAB, args.hidden, generator=g) * args.hidden**-0.5).to(args.device, dtype)
    t = torch.randint(0, VOCAB, (args.tokens,), generator=g)
    kept = (t[:, None] + torch.arange(20) * 7919) % VOCAB  # 20 distinct ids, target first
    return h.requires_grad_(), w.requires_grad_(), t.to(args.device), kept.to(args.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_once(fn, h, w, t, kept) -> None:
    h.grad = w.grad = None
    fn(h, w, t, kept).sum().backward()


def measure(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """Median seconds of forward+backward, and peak memory growth in bytes."""
    fn = VARIANTS[variant]
    h, w, t, kept = _inputs(args)
    _run_once(fn, h[:2], w, t[:2], kept[:2])  # warm-up: kernels, allocator, w.grad
    times = []
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        _run_once(fn, h, w, t, kept)
        _sync(args.device)
        times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _run_once(fn, h, w, t, kept)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = -1  # filled in by the subprocess probe
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def _cpu_peak(args: argparse.Namespace, variant: str) -> int:
    """Peak RSS growth of one forward+backward, measured in a fresh process."""
    cmd = [
        sys.executable,
        __file__,
        "--probe",
        variant,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--dtype",
        args.dtype,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes. Unlike getrusage's ru_maxrss, it
    starts afresh at exec, so a child does not inherit the parent's high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def probe(args: argparse.Namespace) -> None:
    fn = VARIANTS[args.probe]
    h, w, t, kept = _inputs(args)
    _run_once(fn, h[:2], w, t[:2], kept[:2])
    before = peak_rss()
    _run_once(fn, h, w, t, kept)
    print(peak_rss() - before)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def render(res: dict) -> str:
    c, n = res["chunked"], res["naive"]
    gpu = res["device"].startswith("cuda")
    lines = [
        f"### Masked log-probs, {res['device_name']}",
        "",
        f"{res['tokens']} tokens, vocab {VOCAB:,}, hidden {res['hidden']}, {res['dtype']}, "
        "top-k mask of 20 ids, forward + backward. Ratios are naive / chunked, measured in "
        "one run" + ("." if gpu else "; CPU times are relative only."),
        "",
        "| variant | time | peak memory |",
        "|---|---|---|",
    ]
    for name, r in (("chunked (rl.logprobs)", c), ("naive full logits", n)):
        t = f"{r['seconds'] * 1e3:.1f} ms" if gpu else "-"
        lines.append(f"| {name} | {t} | {r['peak_bytes'] / 2**20:,.0f} MiB |")
    lines.append(
        f"| **ratio naive / chunked** | **{n['seconds'] / c['seconds']:.2f}x** | "
        f"**{n['peak_bytes'] / c['peak_bytes']:.1f}x** |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--render", type=Path, help="render a saved --json result instead of running")
    p.add_argument("--write", type=Path, help="update this markdown file's section")
    p.add_argument("--probe", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        return probe(args)
    if args.render:
        res = json.loads(args.render.read_text())
    else:
        res = {
            "device": args.device,
            "device_name": device_name(args.device),
            "tokens": args.tokens,
            "hidden": args.hidden,
            "dtype": args.dtype,
        }
        for variant in VARIANTS:
            res[variant] = measure(args, variant)
            if not args.device.startswith("cuda"):
                res[variant]["peak_bytes"] = _cpu_peak(args, variant)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    text = render(res)
    print(text)
    if args.write:
        write_section(args.write, f"logprobs-{res['device'].split(':')[0]}", text)


if __name__ == "__main__":
    main()
