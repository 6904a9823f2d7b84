"""Fused elementwise kernels of a decode step (issue #32's tail; `Engine(elementwise="triton")`, the default on a GPU).

A decode step of the 28-layer model runs about 36 kernels per layer with the model's own modules: an RMSNorm is about
8 elementwise kernels, a RoPE about 10, the KV-cache writes and copies a few more. On a narrow step each costs a few
microseconds whatever its size, so their count, not the bytes, makes most of the step. Three Triton kernels do the
same arithmetic in one launch each:

- `add_rms_norm`: the residual add and the next RMSNorm (the add rounded to the model's dtype, the norm in fp32,
  cast, times the weight: the Qwen2/Llama modules' order of roundings);
- `rope_write_kv`: RoPE on each query and key head of the fused q/k/v projection's output, the rotated key and the
  value written into the slot's cache at its position, the rotated queries returned (each product and the sum
  rounded to the model's dtype, as `q * cos + rotate_half(q) * sin` rounds them: bit-identical);
- `silu_mul`: SiLU of the gate times the up projection, read straight from the fused gate/up output.

Each has a PyTorch reference written the modules' way; tests run the kernels in Triton's CPU interpreter.
"""
from __future__ import annotations

import functools

import torch

from llmhelpers.inference.kv_fp8 import FP8_MAX, MIN_SCALE, quantize_fp8
from llmhelpers.inference.scheduler import next_pow2


