"""Lightning-indexer scores on a CUDA device: the Triton kernel (kernels/indexer.py) against the
torch reference, at DeepSeek-V3.2's indexer dims (64 heads x 128, bf16 inputs, causal).

Prints, per length, both times (median of triton.testing.do_bench), the kernel's speed-up, its
TFLOP/s counting only the causal half it computes (2 * H * D * T * (T + 1) / 2 multiply-adds as
FLOPs), and that rate as a fraction of the device's bf16 matmul peak measured in the same run
(an 8192^3 torch.matmul). The reference builds the [T, H, S] float32 intermediate, so it runs
only where that fits in memory.

    python benchmarks/indexer.py [--lengths 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.indexer import indexer_scores, indexer_scores_reference  # noqa: E402

HEADS, DIM = 64, 128


def _peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a)
    return 2 * 8192**3 / ms / 1e9


def _row(t: int, peak: float) -> str:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, t, HEADS, DIM, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, t, DIM, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, t, HEADS, device="cuda", generator=g) * HEADS**-0.5
    ms = triton.testing.do_bench(lambda: indexer_scores(q, k, w))
    tflops = 2 * HEADS * DIM * t * (t + 1) / 2 / ms / 1e9
    ref, speedup = "-", "-"
    if 4 * t * HEADS * t < 0.3 * torch.cuda.get_device_properties(0).total_memory:
        ref_ms = triton.testing.do_bench(lambda: indexer_scores_reference(q, k, w))
        ref, speedup = f"{ref_ms:.2f}", f"{ref_ms / ms:.1f}x"
    return f"{t} | {ms:.3f} | {ref} | {speedup} | {tflops:.0f} | {tflops / peak:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    args = parser.parse_args()
    peak = _peak_tflops()
    print(f"device: {torch.cuda.get_device_name()}; bf16 matmul peak measured {peak:.0f} TFLOP/s")
    print("tokens | kernel ms | reference ms | speed-up | kernel TFLOP/s | of peak")
    for t in args.lengths:
        print(_row(t, peak), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
