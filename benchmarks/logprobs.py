"""Benchmark: masked log-probs, Triton (kernels.logprobs), torch chunks (rl.logprobs) and the
naive full-logits version, against the bare hidden x LM-head matmul.

Each computes log pi(token) under a top-k sampling mask (K = 20 kept ids per token) at the real
vocabulary size (129,280), in one run on one device: the forward alone, and forward + backward.
The bare matmul is the floor they are held to: its forward is h W^T, its forward + backward the
three GEMMs (logits, d hidden, d weight) of autograd through it with a given logits gradient.
Printed: each variant's times and their ratios to the bare matmul's, and peak memory.

On CUDA rl.logprobs.masked_logprobs dispatches to the Triton kernels, so the torch-chunks
variant calls its torch path directly. The Triton variant runs only on CUDA (the CPU
interpreter would take hours at this vocabulary).

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

from rl import logprobs as rl_logprobs  # noqa: E402

VOCAB = 129_280


def _torch_chunks(h, w, t, kept):  # noqa: ANN001, ANN202
    # rl.logprobs' torch path, which masked_logprobs itself takes only off CUDA.
    rl_logprobs._check_kept(t, kept)
    budget = rl_logprobs.DEFAULT_CHUNK_ELEMS.get(
        h.device.type, rl_logprobs.DEFAULT_CHUNK_ELEMS["cpu"]
    )
    chunk = max(1, budget // w.shape[0])
    return rl_logprobs._MaskedLogProbs.apply(h, w, t, kept, 1.0, chunk, False)[0]


def _triton(h, w, t, kept):  # noqa: ANN001, ANN202
    from kernels.logprobs import masked_logprobs_triton  # needs CUDA (or the slow interpreter)

    return masked_logprobs_triton(h, w, t, kept)


def _bare_matmul(h, w, t, kept):  # noqa: ANN001, ANN202
    return h @ w.t()


# The first is the baseline of the ratios; "chunked" and "naive" keep their names of earlier
# saved results.
VARIANTS = {
    "matmul": _bare_matmul,
    "triton": _triton,
    "chunked": _torch_chunks,
    "naive": rl_logprobs.masked_logprobs_reference,
}
LABELS = {
    "matmul": "bare matmul h W^T (baseline)",
    "triton": "Triton (kernels.logprobs)",
    "chunked": "torch chunks (rl.logprobs)",
    "naive": "naive full logits",
}


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


def _logits_grad(args: argparse.Namespace, variant: str) -> torch.Tensor | None:
    """The bare matmul's backward needs a [tokens, vocab] logits gradient: made up front, an
    input like h and W (a log-prob variant's gradient is [tokens])."""
    if variant != "matmul":
        return None
    dtype = getattr(torch, args.dtype)
    return torch.full((args.tokens, VOCAB), 1e-4, dtype=dtype, device=args.device)


def _run_once(fn, h, w, t, kept, grad_z, backward: bool = True) -> None:  # noqa: ANN001
    h.grad = w.grad = None
    out = fn(h, w, t, kept)
    if backward:
        out.backward(grad_z[: len(h)] if grad_z is not None else torch.ones_like(out))


def _median_seconds(args: argparse.Namespace, run) -> float:  # noqa: ANN001
    times = []
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        run()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """Median seconds of the forward and of forward+backward, and the peak memory growth of
    forward+backward in bytes."""
    fn = VARIANTS[variant]
    h, w, t, kept = _inputs(args)
    grad_z = _logits_grad(args, variant)
    _run_once(fn, h[:2], w, t[:2], kept[:2], grad_z)  # warm-up: kernels, allocator, w.grad
    _run_once(fn, h, w, t, kept, grad_z)  # and the full shapes (Triton specialises, cuBLAS)
    forward = _median_seconds(args, lambda: _run_once(fn, h, w, t, kept, grad_z, False))
    both = _median_seconds(args, lambda: _run_once(fn, h, w, t, kept, grad_z))
    if args.device.startswith("cuda"):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _run_once(fn, h, w, t, kept, grad_z)
        # Less the parameter gradients the step leaves behind: the transient is the measure.
        peak = torch.cuda.max_memory_allocated() - base - h.grad.nbytes - w.grad.nbytes
    else:
        peak = -1  # filled in by the subprocess probe
    return {"forward_seconds": forward, "seconds": both, "peak_bytes": peak}


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
    grad_z = _logits_grad(args, args.probe)
    _run_once(fn, h[:2], w, t[:2], kept[:2], grad_z)
    before = peak_rss()
    _run_once(fn, h, w, t, kept, grad_z)
    print(peak_rss() - before)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _ms(seconds: float | None, gpu: bool) -> str:
    return f"{seconds * 1e3:.1f} ms" if gpu and seconds is not None else "-"


def _ratio(r: dict, base: dict | None, key: str) -> str:
    if base is None or r.get(key) is None:
        return "-"
    return f"{r[key] / base[key]:.2f}x"


def render(res: dict) -> str:
    """Markdown for docs/benchmarks.md; results saved before the baseline and Triton variants
    existed (chunked and naive only, no forward times) render with what they hold."""
    gpu = res["device"].startswith("cuda")
    base = res.get("matmul")
    present = [v for v in VARIANTS if v in res]
    lines = [
        f"### Masked log-probs, {res['device_name']}",
        "",
        f"{res['tokens']} tokens, vocab {VOCAB:,}, hidden {res['hidden']}, {res['dtype']}, "
        "top-k mask of 20 ids. Ratios are to the bare matmul (forward: h W^T; forward + "
        "backward: its three GEMMs), measured in one run"
        + ("." if gpu else "; CPU times are relative only."),
        "",
        "| variant | forward | / bare | forward + backward | / bare | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for name in present:
        r = res[name]
        lines.append(
            f"| {LABELS[name]} | {_ms(r.get('forward_seconds'), gpu)} | "
            f"{_ratio(r, base, 'forward_seconds')} | {_ms(r['seconds'], gpu)} | "
            f"{_ratio(r, base, 'seconds')} | {r['peak_bytes'] / 2**20:,.0f} MiB |"
        )
    if "chunked" in res and "naive" in res:
        c, n = res["chunked"], res["naive"]
        lines += [
            "",
            f"Naive / torch chunks: {n['seconds'] / c['seconds']:.2f}x time, "
            f"{n['peak_bytes'] / c['peak_bytes']:.1f}x peak memory.",
        ]
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
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        help="which to run (default: all; triton only on CUDA)",
    )
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
        cuda = args.device.startswith("cuda")
        for variant in args.variants or [v for v in VARIANTS if cuda or v != "triton"]:
            res[variant] = measure(args, variant)
            if not cuda:
                res[variant]["peak_bytes"] = _cpu_peak(args, variant)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    text = render(res)
    print(text)
    if args.write:
        write_section(args.write, f"logprobs-{res['device'].split(':')[0]}", text)


if __name__ == "__main__":
    main()