@functools.cache  # built on first use: importing this module needs no Triton
def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, out_h_ptr, out_x_ptr, eps, H, BLOCK: tl.constexpr,
                            HAS_DELTA: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        live = cols < H
        h = tl.load(h_ptr + row * H + cols, mask=live, other=0.0)
        if HAS_DELTA:
            delta = tl.load(d_ptr + row * H + cols, mask=live, other=0.0)
            h = (h.to(tl.float32) + delta.to(tl.float32)).to(out_h_ptr.dtype.element_ty)
            tl.store(out_h_ptr + row * H + cols, h, mask=live)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
        normed = (hf * rstd).to(out_x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=live, other=0.0)
        tl.store(out_x_ptr + row * H + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(
            out_x_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def rope_write_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, T,
                             HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                             FP8: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        dt = q_out_ptr.dtype.element_ty
        width = (HQ + 2 * HKV) * D
        i = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + row * D + i).to(tl.float32)
        c2 = tl.load(cos_ptr + row * D + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + row * D + i).to(tl.float32)
        s2 = tl.load(sin_ptr + row * D + HALF + i).to(tl.float32)
        x1 = tl.load(qkv_ptr + row * width + head * D + i).to(tl.float32)  # keys follow the query heads
        x2 = tl.load(qkv_ptr + row * width + head * D + HALF + i).to(tl.float32)
        # q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-x2, x1): each product and the sum rounded
        o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        if head < HQ:
            tl.store(q_out_ptr + (row * HQ + head) * D + i, o1)
            tl.store(q_out_ptr + (row * HQ + head) * D + HALF + i, o2)
        else:
            kv = head - HQ
            pos = tl.load(pos_ptr + row)
            at = ((row * HKV + kv) * T + pos) * D  # slot `row` of the decode step, its position
            j = tl.arange(0, D)
            v = tl.load(qkv_ptr + row * width + (HQ + HKV + kv) * D + j)
            if FP8:  # quantize_fp8's arithmetic: scale = max|x| / FP8_MAX (>= MIN_SCALE), x / scale, IEEE division
                k1, k2, vf = o1.to(tl.float32), o2.to(tl.float32), v.to(tl.float32)
                k_scale = tl.maximum(tl.div_rn(tl.maximum(tl.max(tl.abs(k1), axis=0), tl.max(tl.abs(k2), axis=0)),
                                               FP8_MAX), MIN_SCALE)
                v_scale = tl.maximum(tl.div_rn(tl.max(tl.abs(vf), axis=0), FP8_MAX), MIN_SCALE)
                tl.store(k_ptr + at + i, tl.div_rn(k1, k_scale).to(k_ptr.dtype.element_ty))
                tl.store(k_ptr + at + HALF + i, tl.div_rn(k2, k_scale).to(k_ptr.dtype.element_ty))
                tl.store(v_ptr + at + j, tl.div_rn(vf, v_scale).to(v_ptr.dtype.element_ty))
                tl.store(ks_ptr + at // D, k_scale)
                tl.store(vs_ptr + at // D, v_scale)
            else:
                tl.store(k_ptr + at + i, o1.to(k_ptr.dtype.element_ty))
                tl.store(k_ptr + at + HALF + i, o2.to(k_ptr.dtype.element_ty))
                tl.store(v_ptr + at + j, v.to(v_ptr.dtype.element_ty))

    @triton.jit
    def silu_mul_kernel(gu_ptr, out_ptr, INTER, BLOCK: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        live = cols < INTER
        dt = out_ptr.dtype.element_ty
        gate = tl.load(gu_ptr + row * 2 * INTER + cols, mask=live, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * INTER + INTER + cols, mask=live, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * INTER + cols, (act * up).to(dt), mask=live)

    return add_rms_norm_kernel, rope_write_kv_kernel, silu_mul_kernel


def add_rms_norm(hidden, delta, weight, eps: float):
    """(hidden + delta, RMSNorm of it) for rows [n, H]; delta None: (hidden, RMSNorm(hidden))."""
    kernel = _build()[0]
    n, width = hidden.shape
    normed = torch.empty_like(hidden)
    out = torch.empty_like(hidden) if delta is not None else hidden
    kernel[(n,)](hidden, delta if delta is not None else hidden, weight, out, normed, eps, width,
                 BLOCK=next_pow2(width), HAS_DELTA=delta is not None)
    return out, normed


def rope_write_kv(qkv, cos, sin, positions, k_cache, v_cache, hq: int, hkv: int, k_scale=None, v_scale=None):
    """Rows [n, (hq + 2 hkv) D] of the fused q/k/v projection: the queries rotated, returned [n, hq, D]; the keys
    rotated and the values written into slots 0..n-1 of the caches [S, hkv, T, D] at `positions` [n]. With scales
    [S, hkv, T] (an fp8 cache), each head vector is written as fp8 values and its scale (kv_fp8.quantize_fp8's)."""
    kernel = _build()[1]
    n = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty(n, hq, d, device=qkv.device, dtype=qkv.dtype)
    fp8 = k_scale is not None
    kernel[(n, hq + hkv)](qkv, cos, sin, positions, q, k_cache, v_cache, k_scale if fp8 else q, v_scale if fp8 else q,
                          k_cache.shape[2], HQ=hq, HKV=hkv, D=d, HALF=d // 2, FP8=fp8, FP8_MAX=FP8_MAX,
                          MIN_SCALE=MIN_SCALE)
    return q


def silu_mul(gate_up):
    """SiLU(gate) * up from the fused gate/up output [n, 2I]: [n, I]."""
    kernel = _build()[2]
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(n, inter, device=gate_up.device, dtype=gate_up.dtype)
    block = min(1024, next_pow2(inter))
    kernel[(n, -(-inter // block))](gate_up, out, inter, BLOCK=block)
    return out


# --- the references: the modules' own arithmetic -------------------------------------------------------------
def add_rms_norm_reference(hidden, delta, weight, eps: float):
    h = hidden if delta is None else hidden + delta
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * x.to(h.dtype)


def rope_write_kv_reference(qkv, cos, sin, positions, k_cache, v_cache, hq: int, hkv: int, k_scale=None,
                            v_scale=None):
    n, d = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.view(n, hq + 2 * hkv, d).split([hq, hkv, hkv], 1)

    def rotate(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]

    slots = torch.arange(n, device=qkv.device)
    for cache, scales, new in ((k_cache, k_scale, rotate(k)), (v_cache, v_scale, v)):
        if scales is None:
            cache.transpose(1, 2)[slots, positions] = new.to(cache.dtype)
        else:
            values, scale = quantize_fp8(new)
            cache.transpose(1, 2)[slots, positions] = values
            scales.transpose(1, 2)[slots, positions] = scale
    return rotate(q)


def silu_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, -1)
    return torch.nn.functional.silu(gate) * up
