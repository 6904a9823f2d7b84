"""The fp8 KV cache's format (`kv_cache_dtype="fp8"`): each cached key or value head vector as float8 e4m3 values and
one float32 scale, its largest entry mapped to 448. The engine's module path and the fused decode kernels
(`llmhelpers.inference.decode_kernels`, which repeat this arithmetic on the GPU) both write it this way."""
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest e4m3 value: each cached head vector is scaled so its largest entry lands there
MIN_SCALE = 1e-12  # an all-zero vector keeps a finite scale


def quantize_fp8(x):
    """Head vectors (last dim) as float8 e4m3 values and one float32 scale each: x ~ values * scale."""
    scale = (x.float().abs().amax(-1) / FP8_MAX).clamp_min(MIN_SCALE)
    return (x.float() / scale[..., None]).to(FP8), scale


def dequantize_fp8(values, scale, dtype):
    return (values.float() * scale[..., None]).to(dtype)

