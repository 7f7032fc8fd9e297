"""DeepSeek Sparse Attention on a CUDA device: the Triton kernels (kernels/) one by one, the whole
DSA attention layer against the best dense causal attention torch offers, and a 4-layer policy.

At DeepSeek-V3.2's attention dims (128 heads; absorbed MQA with 512 + 64 key dims for the sparse
path; MHA with qk 192 / v 128 for the dense one; indexer 64 heads x 128; top-2048), bf16, batch
1, the same inputs for every row of a length:

- sparse MLA forward and backward: time and TFLOP/s, FLOPs counted as published kernels count
  them (forward 2 t h k (576 + 512), backward 2 t h k (3*576 + 2*512), k = the valid slots);
- the indexer's scores (bf16 and FP8, causal half counted: 2 * 64 * 128 * T (T + 1) / 2 FLOPs,
  against the bf16 peak) and the top-k, as the selection runs them (query chunks,
  kernels.topk.select_indices); the DSA forward again with the FP8 indexer;
- the DSA layer (selection + sparse MLA), forward and forward+backward, against cuDNN SDPA in
  MHA mode (causal), with the peak memory each allocates beyond its inputs;
- with --policy: forward+backward tokens/s and peak memory of a 4-layer policy at those
  attention dims (dense SwiGLU FFNs of width 2048, vocab 32K; the loss is on the final hidden
  states) through attention="reference" and attention="triton".

Every TFLOP/s is also given as a fraction of the bf16 matmul peak measured in the same run.

    python benchmarks/dsa.py [--lengths 8192 32768 65536 131072] [--policy 32768 131072]
        [--checkpointing]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.indexer import indexer_scores, quantize_fp8  # noqa: E402
from kernels.sparse_mla import attention_flops, sparse_mla_bwd, sparse_mla_fwd  # noqa: E402
from kernels.topk import select_indices  # noqa: E402

H, D_QK, D_V, TOPK = 128, 576, 512, 2048
IDX_H, IDX_D = 64, 128
GIB = 1 << 30


def _time(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of `reps` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak(fn: Callable[[], object]) -> float:
    """GiB that one call allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def _matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / triton.testing.do_bench(lambda: a @ a) / 1e9


def _chunk(t: int) -> int:
    """select_indices' default query chunk (about 1 GiB of float32 scores)."""
    return max(1, GIB // (4 * t))


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", generator=g).bfloat16()


def _sparse(t: int, reps: int) -> dict[str, float]:
    """Times (ms), FLOPs and peak memory (GiB) of the selection and the sparse MLA kernels."""
    g = torch.Generator(device="cuda").manual_seed(t)
    q_idx, k_idx = _rand(g, 1, t, IDX_H, IDX_D), _rand(g, 1, t, IDX_D)
    w_idx = torch.randn(1, t, IDX_H, device="cuda", generator=g) * IDX_H**-0.5
    q, kv = _rand(g, 1, t, H, D_QK), _rand(g, 1, t, D_QK)
    scale = 192**-0.5

    def select() -> torch.Tensor:
        return select_indices(q_idx, k_idx, w_idx, TOPK)

    def indexer_only() -> None:
        step = _chunk(t)
        for i in range(0, t, step):
            indexer_scores(q_idx[:, i : i + step], k_idx[:, : i + step], w_idx[:, i : i + step], i)

    (q8, qs), (k8, ks) = quantize_fp8(q_idx), quantize_fp8(k_idx)

    def indexer_fp8() -> None:
        step = _chunk(t)
        for i in range(0, t, step):
            sl = slice(i, i + step)
            indexer_scores(q8[:, sl], k8[:, : i + step], w_idx[:, sl], i,
                           q_scale=qs[:, sl], k_scale=ks[:, : i + step])  # fmt: skip

    def dsa_fwd_fp8() -> None:
        sparse_mla_fwd(q, kv, select_indices(q_idx, k_idx, w_idx, TOPK, fp8=True), scale, D_V)

    idx = select()
    o, lse = sparse_mla_fwd(q, kv, idx, scale, D_V)
    do = torch.randn_like(o)

    def dsa_fwd() -> None:
        sparse_mla_fwd(q, kv, select(), scale, D_V)

    def dsa_fwd_bwd() -> None:
        ids = select()
        o2, lse2 = sparse_mla_fwd(q, kv, ids, scale, D_V)
        sparse_mla_bwd(q, kv, ids, o2, lse2, do, scale)

    valid = int((idx >= 0).sum())
    f_fwd, f_bwd = (f * valid for f in attention_flops(1, H, 1, D_QK, D_V))
    return {
        "f_fwd": f_fwd,
        "f_bwd": f_bwd,
        "select": _time(select, reps),
        "indexer": _time(indexer_only, reps),
        "indexer_fp8": _time(indexer_fp8, reps),
        "dsa_f_fp8": _time(dsa_fwd_fp8, reps),
        "fwd": _time(lambda: sparse_mla_fwd(q, kv, idx, scale, D_V), reps),
        "bwd": _time(lambda: sparse_mla_bwd(q, kv, idx, o, lse, do, scale), reps),
        "dsa_f": _time(dsa_fwd, reps),
        "dsa_fb": _time(dsa_fwd_bwd, reps),
        "mem_f": _peak(dsa_fwd),
        "mem_fb": _peak(dsa_fwd_bwd),
    }


def _dense(t: int, reps: int) -> dict[str, float]:
    """cuDNN SDPA in MHA mode (qk 192, v 128), causal: times (ms) and peak memory (GiB)."""
    g = torch.Generator(device="cuda").manual_seed(t)
    qd = _rand(g, 1, H, t, 192).requires_grad_()
    kd = _rand(g, 1, H, t, 192).requires_grad_()
    vd = _rand(g, 1, H, t, 128).requires_grad_()
    dod = _rand(g, 1, H, t, 128)

    def fwd() -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=192**-0.5)

    def fwd_bwd() -> None:
        qd.grad = kd.grad = vd.grad = None
        fwd().backward(dod)

    with torch.no_grad():
        out = {"f": _time(fwd, reps), "mem_f": _peak(fwd)}
    out.update(fb=_time(fwd_bwd, reps), mem_fb=_peak(fwd_bwd))
    return out


