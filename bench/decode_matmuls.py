"""The decode step's matmuls at each width: cuBLAS against the Triton kernel's launch choices (issue #32).

    python bench/decode_matmuls.py --out bench/results/<date>-<gpu>-decode-matmuls.json

Shapes of the R1-1.5B's decode step (the engine's fused projections): q/k/v [2,048 x 1,536] with its bias, o_proj
[1,536 x 1,536], gate/up [17,920 x 1,536], down [1,536 x 8,960], and the LM head [151,936 x 1,536]. For each width
(slots in the step) each shape is timed as a step runs it: 28 copies of the weight (one per layer, so each call
reads its weight from memory, not from L2) called in turn inside one CUDA graph (no launch gaps of the host), the
graph replayed. Timed: `F.linear` (cuBLAS), the same with cuBLASLt preferred, and every `decode_matmul.CANDIDATES`
launch choice of the Triton kernel, each checked against an fp32 reference (a choice further from it than cuBLAS's
rounding allows is reported and not counted). The verdict line: per width, the step's matmul time with cuBLAS
against the best choice per shape, and the TFLOP/s and weight TB/s each reaches.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
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

    from llmhelpers.inference.decode_matmul import CANDIDATES, linear

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
            row["ms"]["cublas"] = graph_ms([lambda w=w, b=b: F.linear(x, w, b) for w, b in zip(weights, biases)])
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                row["ms"]["cublaslt"] = graph_ms([lambda w=w, b=b: F.linear(x, w, b) for w, b in zip(weights, biases)])
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
