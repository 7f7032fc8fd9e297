"""The three sparse MLA kernels (forward, backward dq, backward dkv) launched once each on 1,024
late queries of an 8K-token context (every one of the 2,048 slots valid), at DeepSeek-V3.2's
dims (128 heads, 512 + 64, bf16): the workload to hold under Nsight Compute. With --meta it
also prints each compiled kernel's registers, spills and shared memory (no profiler needed).

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section MemoryWorkloadAnalysis --section WarpStateStats \\
        -k regex:"_fwd_kernel|_bwd_dq_kernel|_bwd_dkv_kernel" -c 3 python benchmarks/dsa_ncu.py
    python benchmarks/dsa_ncu.py --meta
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import sparse_mla  # noqa: E402
from kernels.topk import select_indices  # noqa: E402

H, D, D_V, TOPK, CONTEXT, QUERIES = 128, 576, 512, 2048, 8192, 1024


def run_once() -> None:
    """Forward and backward once on the last QUERIES queries of a CONTEXT-token sequence."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    q, kv = rand(1, QUERIES, H, D), rand(1, CONTEXT, D)
    q_idx, k_idx = rand(1, CONTEXT, 64, 128), rand(1, CONTEXT, 128)
    w_idx = torch.randn(1, CONTEXT, 64, device="cuda", generator=g)
    idx = select_indices(q_idx, k_idx, w_idx, TOPK)[:, CONTEXT - QUERIES :].contiguous()
    scale = 192**-0.5
    o, lse = sparse_mla.sparse_mla_fwd(q, kv, idx, scale, D_V)
    sparse_mla.sparse_mla_bwd(q, kv, idx, o, lse, torch.randn_like(o), scale)
    torch.cuda.synchronize()


def compiled_resources() -> list[str]:
    """Registers, spills and shared memory of every compiled variant of the three kernels."""
    lines = []
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel"):
        for cache in getattr(sparse_mla, name).device_caches.values():
            for k in cache[0].values():
                lines.append(
                    f"{name}: {k.n_regs} registers, {k.n_spills} spilled, "
                    f"{k.metadata.shared} B shared, {k.metadata.num_warps} warps, "
                    f"{k.metadata.num_stages} stages"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta", action="store_true", help="print the kernels' resources")
    args = parser.parse_args()
    run_once()
    if args.meta:
        print("\n".join(compiled_resources()))


if __name__ == "__main__":
    main()