def layer_rows(t: int, peak: float, reps: int) -> list[str]:
    sp = _sparse(t, reps)
    torch.cuda.empty_cache()
    de = _dense(t, reps)
    torch.cuda.empty_cache()
    f_idx = 2 * IDX_H * IDX_D * t * (t + 1) / 2
    f_dense = 2 * t * t / 2 * H * (192 + 128)

    def tf(flops: float, ms: float) -> str:
        rate = flops / ms / 1e9
        return f"{rate:.0f} ({rate / peak:.0%})"

    return [
        f"{t} | sparse MLA fwd | {sp['fwd']:.1f} | {tf(sp['f_fwd'], sp['fwd'])} | |",
        f"{t} | sparse MLA bwd | {sp['bwd']:.1f} | {tf(sp['f_bwd'], sp['bwd'])} | |",
        f"{t} | indexer scores (bf16) | {sp['indexer']:.1f} | {tf(f_idx, sp['indexer'])} | |",
        f"{t} | indexer scores (FP8) | {sp['indexer_fp8']:.1f} | "
        f"{tf(f_idx, sp['indexer_fp8'])} | |",
        f"{t} | top-k (selection - indexer) | {sp['select'] - sp['indexer']:.1f} | | |",
        f"{t} | DSA layer fwd | {sp['dsa_f']:.1f} | | {sp['mem_f']:.2f} |",
        f"{t} | dense cuDNN fwd | {de['f']:.1f} | {tf(f_dense, de['f'])} | {de['mem_f']:.2f} |",
        f"{t} | **DSA / dense fwd** | **{de['f'] / sp['dsa_f']:.2f}x faster** | | |",
        f"{t} | DSA layer fwd, FP8 indexer | {sp['dsa_f_fp8']:.1f} | | |",
        f"{t} | **DSA (FP8 indexer) / dense fwd** | "
        f"**{de['f'] / sp['dsa_f_fp8']:.2f}x faster** | | |",
        f"{t} | DSA layer fwd+bwd | {sp['dsa_fb']:.1f} | | {sp['mem_fb']:.2f} |",
        f"{t} | dense cuDNN fwd+bwd | {de['fb']:.1f} | {tf(3.5 * f_dense, de['fb'])} | "
        f"{de['mem_fb']:.2f} |",
        f"{t} | **DSA / dense fwd+bwd** | **{de['fb'] / sp['dsa_fb']:.2f}x faster** | | |",
    ]


def policy_row(t: int, impl: str, reps: int, checkpointing: bool) -> str:
    from policy import Transformer, preset

    args = preset(
        "deepseek-v3.2",
        num_hidden_layers=4,
        first_k_dense_replace=4,
        intermediate_size=2048,
        vocab_size=32768,
    )
    torch.manual_seed(0)
    model = Transformer(args, attention=impl).to("cuda", torch.bfloat16)
    model.activation_checkpointing = checkpointing
    tokens = torch.randint(0, args.vocab_size, (1, t), device="cuda")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(tokens, return_logits=False)
        out.hidden.float().square().mean().backward()

    try:
        ms = _time(step, reps)
        mem = _peak(step)
        result = f"{t} | {impl} | {t / ms * 1e3:,.0f} | {ms:.0f} | {mem:.1f}"
    except torch.cuda.OutOfMemoryError as e:
        # Where: the deepest frame in the policy's code, and the allocation that failed.
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/policy/" in f.filename]
        at = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`"
        asked = re.search(r"Tried to allocate [0-9.]+ [GMK]iB", str(e))
        result = f"{t} | {impl} | out of memory at {at} | - | {asked.group(0) if asked else ''}"
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--policy", type=int, nargs="*", default=[])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--checkpointing", action="store_true", help="policy rows with activation checkpointing"
    )
    args = parser.parse_args()
    peak = _matmul_peak()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton "
          f"{triton.__version__}; bf16 matmul peak measured {peak:.0f} TFLOP/s")  # fmt: skip
    print(f"median of {args.reps} runs after a warm-up; FP8 rows: e4m3 q and k, one scale a row")
    if args.lengths:
        print("tokens | what | ms | TFLOP/s (of peak) | peak memory GiB")
        print("---|---|---|---|---")
        for t in args.lengths:
            for row in layer_rows(t, peak, args.reps):
                print(row, flush=True)
            torch.cuda.empty_cache()
    if args.policy:
        state = "on" if args.checkpointing else "off"
        print(f"\n4-layer policy, forward+backward, activation checkpointing {state}")
        print("tokens | attention | tokens/s | ms | peak GiB")
        print("---|---|---|---|---")
        for t in args.policy:
            for impl in ("triton", "reference"):
                print(policy_row(t, impl, args.reps, args.checkpointing), flush=True)


if __name__ == "__main__":
    main()
