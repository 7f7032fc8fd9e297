"""Speed of the sparse-stage indexer loss kernels (kernels/indexer_loss.py) on a CUDA device.

At DeepSeek-V3.2's indexer dims: 64 heads x 128, 2048 selected keys per query, bf16 inputs.

Each query selects 2048 distinct random keys among those it sees (causal; the first 2047 queries
see fewer and carry -1 slots), the worst case for the key gathers' locality. Prints, per length,
the times (median of triton.testing.do_bench) of the selected-slot scores, of the loss forward,
and of the loss forward + backward, with TFLOP/s counting F = 2 * T * K * H * D for a forward
(every slot, -1 ones included) and 4F for forward + backward (the backward recomputes the logits
and does two products of the forward's size, for dq and dk), and those rates as a fraction of the
device's bf16 matmul peak measured in the same run (an 8192^3 torch.matmul). The backward's dk is
a scatter of T * K * D float32 atomic adds, which the FLOP count does not see.

    python benchmarks/indexer_loss.py [--lengths 8192 32768] [--topk 2048]
        [--fwd-tiling BLOCK_K WARPS STAGES] [--bwd-tiling BLOCK_K WARPS STAGES]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.indexer_loss import (  # noqa: E402
    BACKWARD_TILING,
    FORWARD_TILING,
    Tiling,
    sparse_indexer_kl,
    sparse_indexer_scores,
)

HEADS, DIM = 64, 128
# Queries per chunk when drawing the selection, bounding the [chunk, S] random scores.
_SELECT_CHUNK = 1024


def _peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a)
    return 2 * 8192**3 / ms / 1e9


def _selection(t: int, topk: int, g: torch.Generator) -> torch.Tensor:
    """idx [1, t, topk] int32: per query, topk distinct random keys among 0..t (causal), -1
    where it sees fewer."""
    out = []
    for start in range(0, t, _SELECT_CHUNK):
        rows = torch.arange(start, min(start + _SELECT_CHUNK, t), device="cuda")
        scores = torch.rand(len(rows), t, device="cuda", generator=g)
        scores.masked_fill_(torch.arange(t, device="cuda")[None, :] > rows[:, None], -1.0)
        vals, ids = scores.topk(min(topk, t), dim=-1, sorted=False)
        out.append(ids.masked_fill(vals < 0, -1).int())
    return torch.cat(out)[None]


def _row(t: int, topk: int, fwd: Tiling, bwd: Tiling, peak: float) -> str:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, t, HEADS, DIM, device="cuda", generator=g).bfloat16().requires_grad_()
    k = torch.randn(1, t, DIM, device="cuda", generator=g).bfloat16().requires_grad_()
    w = torch.randn(1, t, HEADS, device="cuda", generator=g) * (HEADS * DIM) ** -0.5
    w.requires_grad_()
    idx = _selection(t, topk, g)
    p = (2 * torch.randn(idx.shape, device="cuda", generator=g)).masked_fill(idx < 0, -torch.inf)
    p = p.softmax(-1)
    valid = torch.ones(1, t, dtype=torch.bool, device="cuda")

    def loss() -> torch.Tensor:
        return sparse_indexer_kl(q, k, w, idx, p, valid, forward_tiling=fwd, backward_tiling=bwd)

    scores_ms = triton.testing.do_bench(lambda: sparse_indexer_scores(q, k, w, idx, tiling=fwd))
    with torch.no_grad():
        fwd_ms = triton.testing.do_bench(loss)
    both_ms = triton.testing.do_bench(lambda: loss().backward(), grad_to_none=[q, k, w])
    flops = 2 * t * topk * HEADS * DIM
    cells = [f"{t}"]
    for ms, f in ((scores_ms, flops), (fwd_ms, flops), (both_ms, 4 * flops)):
        tflops = f / ms / 1e9
        cells.append(f"{ms:.3f} ms, {tflops:.0f} TFLOP/s ({tflops / peak:.0%})")
    return " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument(
        "--fwd-tiling",
        type=int,
        nargs=3,
        default=list(FORWARD_TILING),
        metavar=("BLOCK_K", "WARPS", "STAGES"),
    )
    parser.add_argument(
        "--bwd-tiling",
        type=int,
        nargs=3,
        default=list(BACKWARD_TILING),
        metavar=("BLOCK_K", "WARPS", "STAGES"),
    )
    args = parser.parse_args()
    fwd, bwd = Tiling(*args.fwd_tiling), Tiling(*args.bwd_tiling)
    peak = _peak_tflops()
    print(f"device: {torch.cuda.get_device_name()}; bf16 matmul peak measured {peak:.0f} TFLOP/s")
    print(f"K = {args.topk}, {HEADS} heads x {DIM}, bf16; tilings forward {fwd}, backward {bwd}")
    print("tokens | scores | loss forward | loss forward + backward")
    for t in args.lengths:
        print(_row(t, args.topk, fwd, bwd, peak), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
