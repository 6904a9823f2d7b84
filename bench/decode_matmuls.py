"""The decode step's matmuls at each width: cuBLAS against the Triton kernel's launch choices (issue #32).

    python bench/decode_matmuls.py --out bench/results/<date>-<gpu>-decode-matmuls.json

Shapes of the R1-1.5B's decode step (the engine's fused projections): q/k/v [2,048 x 1,536] with its bias, o_proj
[1,536 x 1,536], gate/up [17,920 x 1,536], down [1,536 x 8,960], and the LM head [151,936 x 1,536]. For each width
(slots in the step) each shape is timed as a step runs it: 28 copies of the weight (one per layer, so each call
reads its weight from memory, not from L2) called in turn inside one CUDA graph (no launch gaps of the host), the
graph replayed. Timed: `F.linear` (cuBLAS), the same with cuBLASLt preferred, and every `CANDIDATES`
launch choice of the Triton kernel below, each checked against an fp32 reference (a choice further from it than
cuBLAS's rounding allows is reported and not counted). The verdict line: per width, the step's matmul time with
cuBLAS against the best choice per shape, and the TFLOP/s and weight TB/s each reaches.

The kernel tiles x @ w^T for nn.Linear's weight and can split K into parts summed in a fixed order by a second
kernel (deterministic, as the engine's keyed sampling needs). On an H200 (2026-12-04, third session) no choice beat
cuBLAS by more than 4% at any width (the step's matmuls 2.79 ms at 487 slots either way: cuBLAS's nvjet kernels
reach 610-710 TFLOP/s on gate/up and the LM head), so the engine keeps cuBLAS and the kernel lives here.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_name  # noqa: E402

LAYERS = 28
SHAPES = {  # name: (N, K, bias, copies per step)
    "qkv": (2048, 1536, True, LAYERS), "o_proj": (1536, 1536, False, LAYERS),
    "gate_up": (17920, 1536, False, LAYERS), "down": (1536, 8960, False, LAYERS),
    "lm_head": (151936, 1536, False, 1),
}


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    split_k: int = 1     # parts of K computed by separate programs, summed in order by a second kernel
    num_warps: int = 4
    num_stages: int = 4


@functools.cache  # built on first use: importing this module needs no Triton
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, k_part,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr):
        # out[M, N] = x[M, K] @ w[N, K]^T (+ bias): x and w row-major (nn.Linear's weight); with SPLIT_K > 1 each
        # program adds up one part of K and writes it in fp32 to out[part] (the reduce kernel sums the parts)
        pid_n, pid_m, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k_start = part * k_part
        k_end = tl.minimum(k_start + k_part, K)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * K
        w_rows = w_ptr + rn[:, None].to(tl.int64) * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_rows + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
                b = tl.load(w_rows + (k0 + rk)[None, :], mask=(rn < N)[:, None], other=0.0)
            else:
                kk = k0 + rk
                a = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < k_end)[None, :], other=0.0)
                b = tl.load(w_rows + kk[None, :], mask=(rn < N)[:, None] & (kk < k_end)[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        keep = (rm < M)[:, None] & (rn < N)[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=keep)
        else:
            at = (part * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
            tl.store(out_ptr + at, acc, mask=keep)

    @triton.jit
    def reduce_parts(parts_ptr, b_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < MN
        acc = tl.load(parts_ptr + offs, mask=live, other=0.0)
        for part in tl.static_range(1, SPLIT_K):  # in order: the same bits every call
            acc += tl.load(parts_ptr + part * MN + offs, mask=live, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=live)

    return matmul_kernel, reduce_parts


def linear(x, weight, bias=None, config: MatmulConfig = MatmulConfig()):
    """x [M, K] @ weight[N, K]^T + bias, as F.linear, through the Triton kernel with `config`'s launch choices."""
    import torch

    matmul_kernel, reduce_parts = _build()
    x = x.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    c = config
    k_blocks = -(-K // c.block_k)
    split = max(1, min(c.split_k, k_blocks))
    k_part = -(-k_blocks // split) * c.block_k
    split = -(-K // k_part)  # no empty part
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    target = out if split == 1 else torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    grid = (-(-N // c.block_n), -(-M // c.block_m), split)
    matmul_kernel[grid](x, weight, bias if bias is not None else weight, target, M, N, K, k_part,
                        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=split,
                        HAS_BIAS=bias is not None and split == 1, EVEN_K=K % c.block_k == 0,
                        num_warps=c.num_warps, num_stages=c.num_stages)
    if split > 1:
        block = 1024
        reduce_parts[(-(-(M * N) // block),)](target, bias if bias is not None else weight, out, M * N, N,
                                              SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block)
    return out


# the launch choices bench/decode_matmuls.py sweeps (each fits an H100/H200's shared memory at its stages)
CANDIDATES = tuple(
    MatmulConfig(bm, bn, bk, split, warps, stages)
    for bm, bn, bk, warps, stages in ((16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 4),
                                      (64, 256, 64, 8, 3), (128, 256, 64, 8, 3))
    for split in (1, 2, 4)
)


def graph_ms(calls, reps: int = 10) -> float:
    """Milliseconds per replay of one CUDA graph that makes `calls` (a list of thunks) in turn."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up outside the capture: kernels compiled, workspaces made
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    import torch
    import torch.nn.functional as F

    p = argparse.ArgumentParser()
    p.add_argument("--widths", default="1,8,32,64,128,256,384,487")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    gen = torch.Generator("cuda").manual_seed(0)
    res = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "widths": widths, "shapes": {}, "configs": [
        c.__dict__ for c in CANDIDATES]}
    t0 = time.perf_counter()
    for name in args.shapes.split(","):
        n, k, has_bias, copies = SHAPES[name]
        weights = [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        biases = [torch.randn(n, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02 if has_bias else None
                  for _ in range(copies)]
        shape_res = res["shapes"][name] = {"n": n, "k": k, "bias": has_bias, "copies": copies, "widths": {}}
        for m in widths:
            x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float(), None if biases[0] is None else biases[0].float())
            cublas_out = F.linear(x, weights[0], biases[0])
            scale = ref.abs().max().item()
            cublas_gap = (cublas_out.float() - ref).abs().max().item() / scale
            row = shape_res["widths"][m] = {"flop": 2 * m * n * k * copies, "weight_bytes": 2 * n * k * copies,
                                            "cublas_gap": round(cublas_gap, 6), "ms": {}, "too_far": []}
            calls = [lambda w=w, b=b: F.linear(x, w, b) for w, b in zip(weights, biases)]
            row["ms"]["cublas"] = graph_ms(calls)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                row["ms"]["cublaslt"] = graph_ms(calls)
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            for c in CANDIDATES:
                key = f"m{c.block_m}_n{c.block_n}_k{c.block_k}_s{c.split_k}_w{c.num_warps}_st{c.num_stages}"
                try:
                    gap = (linear(x, weights[0], biases[0], c).float() - ref).abs().max().item() / scale
                    if gap > max(2 * cublas_gap, 2 ** -8):
                        row["too_far"].append({"config": key, "gap": gap})
                        continue
                    row["ms"][key] = graph_ms([lambda w=w, b=b: linear(x, w, b, c) for w, b in zip(weights, biases)])
                except Exception as err:  # e.g. out of shared memory
                    row["ms"][key] = None
                    row.setdefault("errors", {})[key] = f"{type(err).__name__}: {str(err)[:160]}"
            timed = {kk: v for kk, v in row["ms"].items() if v is not None and kk not in ("cublas", "cublaslt")}
            best = min(timed, key=timed.get)
            row["best_triton"] = best
            row["ms"] = {kk: (round(v, 4) if v is not None else None) for kk, v in row["ms"].items()}
            for label, ms in (("cublas", row["ms"]["cublas"]), ("best_triton", row["ms"][best])):
                row[f"{label}_tflop_s"] = round(row["flop"] / (ms / 1e3) / 1e12, 1)
                row[f"{label}_weight_tb_s"] = round(row["weight_bytes"] / (ms / 1e3) / 1e12, 2)
            print(f"{name:8s} width {m:4d}: cuBLAS {row['ms']['cublas']:.4f} ms ({row['cublas_tflop_s']} TFLOP/s, "
                  f"{row['cublas_weight_tb_s']} TB/s), cuBLASLt {row['ms']['cublaslt']:.4f}, best Triton {best} "
                  f"{row['ms'][best]:.4f} ({row['best_triton_tflop_s']} TFLOP/s)", flush=True)
        del weights, biases
        torch.cuda.empty_cache()
    # a step's matmuls per width: cuBLAS against the best of cuBLAS and Triton per shape
    res["step_ms"] = {}
    for m in widths:
        rows = [res["shapes"][s]["widths"][m] for s in res["shapes"]]
        cublas = sum(r["ms"]["cublas"] for r in rows)
        best = sum(min(v for v in r["ms"].values() if v is not None) for r in rows)
        res["step_ms"][m] = {"cublas": round(cublas, 4), "best_per_shape": round(best, 4),
                             "saved_fraction": round(1 - best / cublas, 3)}
        print(f"width {m:4d}: the step's matmuls {cublas:.3f} ms with cuBLAS, {best:.3f} with the best per shape")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
