"""Top-k selection on a CUDA device: the Triton kernel, torch.topk, the stable-sort reference.

The deterministic kernel (kernels/topk.py) against torch.topk (fast, but ties are not broken
by position) and the stable-sort reference (policy.indexer.select_topk), then the whole DSA
selection (select_indices) end to end.

Scores: one query chunk [chunk, S] float32 of a causal prefill of S tokens (the last `chunk`
queries, -inf after the diagonal), ReLU(N(0, 1) - 1) so that about 84% of the visible scores
are exact zeros (the ties the kernel must break like the reference); k = 2048. Per length it
prints the median times (triton.testing.do_bench) of the kernel reading whole rows, of the
kernel told the scores are causal (it then skips the -inf after the diagonal), of torch.topk
and of the reference, the kernel's speed-ups, whether its selection equals the reference's,
and its bandwidth: bytes of scores one pass reads over the kernel's time (the kernel makes at
most 5 passes), and 5 passes' worth as a fraction of the device copy bandwidth measured in the
same run (read + write of 1 GiB). Then select_indices for S queries over S keys, 64 indexer
heads x 128 in bf16, in its default query chunks (indexer scores + top-k, [S, S] never held).

    python benchmarks/topk.py [--lengths 8192 32768 65536 131072] [--chunk 2048] [--k 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.topk import select_indices, topk_indices, topk_indices_reference  # noqa: E402

HEADS, DIM = 64, 128
MAX_PASSES = 4 + 1  # radix histogram passes + the selection pass


def _copy_gbps() -> float:
    x = torch.empty(1 << 28, device="cuda")  # 1 GiB of float32
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6


def _scores(chunk: int, s: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, chunk, s, device="cuda", generator=g).sub_(1.0).relu_()
    t = torch.arange(chunk, device="cuda")[:, None] + (s - chunk)
    return x.masked_fill_(torch.arange(s, device="cuda")[None, :] > t, float("-inf"))


def _topk_row(s: int, chunk: int, k: int, copy_gbps: float) -> str:
    chunk = min(chunk, s)
    scores = _scores(chunk, s)
    offset = s - chunk
    full = triton.testing.do_bench(lambda: topk_indices(scores, k))
    causal = triton.testing.do_bench(lambda: topk_indices(scores, k, causal_offset=offset))
    fast = triton.testing.do_bench(lambda: torch.topk(scores, k, dim=-1))
    ref = triton.testing.do_bench(lambda: topk_indices_reference(scores, k))
    want = topk_indices_reference(scores, k)
    exact = torch.equal(topk_indices(scores, k), want)
    exact &= torch.equal(topk_indices(scores, k, causal_offset=offset), want)
    visible = 4 * (chunk * (offset + 1) + chunk * (chunk - 1) // 2)  # bytes a causal pass reads
    per_pass = visible / causal / 1e6  # GB/s
    return (
        f"{s} | {full:.3f} | {causal:.3f} | {fast:.3f} | {ref:.3f} | {fast / causal:.2f}x | "
        f"{ref / causal:.1f}x | {'yes' if exact else 'NO'} | {per_pass:.0f} | "
        f"{MAX_PASSES * per_pass / copy_gbps:.0%}"
    )


def _select_row(s: int, k: int) -> str:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, s, HEADS, DIM, device="cuda", generator=g).bfloat16()
    keys = torch.randn(1, s, DIM, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, s, HEADS, device="cuda", generator=g) * HEADS**-0.5
    ms = triton.testing.do_bench(lambda: select_indices(q, keys, w, k), warmup=1, rep=1)
    return f"{s} | {ms:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--chunk", type=int, default=2048, help="query rows per top-k call")
    parser.add_argument("--k", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/topk.py needs a CUDA device")
    copy_gbps = _copy_gbps()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth measured {copy_gbps:.0f} GB/s")
    print(f"top-k of [{args.chunk}, S] causal scores, k = {args.k} (ms)")
    print(
        "keys S | kernel | kernel causal | torch.topk | reference | topk / kernel | "
        "reference / kernel | exact | GB/s per pass | 5 passes of copy bw"
    )
    for s in args.lengths:
        print(_topk_row(s, args.chunk, args.k, copy_gbps), flush=True)
        torch.cuda.empty_cache()
    print(f"select_indices, S queries x S keys, {HEADS} heads x {DIM} bf16, k = {args.k}")
    print("tokens S | ms")
    for s in args.lengths:
        print(_select_row(s, args.k), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
