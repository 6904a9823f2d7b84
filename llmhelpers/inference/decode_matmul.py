"""A Triton matmul for the decode step's linear layers (issue #32; `Engine(matmul="triton")`, off until measured).

At full width (487 slots) a decode step's projections are small-N matmuls: o_proj and down_proj write 487 x 1,536,
q/k/v 487 x 2,048. In tiles of 128 x 128 that is 48 to 64 tiles for an H200's 132 SMs: cuBLAS leaves most of the GPU
idle there unless its heuristics split K. `linear` chooses the tile per call from a table of launch choices
(`MatmulConfig`) and can split K into parts summed in a fixed order by a second kernel (deterministic: the same
inputs give the same bits, which the engine's keyed sampling needs). Each part accumulates in fp32 and the result
is rounded once, as cuBLAS does; the order of the additions differs from cuBLAS's, so results differ from
`F.linear`'s within the fp32 accumulation's rounding.

`bench/decode_matmuls.py` times every shape of the decode step at each width against cuBLAS, with 28 copies of each
weight cycled so that every call reads its weight from memory as a step's layers do.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: MatmulConfig = MatmulConfig()) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T + bias, as F.linear, through the Triton kernel with `config`'s launch choices."""
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
