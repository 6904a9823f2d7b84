"""A continuous-batching decoder for Qwen2 and Llama models (every R1 distill, SmolLM2), for evaluation.

Why not `model.generate`: reasoning answers end at very different lengths (hundreds to thousands of tokens),
and a static batch keeps decoding until its longest member stops; its Python loop also bounds the GPU. Here:

- **Slots.** `slots` sequences decode together. When one finishes (eos or its budget), its slot is refilled with
  the next request. Prefills are batched: every slot ready in a step is prefilled in padded passes of similar
  lengths (whole prompts through causal attention over the pass itself), and a lone free slot waits until 1/32 of
  the live sequences would take part (a prefill's fixed cost is several steps).
- **KV cache.** One static cache per layer, `[slots, kv_heads, max_len, head_dim]`, allocated once. Decode
  attention reads only each slot's live length (a Triton split-K kernel on CUDA; a masked PyTorch reference
  elsewhere, which is also the kernel's test oracle).
- **CUDA graphs.** The decode step (all layers, sampling included) has static shapes and is captured once and
  replayed, so the per-step CPU cost is one graph launch and one copy of the new tokens.
- **Overlapped steps** (on a GPU). The next step is queued, its inputs made on the GPU, before the host reads this
  step's tokens, so the scheduler's Python runs while the GPU computes; it counts only where its inputs turn out to
  be the scheduler's (else it is dropped and the step runs again): the same tokens either way.
- **Pause and resume.** `on_token(request, tokens)` may return `PAUSE`; the engine keeps the slot's cache and
  hands the request to `on_pause(request, tokens)`, which returns token ids to append (e.g. an executed code
  block's output), or a `concurrent.futures.Future` of them: the slot waits while the others decode. The ids are
  fed through the following decode steps (up to `feed_max` of them) or prefilled into the slot at its current
  position, and decoding continues (`llmhelpers.inference.tool_use` builds on this).

The weights are the Hugging Face model's own (plain `nn.Linear`: bf16/fp32, base or merged; 4-bit or
adapter-wrapped models use `model.generate`). On a GPU a decode step runs the project's fused kernels
(`elementwise="triton"`, `llmhelpers.inference.decode_kernels`: add + RMSNorm, RoPE + cache write, SiLU * up, in the
modules' order of roundings) where they apply; prefills, and everything on a CPU, run the model's own norm, MLP and
RoPE modules (`elementwise="model"`), or with `elementwise="liger"` Liger's RMSNorm and RoPE kernels. Where training
on a GPU applied Liger's kernels in the same process, the model classes built afterwards already carry Liger's norms
and SwiGLU and the module's RoPE function is Liger's: the modules' path then runs those.
Sampling (`llmhelpers.inference.sampling.SamplingParams`) is temperature + top-p, or greedy; a seed fixes it: each
draw's random numbers are keyed by (run seed, request number, position), so an answer is the same whichever slot,
batch or tool timing it got. `fuse` (on by default on a GPU, where it was measured 4% faster) runs q/k/v and
gate/up as one matmul each and the split-KV combine as one kernel. Top-p is exact: on CUDA a sorting-free Triton
rejection sampler, elsewhere (and as its test oracle) the sorted-vocabulary reference. Temperature and top-p are
device tensors read inside the graphs: new values reuse them.
"""
from __future__ import annotations

import functools
import math
import os
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llmhelpers.environment import fp8_cache_refusal
from llmhelpers.inference.kv_fp8 import FP8, dequantize_fp8, quantize_fp8
from llmhelpers.inference.sampling import SamplingParams, draw_seed, sample_top_p_sorted, sample_top_p_triton
from llmhelpers.inference.scheduler import Request, Scheduler, next_pow2

# The decoder layouts the engine runs: Qwen2 (q/k/v biases, untied head: every R1-Distill-Qwen) and Llama (no biases,
# tied or untied head: R1-Distill-Llama, SmolLM2). The same layer walk serves both: a bias is part of nn.Linear and
# a tied head is the embedding matrix under lm_head.
ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")


def supports(model) -> bool:
    """The engine runs Qwen2 or Llama models whose linear layers are plain nn.Linear (not 4-bit, no adapters)."""
    if type(model).__name__ not in ARCHITECTURES or type(model).__module__.split(".")[:2] != ["transformers", "models"]:
        return False
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return bool(linears) and all(type(m) is torch.nn.Linear for m in linears)


KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: float8 e4m3 values with a scale per head vector


def kv_bytes_per_token(config, dtype, kv_cache_dtype: str = "auto") -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_vector = head_dim + 4 if kv_cache_dtype == "fp8" else head_dim * torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * config.num_key_value_heads * per_vector


def auto_slots(model, max_len: int, share: float = 0.85, cap: int = 512, kv_cache_dtype: str = "auto",
               free_bytes: int | None = None) -> int:
    """As many slots as fit their cache (and a step's logits) in `share` of the free GPU memory (or of `free_bytes`:
    what a smaller card would have free). Free means free on the device and within this process's memory cap: a
    training run with memory_limit_gib caps the process (training.memory.cap_memory), and an engine sized by the
    device alone would run out of memory under it, or take memory the limit kept for something else."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        return 8
    per_slot = kv_bytes_per_token(model.config, model.dtype, kv_cache_dtype) * max_len \
        + 4 * 4 * model.config.vocab_size
    free = min(torch.cuda.mem_get_info()[0], room_under_cap()) if free_bytes is None else free_bytes
    return int(max(1, min(cap, share * free // per_slot)))


def room_under_cap() -> int:
    """Bytes this process may still reserve under torch's per-process cap (set_per_process_memory_fraction; 1.0 when
    nothing limits it)."""
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    return max(0, int(torch.cuda.get_per_process_memory_fraction(device) * total) - torch.cuda.memory_reserved(device))


# --- attention over each slot's live length -------------------------------------------------------------------
def decode_attention_reference(q, k_cache, v_cache, lengths, scale, k_scale=None, v_scale=None):
    """q [S, Hq, D]; caches [S, Hkv, T, D]; lengths [S]: softmax(q k^T) v over positions < length. With k_scale and
    v_scale [S, Hkv, T], the caches hold fp8 values of each head vector divided by its scale."""
    S, Hq, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    keys = k_cache.float() if k_scale is None else k_cache.float() * k_scale[..., None]
    values = v_cache.float() if v_scale is None else v_cache.float() * v_scale[..., None]
    qg = q.view(S, Hkv, group, D).float()
    scores = torch.einsum("shgd,shtd->shgt", qg, keys) * scale
    live = torch.arange(T, device=q.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    out = torch.einsum("shgt,shtd->shgd", scores.softmax(-1), values)
    return out.reshape(S, Hq, D).to(q.dtype)


@functools.cache  # built on first use: importing the engine needs no Triton
def _build_triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kv_attention(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, m_ptr, l_ptr, ks_ptr, vs_ptr, scale,
                           T, chunk, Hkv: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                           NSPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                           FP8_KV: tl.constexpr, LIVE_SPLIT: tl.constexpr, out_ptr):
        slot, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(len_ptr + slot)
        if LIVE_SPLIT:  # the slot's own live length in NSPLIT parts (whole blocks), not the cache's capacity
            chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + (slot * Hkv * GROUP + heads[:, None]) * D + d[None, :], mask=g[:, None] < GROUP,
                    other=0.0)
        # an fp8 cache under a bf16 query: the dots run in fp16, since e4m3 -> fp16 is one conversion per two entries
        # where e4m3 -> bf16 is two per entry (through fp16): for sm_90, 145 warp instructions per KiB read instead of
        # 201 (128 keys, 4 warps; 182 against 229 at 64 keys: bench/attention_codegen.py; not yet timed on a GPU).
        # fp16 has the finer mantissa and the narrower range: the query enters divided by its largest entry, each
        # block's value scales divided by their largest (folded back in fp32)
        F16_DOTS: tl.constexpr = FP8_KV and q_ptr.dtype.element_ty == tl.bfloat16
        q_unit = 1.0
        if F16_DOTS:
            q_unit = tl.maximum(tl.max(tl.max(tl.abs(q.to(tl.float32)), axis=1), axis=0), 1e-30)
            q = (q.to(tl.float32) / q_unit).to(tl.float16)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        base = (slot * Hkv + kvh) * T * D
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            live = n < end
            kt = tl.trans(tl.load(k_ptr + base + n[:, None] * D + d[None, :], mask=live[:, None], other=0.0))
            # an fp8 cache: each key's scale multiplies its score and each value's scale its probability, so the
            # fp8 values enter the dot as they are (fp8 to the query's dtype is exact): no [BLOCK_N, D] rescaling
            if FP8_KV:
                k_s = tl.load(ks_ptr + base // D + n, mask=live, other=0.0)
                s = tl.dot(q, kt.to(q.dtype)).to(tl.float32) * (k_s[None, :] * (scale * q_unit))
            else:
                s = tl.dot(q, kt).to(tl.float32) * scale
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_ptr + base + n[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
            if FP8_KV:
                v_s = tl.load(vs_ptr + base // D + n, mask=live, other=0.0)
                v_unit = 1.0
                if F16_DOTS:  # p times the values' scales relative to the block's largest: in [0, 1] whatever the
                    v_unit = tl.maximum(tl.max(v_s, axis=0), 1e-30)  # values' size (fp16's subnormals start at 6e-5)
                    v_s = v_s / v_unit
                pv = tl.dot((p * v_s[None, :]).to(q.dtype), v.to(q.dtype)).to(tl.float32) * v_unit
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv.to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        keep = g < GROUP
        # a slot whose live tokens all lie in its first split (many slots of a wide step: splits of 2,199 tokens, a
        # mean live length near 1,650) has a complete softmax in split 0, which writes the output itself: the
        # combine kernel skips the slot, and its empty splits write nothing
        parts = tl.cdiv(length, chunk)
        row = slot * Hkv * GROUP + heads
        tl.store(out_ptr + row[:, None] * D + d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=tl.where(keep, (parts <= 1) & (split == 0), False)[:, None])
        if NSPLIT > 1:
            part = tl.where(keep, (parts > 1) & (start < length), False)
            row = row * NSPLIT + split
            tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=part[:, None])
            tl.store(m_ptr + row, m_i, mask=part)
            tl.store(l_ptr + row, l_i, mask=part)

    @triton.jit
    def combine_splits(acc_ptr, m_ptr, l_ptr, out_ptr, len_ptr, chunk, HQ: tl.constexpr, NSPLIT: tl.constexpr,
                       BLOCK_H: tl.constexpr, D: tl.constexpr, LIVE_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
        # one program per slot (all its query heads): the splits' partial softmaxes rescaled to their common max and
        # summed in split order. Only the splits holding live tokens wrote one, and a slot held whole by its first
        # split has its output already: its program returns at once. (One program per slot and head, 5,844 at 487
        # slots, took 17 us per layer on an H200 even when every slot was whole: the grid, not the bytes.)
        slot = tl.program_id(0)
        length = tl.load(len_ptr + slot)
        if LIVE_SPLIT:  # the split kernel's own cut of this slot's live length
            chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_N) * BLOCK_N
        parts = tl.cdiv(length, chunk)
        if parts > 1:
            h = tl.arange(0, BLOCK_H)
            d = tl.arange(0, D)
            heads = h < HQ
            rows = slot * HQ + h
            top = tl.full([BLOCK_H], float("-inf"), tl.float32)
            for sp in range(0, parts):
                top = tl.maximum(top, tl.load(m_ptr + rows * NSPLIT + sp, mask=heads, other=0.0))
            num = tl.zeros([BLOCK_H, D], tl.float32)
            den = tl.zeros([BLOCK_H], tl.float32)
            for sp in range(0, parts):
                w = tl.exp(tl.load(m_ptr + rows * NSPLIT + sp, mask=heads, other=0.0) - top)
                den += tl.load(l_ptr + rows * NSPLIT + sp, mask=heads, other=0.0) * w
                num += tl.load(acc_ptr + (rows * NSPLIT + sp)[:, None] * D + d[None, :], mask=heads[:, None],
                               other=0.0) * w[:, None]
            tl.store(out_ptr + rows[:, None] * D + d[None, :], (num / den[:, None]).to(out_ptr.dtype.element_ty),
                     mask=heads[:, None])

    return split_kv_attention, combine_splits


def split_length(capacity: int, nsplit: int) -> int:
    """Positions per split when a cache of `capacity` positions is cut into `nsplit` (whole blocks of 64): a slot
    with at most this many live tokens is read whole by its first split."""
    return max(64, math.ceil(capacity / nsplit / 64) * 64)


def decode_attention_triton(q, k_cache, v_cache, lengths, scale, k_scale=None, v_scale=None, nsplit: int = 4,
                            block_n: int = 64, num_warps: int = 4, live_split: bool = False,
                            num_stages: int | None = None):
    """Flash-decoding: each (slot, kv head, split) program reads only its part of the slot's live positions
    (`lengths`, int32). With k_scale and v_scale (fp8 caches), each head vector is its fp8 values times its scale.
    The cache's capacity is cut into `nsplit` parts (a slot of 1,650 live tokens in a cache of 8,793 has one working
    split of four), or with `live_split` each slot's own live length is (measured on an H200: no faster end to end,
    off). A slot whose live tokens lie in its first split gets its output from that split's program; the others' splits
    are combined by one Triton kernel, which skips the whole slots. `num_stages` (Triton's software pipelining; None:
    its default) is a launch choice `bench/profile_engine.py` sweeps with the block size and warps: the fp8 cache's
    kernel ran no faster than bf16's on half the bytes (`bench/attention_codegen.py` shows why: it is bound by
    instructions, not memory)."""
    S, Hq, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    chunk = split_length(T, nsplit)
    nsplit = nsplit if live_split else math.ceil(T / chunk)
    out = torch.empty(S, Hq, D, device=q.device, dtype=q.dtype)
    if nsplit == 1:  # each program reads a slot's whole cache and writes the output itself: no partial results
        acc = m = l = out
    else:
        acc = torch.empty(S, Hq, nsplit, D, device=q.device, dtype=torch.float32)
        m = torch.empty(S, Hq, nsplit, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
    fp8 = k_scale is not None
    split_kernel, combine_kernel = _build_triton_kernel()
    lengths = lengths.to(torch.int32)
    split_kernel[(S, Hkv, nsplit)](q.contiguous(), k_cache, v_cache,
                                     lengths, acc, m, l,
                                     k_scale if fp8 else m, v_scale if fp8 else m, scale,
                                     T, chunk, Hkv=Hkv, GROUP=group, D=D, NSPLIT=nsplit,
                                     BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, FP8_KV=fp8,
                                     LIVE_SPLIT=live_split, out_ptr=out,
                                     num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}))
    if nsplit > 1:
        combine_kernel[(S,)](acc, m, l, out, lengths, chunk, HQ=Hq, NSPLIT=nsplit, BLOCK_H=max(16, next_pow2(Hq)),
                             D=D, LIVE_SPLIT=live_split, BLOCK_N=block_n)
    return out


def decode_splits(width: int, kv_heads: int, sms: int, least: int = 4, most: int = 64) -> int:
    """Splits of each slot's cache for a decode step of `width` slots: at least `least` (today's), and as many as
    give about four programs per SM when (slot, kv head) pairs are fewer than that."""
    return max(least, min(most, math.ceil(4 * sms / max(1, width * kv_heads))))


ELEMENTWISE = ("model", "liger", "triton")


def decode_kernels_refusal(cuda: bool, fuse: bool, activation: str, head_dim: int) -> str | None:
    """Why the fused decode kernels (elementwise="triton") cannot run this engine, or None when they can."""
    if not fuse:
        return "reads the fused q/k/v and gate/up outputs: it needs fuse=True"
    if activation != "silu":
        return f"computes SiLU(gate) * up (this model's activation: {activation})"
    if head_dim & (head_dim - 1):
        return f"needs a power-of-two head size (this model's: {head_dim})"  # its RoPE kernel works on halves
    if not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return "needs a CUDA model (or Triton's interpreter)"
    return None


def _module_norm(module, x):
    return module(x)


def liger_elementwise(device) -> tuple[Callable, Callable]:
    """Liger's RMSNorm and RoPE Triton kernels as the engine's (norm(module, x), rope(q, k, cos, sin)): the same math
    as the Qwen2/Llama modules (RMSNorm in fp32, cast, times the weight: Liger's "llama" casting), fewer launches."""
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("elementwise='liger' needs a CUDA model and liger-kernel installed; use 'model'")
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def norm(module, x):
        return LigerRMSNormFunction.apply(x, module.weight, module.variance_epsilon, 0.0, "llama", False)

    return norm, liger_rotary_pos_emb


# the first layer of a fused group -> weak references to its fused (weight, bias), while an engine holds them
_FUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fuse_rows(*linears) -> tuple:
    """One weight (and bias) whose row blocks are these nn.Linear layers' weights, for one matmul over their shared
    input; each layer's weight (and bias) becomes a view of its block, so the model is unchanged, the memory is not
    doubled, and an in-place update of a layer's weight (MergedPolicy.refresh) updates the fused one. Layers that are
    still the views of a fusion an engine holds get that same fused weight back: a second engine on the model does
    not leave the first one reading stale weights (a fusion no engine holds any more is made again, one copy)."""
    refs = _FUSED.get(linears[0])
    earlier = (refs[0](), refs[1]() if refs[1] is not None else None) if refs else (None, None)
    if earlier[0] is not None and _still_views(linears, *earlier):
        return earlier
    weight = torch.cat([lin.weight.data for lin in linears])
    bias = torch.cat([lin.bias.data for lin in linears]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start:start + rows]
        if bias is not None:
            lin.bias.data = bias[start:start + rows]
        start += rows
    # weak: an engine keeps its fused weights; kept here too, they would outlive a model moved (`.to`) or reloaded
    _FUSED[linears[0]] = (weakref.ref(weight), weakref.ref(bias) if bias is not None else None)
    return weight, bias


def _still_views(linears, weight, bias) -> bool:
    """Whether each layer's weight (and bias) is still its row block of `weight` (and `bias`), not a tensor assigned
    since (load_state_dict copies in place and keeps them; `layer.weight = ...` does not)."""
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        for own, fused in ((lin.weight, weight), (lin.bias, bias)):
            if (own is None) != (fused is None):
                return False
            if own is not None and (own.data_ptr() != fused[start:start + rows].data_ptr()
                                    or own.shape != fused[start:start + rows].shape or own.dtype != fused.dtype):
                return False
        start += rows
    return start == weight.shape[0]


# --- the engine ------------------------------------------------------------------------------------------
@dataclass
class DecodeStep:
    """A queued decode step of the first `width` slots: its inputs as the host knows them, where its sampled tokens
    land, and its CUDA events (its time on the GPU)."""
    width: int
    start: object = None
    end: object = None
    t0: float = 0.0
    out: torch.Tensor | None = None
    tokens: list[int] | None = None
    positions: list[int] | None = None
    indices: list[int] | None = None
    known: dict[int, tuple[int, int]] | None = None  # a queued step's inputs set from the host: slot -> (token,
    # position) for appended text being fed and for paused slots (Scheduler.known_next)
    cache_writes: int = 0  # the engine's count of prefills and moves when the step was queued

    def follow(self, previous: DecodeStep, sampled: list[int], max_len: int) -> None:
        """A step queued after `previous`: its inputs were `previous`'s sampled tokens (or the known ones) at the
        next positions."""
        self.tokens = list(sampled)
        self.positions = [min(p + 1, max_len - 1) for p in previous.positions]
        for slot, (token, position) in (self.known or {}).items():
            self.tokens[slot], self.positions[slot] = token, position

    def matches(self, width: int, tokens: list[int], positions: list[int], indices: list[int],
                decoding: list[int], cache_writes: int) -> bool:
        """Whether these were the scheduler's inputs for every slot whose token counts (others' rows are ignored)
        and no prefill or move has written a cache since this step was queued."""
        return width == self.width and cache_writes == self.cache_writes and all(
            tokens[s] == self.tokens[s] and positions[s] == self.positions[s] and indices[s] == self.indices[s]
            for s in decoding)


class Engine:
    def __init__(self, model, slots: int, max_len: int, use_cuda_graph: bool | None = None,
                 kv_cache_dtype: str = "auto", fuse: bool | None = None, split_narrow_steps: bool = False,
                 elementwise: str | None = None, live_split: bool = False, overlap_steps: bool | None = None,
                 attention_launch: dict | None = None, causal_prefill: bool = True, unsplit_wide_steps: bool = False):
        if not supports(model):
            raise ValueError(f"the engine needs a {' or '.join(ARCHITECTURES)} with plain nn.Linear layers "
                             "(bf16/fp32, merged); use model.generate for 4-bit or adapter-wrapped models")
        import importlib

        self.model, self.slots, self.max_len = model, slots, max_len
        c = model.config
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.hq, self.hkv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        cuda = self.device.type == "cuda"
        # fuse (issue #32, lever 2): fewer, larger kernels per step: q/k/v and gate/up as one matmul each (the
        # model's weights become row blocks of the fused ones: no extra memory) and the split-KV combine as one kernel.
        # On by default on a GPU: 2,000 answers of the R1-1.5B on an H200 ran at 21,845 tok/s against 20,993 unfused
        # (bench/results/2026-12-03-h200-eval.json); the CPU keeps separate matmuls (not measured there)
        fuse = cuda if fuse is None else fuse
        # elementwise="triton" (the default where it applies: a GPU, fused projections, SiLU, a power-of-two head
        # size; an fp8 cache too, its values and scales written by the RoPE kernel): decode steps through the
        # project's fused kernels (llmhelpers.inference.decode_kernels: add + norm, RoPE + cache write, SiLU * up; the
        # modules' roundings), prefills through the model's modules. On an H200 a full-width step took 9.7 ms against
        # 12.7 with the modules, 8 slots 2.4 against 4.2 ms, and 2,000 answers ran at 27,523 tok/s
        # (bench/results/2026-12-03-h200-decode-kernels.json). "model": the model's own RMSNorm modules and its
        # module's RoPE function (Liger's where training on a GPU applied Liger's kernels in this process); "liger":
        # Liger's RMSNorm and RoPE kernels (between the two: 10.7 ms full width)
        refusal = decode_kernels_refusal(cuda, fuse, c.hidden_act, self.head_dim)
        if elementwise is None:
            elementwise = "triton" if cuda and not refusal else "model"
        if elementwise not in ELEMENTWISE:
            raise ValueError(f"elementwise={elementwise!r}: must be one of {ELEMENTWISE}")
        if elementwise == "liger":
            self.norm, self.rope = liger_elementwise(self.device)
        else:
            self.norm = _module_norm
            self.rope = importlib.import_module(type(model).__module__).apply_rotary_pos_emb  # the model's own RoPE
        self.scale = self.head_dim ** -0.5
        self.decode_attention = decode_attention_triton if cuda else decode_attention_reference
        # the MLP's activation from the config: after Liger's kernels were applied in this process (training on a
        # GPU), the model classes' MLPs are Liger's SwiGLU modules, which have no `act_fn`
        from transformers.activations import ACT2FN

        self.act = ACT2FN[c.hidden_act]
        self.fused = [fuse_rows(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
                      + fuse_rows(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in model.model.layers] \
            if fuse else None
        if live_split and cuda:  # each slot's own live length in the splits, not the cache's capacity (off: measured)
            self.decode_attention = functools.partial(self.decode_attention, live_split=True)
        self.elementwise = elementwise
        # causal_prefill: whole prompts attend through causal SDPA over their own pass (see _extend); False: through
        # the cache with a mask, as appended text always does (the path before; kept to measure against)
        self.causal_prefill = causal_prefill
        self.decode_kernels_refusal = refusal  # why the fused decode kernels do not apply here (None: they do)
        self.decode_kernels = elementwise == "triton"
        if self.decode_kernels and refusal:
            raise ValueError(f"elementwise='triton' {refusal}; use 'model'")
        # split_narrow_steps (issue #32, lever 1; off: 5-14% shorter narrow steps in the profile, no gain end to end on
        # an H200, 33,841 against 33,994 tok/s, 2026-12-04): a narrow step (the tail) has too few (slot, kv head) pairs
        # to occupy the GPU with 4 splits each; give each pair more splits, shorter ones
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 0
        self.split_narrow_steps = split_narrow_steps and cuda
        # unsplit_wide_steps (issue #32; off: on an H200 2,000 answers took 29,650 tok/s with it against 29,901 without,
        # 2026-12-03, though its full-width profile step was shorter): a step with at least 4 (slot, kv head) pairs per
        # SM has work enough for every SM without splitting caches, so each program reads its slot's whole cache and
        # writes the output: no combine kernel (0.50 of a 10.1 ms full-width step on an H200) and no empty splits
        self.unsplit_wide_steps = unsplit_wide_steps and cuda
        self.use_cuda_graph = cuda if use_cuda_graph is None else use_cuda_graph
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: must be one of {KV_CACHE_DTYPES}")
        self.fp8 = kv_cache_dtype == "fp8"
        # the attention kernel's launch choices (block_n, num_warps, num_stages: decode_attention_triton), to measure
        # end to end what bench/profile_engine.py's sweep finds. An fp8 cache reads blocks of 128 keys: on an H200
        # 0.393 ms for one layer at 487 slots of mixed lengths against 0.435 with 64 (2026-12-04, third session)
        launch = {"block_n": 128} if self.fp8 else {}
        launch.update(attention_launch or {})
        if launch and cuda:
            self.decode_attention = functools.partial(self.decode_attention, **launch)
        if self.fp8 and cuda and (refusal := fp8_cache_refusal(torch.cuda.get_device_capability(self.device),
                                                              torch.cuda.get_device_name(self.device))):
            raise ValueError(refusal)
        # what one decode step must read from memory (the bandwidth bound, issue #32): each weight once (the
        # embedding table only where it is also the LM head: otherwise a step reads one row per slot), and the live KV
        embed = model.model.embed_tokens.weight
        weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
        tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
        self.weight_bytes = sum(weights.values()) - (0 if tied else embed.numel() * embed.element_size())
        self.kv_bytes_token = kv_bytes_per_token(c, self.dtype, kv_cache_dtype)
        shape = (slots, self.hkv, max_len, self.head_dim)
        cache_dtype = FP8 if self.fp8 else self.dtype
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=cache_dtype) for _ in model.model.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=cache_dtype) for _ in model.model.layers]
        # fp8: one float32 scale per cached head vector (2 x 4 bytes per position and kv head, against 2 x 128 saved)
        self.k_scale = [torch.ones(shape[:3], device=self.device) if self.fp8 else None for _ in model.model.layers]
        self.v_scale = [torch.ones(shape[:3], device=self.device) if self.fp8 else None for _ in model.model.layers]
        # static inputs and outputs of the decode step
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        # overlap_steps (issue #32; on by default on a GPU): the next decode step is queued, its inputs made on the GPU
        # (each slot's sampled token at the next position), before this step's tokens reach the host; the scheduler's
        # work then runs while the GPU computes, and the queued step counts only where its inputs are the ones the
        # scheduler chose for every decoding slot and no prefill or move wrote a cache since it was queued (otherwise
        # it is dropped and the step runs again). Identical tokens either way: each draw is keyed by (request,
        # position), each slot's row computed alone. On an H200, 2,000 answers ran at 29,484 tok/s against 28,025
        # without (host time 0.6 s against 11.2 s; bench/results/2026-12-03-h200-eval-overlap.json)
        self.overlap_steps = cuda if overlap_steps is None else overlap_steps
        pinned = cuda  # host buffers the GPU copies into (and from) without waiting for the stream
        self._staging = torch.zeros(3, slots, dtype=torch.long, pin_memory=pinned)
        self._out = [torch.zeros(slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._known = [torch.zeros(3 * slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._launches = self._queued = 0
        # prefills and moves write caches from the host's side: a step queued before one of them read the old cache
        # (a resumed slot's inputs may equal what the queued step guessed while its prefilled text is not in there)
        self._host_cache_writes = 0
        self.sampling = SamplingParams()
        # read inside the decode graphs: new values need no new capture (SamplingParams.greedy does: argmax)
        self.temperature = torch.ones((), dtype=torch.float32, device=self.device)
        self.top_p = torch.ones((), dtype=torch.float32, device=self.device)
        self.feed_max = 32  # appended text up to this many tokens is fed through decode steps, longer is prefilled
        self.sampler = "triton" if cuda else "sort"  # the same distribution; "sort" is the reference
        # each draw is keyed by (run seed, request number, position): an answer does not depend on its slot, on
        # the number of slots, or on when a tool's output arrived (llmhelpers.inference.sampling.draw_seed)
        self.run_seed = torch.zeros((), dtype=torch.long, device=self.device)
        self.request_index = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple, object] = {}  # (width, greedy, sampler) -> the captured decode step
        self._reset_stats()  # of the last run: steps, prefills and where the time went

    def _reset_stats(self) -> None:
        # prefill_gpu_s: each prefill on the GPU's clock, from the end of the decode step queued before it (which its
        # wall time, prefill_s, also waits for) to its last kernel; prefill_tokens: the ids its passes computed
        self.stats = {"decode_steps": 0, "decode_s": 0.0, "prefills": 0, "shared_prefills": 0, "prefill_passes": 0,
                      "prefill_s": 0.0, "prefill_gpu_s": 0.0, "prefill_tokens": 0, "steps_below_full_width": 0,
                      "pauses": 0, "full_width_s": 0.0, "full_width_bytes": 0, "overlap_used_steps": 0,
                      "overlap_dropped_steps": 0,
                      "kv_tokens_read": 0}  # cached tokens the decode steps' attention read, every row counted
        self.steps_by_width: dict[int, list] = {}  # width -> [decode steps, their seconds]: where the tail's time goes

    # one decoder pass over new tokens at given positions, writing their k/v into the slot caches
    def _layers(self, hidden, slot_idx, positions, attend):
        rot = self.model.model.rotary_emb(hidden, positions)
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            x = self.norm(layer.input_layernorm, hidden)
            B, T, _ = x.shape
            q, k, v = self._attention_inputs(i, x, B, T, rot)
            a = attend(i, q, k, v, slot_idx, positions)  # [B, T, Hq * D]
            hidden = hidden + attn.o_proj(a)
            x = self.norm(layer.post_attention_layernorm, hidden)
            if self.fused:
                _, _, gate_up_w, gate_up_b = self.fused[i]
                gate, up = F.linear(x, gate_up_w, gate_up_b).chunk(2, -1)  # a bias: Llama's mlp_bias=True
                hidden = hidden + layer.mlp.down_proj(self.act(gate) * up)
            else:
                hidden = hidden + layer.mlp(x)
        return self.norm(self.model.model.norm, hidden)

    def _attention_inputs(self, i, x, B, T, rot):
        """Layer i's queries, keys and values [B, heads, T, D] from its normed input (rows [B, T, H] or [B * T, H]):
        one fused projection (or the modules'), RoPE on the queries and keys."""
        attn = self.model.model.layers[i].self_attn
        if self.fused:
            qkv_w, qkv_b, _, _ = self.fused[i]
            q, k, v = F.linear(x, qkv_w, qkv_b).split([self.hq * self.head_dim, self.hkv * self.head_dim,
                                                        self.hkv * self.head_dim], -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(B, T, self.hq, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.hkv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.hkv, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, *rot)
        return q, k, v

    def _norms_in_turn(self):
        """(layer 0's input norm, the norm after each layer's MLP: the next layer's input norm, then the final one)
        for the kernels that add the residual and norm in one pass."""
        layers = self.model.model.layers
        return layers[0].input_layernorm, [layer.input_layernorm for layer in layers[1:]] + [self.model.model.norm]

    def _kernel_layers(self, hidden, slot_idx, positions, attend):
        """_layers through the fused elementwise kernels (elementwise="triton"), for prefill: the residual add with
        the next RMSNorm in one kernel and SiLU * up in one (the modules' path runs the norm as ~7 fp32 passes over
        every token); RoPE, the projections and `attend` as in _layers. hidden [B, T, H]."""
        from llmhelpers.inference import decode_kernels as kernels

        B, T, width = hidden.shape
        rot = self.model.model.rotary_emb(hidden, positions)
        first, following = self._norms_in_turn()
        hidden, x = kernels.add_rms_norm(hidden.reshape(B * T, width), None, first.weight, first.variance_epsilon)
        for i, layer in enumerate(self.model.model.layers):
            q, k, v = self._attention_inputs(i, x, B, T, rot)
            a = attend(i, q, k, v, slot_idx, positions)  # [B, T, Hq * D]
            norm = layer.post_attention_layernorm
            hidden, x = kernels.add_rms_norm(hidden, layer.self_attn.o_proj(a.reshape(B * T, -1)), norm.weight,
                                             norm.variance_epsilon)
            _, _, gate_up_w, gate_up_b = self.fused[i]
            up = kernels.silu_mul(F.linear(x, gate_up_w, gate_up_b))
            hidden, x = kernels.add_rms_norm(hidden, layer.mlp.down_proj(up), following[i].weight,
                                             following[i].variance_epsilon)
        return x.view(B, T, width)

    # the KV cache: every write and every prefill read goes through these two (an fp8 cache keeps a scale per vector)
    def _write_kv(self, i, slots, positions, k, v):
        """Keys and values [N, Hkv, D] into layer i's caches at the (slot, position) pairs."""
        for cache, scales, new in ((self.k_cache[i], self.k_scale[i], k), (self.v_cache[i], self.v_scale[i], v)):
            if scales is None:
                cache.transpose(1, 2)[slots, positions] = new
            else:
                values, scale = quantize_fp8(new)
                cache.transpose(1, 2)[slots, positions] = values
                scales.transpose(1, 2)[slots, positions] = scale

    def _read_kv(self, i, slots, end: int, dtype):
        """Layer i's keys and values of `slots` up to position `end`, in `dtype`."""
        out = []
        for cache, scales in ((self.k_cache[i], self.k_scale[i]), (self.v_cache[i], self.v_scale[i])):
            held = cache[slots, :, :end]
            out.append(held if scales is None else dequantize_fp8(held, scales[slots, :, :end], dtype))
        return out

    def _decode_attend(self, i, q, k, v, slot_idx, positions):
        n = q.shape[0]  # the first n slots decode (after compaction, fewer than all)
        pos = positions[:, 0]
        self._write_kv(i, slot_idx, pos, k[:, :, 0], v[:, :, 0])
        return self._attend_cache(i, q[:, :, 0], (pos + 1).to(torch.int32)).reshape(n, 1, -1)

    def _attend_cache(self, i, q, lengths):
        """Decode attention of queries [n, Hq, D] over layer i's cache of the first n slots, each over its first
        `lengths` [n] int32 positions (its new key and value already written)."""
        n = q.shape[0]
        scales = (self.k_scale[i][:n], self.v_scale[i][:n]) if self.fp8 else (None, None)
        splits = {"nsplit": decode_splits(n, self.hkv, self.sms)} if self.split_narrow_steps else {}
        if self.unsplit_wide_steps and n * self.hkv >= 4 * self.sms:
            splits = {"nsplit": 1}
        return self.decode_attention(q, self.k_cache[i][:n], self.v_cache[i][:n], lengths, self.scale, *scales,
                                     **splits)

    def set_sampling(self, sampling: SamplingParams) -> None:
        """The settings the next steps draw with; the seed (when set) restarts the random numbers."""
        self.sampling = sampling
        self.temperature.fill_(sampling.temperature or 1.0)
        self.top_p.fill_(sampling.top_p)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self.run_seed.fill_(int(torch.randint(0, 2**31 - 1, ())))  # from torch's generator: seeded runs repeat

    def _sample(self, logits, seeds):
        """One token per row; `seeds` ([rows] int64) key each row's random numbers."""
        if self.sampling.greedy:
            return logits.argmax(-1)
        if self.sampler == "triton":
            return sample_top_p_triton(logits, self.temperature, self.top_p, seeds)
        return sample_top_p_sorted(logits, self.temperature, self.top_p, seeds)

    def _decode_kernel_layers(self, n: int):
        """The decoder layers of a decode step through the fused kernels (elementwise="triton"): per layer the q/k/v
        matmul, RoPE + cache write, attention, o_proj, add + norm, the gate/up matmul, SiLU * up, down, add + norm
        (the next layer's input norm, or the final one). Returns the final norm's output [n, H]."""
        from llmhelpers.inference import decode_kernels as kernels

        pos = self.positions[:n]
        hidden = self.model.model.embed_tokens(self.tokens[:n])
        cos, sin = (t.reshape(n, -1) for t in self.model.model.rotary_emb(hidden[:, None], pos[:, None]))
        first, following = self._norms_in_turn()
        hidden, x = kernels.add_rms_norm(hidden, None, first.weight, first.variance_epsilon)
        lengths = (pos + 1).to(torch.int32)  # once per step, not per layer: two launches fewer per layer
        for i, layer in enumerate(self.model.model.layers):
            qkv_w, qkv_b, gate_up_w, gate_up_b = self.fused[i]
            q = kernels.rope_write_kv(F.linear(x, qkv_w, qkv_b), cos, sin, pos, self.k_cache[i], self.v_cache[i],
                                      self.hq, self.hkv, self.k_scale[i], self.v_scale[i])
            a = self._attend_cache(i, q, lengths)
            norm = layer.post_attention_layernorm
            hidden, x = kernels.add_rms_norm(hidden, layer.self_attn.o_proj(a.reshape(n, -1)), norm.weight,
                                             norm.variance_epsilon)
            up = kernels.silu_mul(F.linear(x, gate_up_w, gate_up_b))
            hidden, x = kernels.add_rms_norm(hidden, layer.mlp.down_proj(up), following[i].weight,
                                             following[i].variance_epsilon)
        return x

    def _decode_step(self, n: int):
        if self.decode_kernels:
            logits = self.model.lm_head(self._decode_kernel_layers(n))
        else:
            hidden = self.model.model.embed_tokens(self.tokens[:n, None])
            slot_idx = torch.arange(n, device=self.device)
            hidden = self._layers(hidden, slot_idx, self.positions[:n, None], self._decode_attend)
            logits = self.model.lm_head(hidden[:, -1])
        seeds = draw_seed(self.run_seed, self.request_index[:n], self.positions[:n])  # in the graph: read each replay
        self.next_tokens[:n].copy_(self._sample(logits, seeds))

    def _step(self, n: int):
        """One decode step of the first n slots: a CUDA graph per n, captured on first use and replayed."""
        if not self.use_cuda_graph:
            self._decode_step(n)
            return
        key = (n, self.sampling.greedy, self.sampler)
        if key not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: kernels compiled and autotuned outside the capture
                    self._decode_step(n)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_step(n)
            self.graphs[key] = graph
        self.graphs[key].replay()

    def _move(self, src: int, dst: int, length: int):
        self._host_cache_writes += 1
        for cache in (*self.k_cache, *self.v_cache, *self.k_scale, *self.v_scale):
            if cache is not None:
                cache[dst, :, :length] = cache[src, :, :length]

    def _extend(self, items: list[tuple[int, list[int], int]], draws: list[list[int]]) -> list[list[int]]:
        """Prefill several slots in one forward pass: each item is (slot, ids, start), ids written at positions
        start.. of that slot (a prompt at 0, or text appended after a pause). Returns, per item, one token sampled
        after its last id for each (request number, position) key in `draws[i]` (draw_seed's). The batch is padded
        to its longest item; padding is neither cached nor attended."""
        self.stats["prefill_passes"] += 1
        n, width = len(items), max(len(ids) for _, ids, _ in items)
        ids_t = torch.zeros(n, width, dtype=torch.long)
        pos_t = torch.zeros(n, width, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        for b, (_, ids, start) in enumerate(items):
            ids_t[b, :len(ids)] = torch.tensor(ids)
            pos_t[b, :len(ids)] = torch.arange(start, start + len(ids))
            valid[b, :len(ids)] = True
        ids_t, pos_t, valid = ids_t.to(self.device), pos_t.to(self.device), valid.to(self.device)
        slots = torch.tensor([slot for slot, _, _ in items], device=self.device)
        end = max(start + len(ids) for _, ids, start in items)
        rows, cols = valid.nonzero(as_tuple=True)  # the real (not padding) tokens
        cache_slot, cache_pos = slots[rows], pos_t[rows, cols]
        # whole prompts in a cache of the model's dtype: what the cache holds after the write is exactly this pass's
        # keys and values, and a token sees its own prompt's earlier tokens only, so plain causal attention over the
        # pass's own (right-padded) rows is the same attention, with no mask and no read back (FlashAttention's path)
        causal = self.causal_prefill and not self.fp8 and all(start == 0 for _, _, start in items)
        # otherwise (appended text, an fp8 cache) a query sees its own slot's positions up to its own; padding
        # queries see everything (their output is discarded, and a row with nothing to attend would give NaN)
        mask = None if causal else \
            (torch.arange(end, device=self.device)[None, None, :] <= pos_t[:, :, None]) | ~valid[:, :, None]

        def attend(i, q, k, v, slot_idx, positions):
            self._write_kv(i, cache_slot, cache_pos, k.transpose(1, 2)[rows, cols], v.transpose(1, 2)[rows, cols])
            if causal:
                group = self.hq // self.hkv  # keys and values per query head: every SDPA backend takes them so
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True, scale=self.scale)
            else:  # written first and read back: the text attends to what later steps will read (fp8's rounding)
                keys, values = self._read_kv(i, slots, end, q.dtype)
                out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                                                       scale=self.scale, enable_gqa=True)
            return out.transpose(1, 2).reshape(n, width, -1)

        # the fused elementwise kernels where the decode steps use them; an fp8 cache keeps the modules' path (its
        # quantized values are compared with theirs bit for bit)
        layers = self._kernel_layers if self.decode_kernels and not self.fp8 else self._layers
        hidden = layers(self.model.model.embed_tokens(ids_t), None, pos_t, attend)
        last = hidden[torch.arange(n, device=self.device), valid.sum(1) - 1]
        counts = [len(keys) for keys in draws]
        logits = self.model.lm_head(last).repeat_interleave(torch.tensor(counts, device=self.device), dim=0)
        request, position = torch.tensor([key for keys in draws for key in keys], device=self.device).T
        tokens, out = self._sample(logits, draw_seed(self.run_seed, request, position)).tolist(), []
        for count in counts:
            out.append(tokens[:count])
            tokens = tokens[count:]
        return out

    def _extend_batches(self, items, draws):
        """_extend over groups of similar length, each small enough that its attention scores (if the attention
        backend materialises them) stay under 1 GiB: (item, its draws) per item. Whole prompts and appended text go
        in groups of their own (a group of whole prompts takes _extend's causal path)."""
        budget = 2**30 // (4 * self.hq)
        out, group, width, end = [], [], 0, 0

        def run(group):
            return list(zip([item for item, _ in group], self._extend([i for i, _ in group], [d for _, d in group])))

        for item, count in sorted(zip(items, draws), key=lambda it: (it[0][2] > 0, len(it[0][1]))):
            _, ids, start = item
            if group and ((len(group) + 1) * max(width, len(ids)) * max(end, start + len(ids)) > budget
                          or (start > 0) != (group[-1][0][2] > 0)):
                out += run(group)
                group, width, end = [], 0, 0
            group.append((item, count))
            width, end = max(width, len(ids)), max(end, start + len(ids))
        if group:
            out += run(group)
        return out

    # --- the model runner: prefill and decode over slots ---------------------------------------------------------
    def prefill(self, items: list[tuple[int, list[int], int]], indices: list[int]) -> \
            list[tuple[tuple[int, list[int], int], int]]:
        """(item, sampled token) for each (slot, ids, start) item, prefilled in groups of similar length; `indices`
        are the items' request numbers (their draws' keys).

        A prompt that several items of one prefill share (the R1 protocol's answers per problem, a GRPO group) is
        computed once: the others get its keys and values (`_move`) and draw their own first token from its logits."""
        t0 = time.perf_counter()
        start = torch.cuda.Event(enable_timing=True) if self.device.type == "cuda" else None
        if start is not None:  # queued behind the decode step queued before this prefill (overlap_steps)
            start.record()
        self._host_cache_writes += 1
        # the draw after an item's last id is keyed by that position, as a resume fed through decode steps would be
        key_of = {id(item): (index, item[2] + len(item[1]) - 1) for item, index in zip(items, indices)}
        unique, copies, first = [], {}, {}  # copies: index in unique -> the items that share its prompt
        for item in items:
            key = tuple(item[1]) if item[2] == 0 else None  # only whole prompts; appended text is each slot's own
            if key is not None and key in first:
                copies.setdefault(first[key], []).append(item)
                continue
            if key is not None:
                first[key] = len(unique)
            unique.append(item)
        draws = [[key_of[id(item)] for item in (unique[i], *copies.get(i, ()))] for i in range(len(unique))]
        index = {id(item): i for i, item in enumerate(unique)}
        out = []
        for item, tokens in self._extend_batches(unique, draws):
            out.append((item, tokens[0]))
            for copy, token in zip(copies.get(index[id(item)], ()), tokens[1:]):
                self._move(item[0], copy[0], len(item[1]))
                out.append((copy, token))
        self.stats["prefills"] += len(items)
        self.stats["shared_prefills"] += len(items) - len(unique)
        self.stats["prefill_tokens"] += sum(len(ids) for _, ids, _ in unique)
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
        seconds = time.perf_counter() - t0
        self.stats["prefill_s"] += seconds
        self.stats["prefill_gpu_s"] += start.elapsed_time(end) / 1e3 if start is not None else seconds  # CPU: as run
        return out

    def _launch(self, width: int, tokens: list[int], positions: list[int], indices: list[int]) -> DecodeStep:
        """One decode step of the first `width` slots from the host's inputs (their tokens, positions and request
        numbers), queued on the GPU (run at once on a CPU)."""
        staged = self._staging[:, :width]
        staged.copy_(torch.tensor([tokens[:width], positions[:width], indices[:width]], dtype=torch.long))
        step = self._begin(width)
        for buffer, row in zip((self.tokens, self.positions, self.request_index), staged):
            buffer[:width].copy_(row, non_blocking=True)
        return self._finish_launch(step, tokens[:width], positions[:width], indices[:width])

    def _launch_following(self, step: DecodeStep, known: dict[int, tuple[int, int]]) -> DecodeStep:
        """The step after `step`, queued before its tokens reach the host: the same width and requests, each slot's
        sampled token as input at the next position, or the `known` (token, position) (appended text being fed, a
        paused slot's input held); positions stay inside the cache: a finished slot's row is ignored, what it writes
        past its length is overwritten or never read. Its host-side inputs are complete once `step` is collected
        (`DecodeStep.follow`)."""
        following = self._begin(step.width)
        self.tokens[:step.width].copy_(self.next_tokens[:step.width])
        self.positions[:step.width].add_(1).clamp_(max=self.max_len - 1)
        self._queued += 1
        known = {slot: value for slot, value in known.items() if slot < step.width}
        if known:  # two host buffers, one per queued step in turn: the host has waited for the step before the
            # last queued one, so the copy from the buffer written now is done
            staged = self._known[self._queued % 2][:3 * len(known)]  # slots, tokens, positions: contiguous
            staged.copy_(torch.tensor([*known, *(t for t, _ in known.values()), *(p for _, p in known.values())],
                                      dtype=torch.long))
            slots, tokens, positions = staged.to(self.device, non_blocking=True).view(3, -1)
            self.tokens.index_copy_(0, slots, tokens)
            self.positions.index_copy_(0, slots, positions)
        following.known, following.cache_writes = known, self._host_cache_writes
        return self._finish_launch(following, None, None, step.indices)

    def _begin(self, width: int) -> DecodeStep:
        start = torch.cuda.Event(enable_timing=True) if self.device.type == "cuda" else None
        if start is not None:
            start.record()
        return DecodeStep(width, start=start, t0=time.perf_counter())

    def _finish_launch(self, step: DecodeStep, tokens, positions, indices) -> DecodeStep:
        self._step(step.width)
        step.out = self._out[self._launches % 2][:step.width]  # two: the host reads one while the next is written
        self._launches += 1
        step.out.copy_(self.next_tokens[:step.width], non_blocking=True)
        if step.start is not None:
            step.end = torch.cuda.Event(enable_timing=True)
            step.end.record()
        step.tokens, step.positions, step.indices = tokens, positions, indices
        return step

    def _collect(self, step: DecodeStep) -> list[int]:
        """The tokens `step` sampled (waiting for it), its time on the GPU and the bytes it read in the stats."""
        if step.end is not None:
            step.end.synchronize()
            seconds = step.start.elapsed_time(step.end) / 1e3
        else:
            seconds = time.perf_counter() - step.t0
        sampled = step.out.tolist()
        width = step.width
        self.stats["decode_s"] += seconds
        self.stats["decode_steps"] += 1
        self.stats["steps_below_full_width"] += width < self.slots
        at_width = self.steps_by_width.setdefault(width, [0, 0.0])
        at_width[0] += 1
        at_width[1] += seconds
        cached = sum(step.positions) + width  # each row's cache up to its new token
        self.stats["kv_tokens_read"] += cached
        if width == self.slots:  # the bytes a full-width step reads: the weights and those caches
            self.stats["full_width_s"] += seconds
            self.stats["full_width_bytes"] += self.weight_bytes + cached * self.kv_bytes_token
        return sampled

    def _drop(self, step: DecodeStep | None) -> None:
        """A queued step whose inputs were not the scheduler's: its results are never read (it still ran)."""
        if step is not None:
            self.stats["overlap_dropped_steps"] += 1

    def _prefill_due(self, scheduler: Scheduler, force: bool) -> None:
        while items := scheduler.schedule_prefill(force):
            indices = [scheduler.running[slot].index for slot, _, _ in items]
            scheduler.postprocess_prefill(self.prefill(items, indices))
            force = False  # a refill's own pauses and endings wait for the next step

    @torch.inference_mode()
    def run(self, requests: list[Request], sampling: SamplingParams, eos: int,
            on_token: Callable[[Request, list[int]], str | None] | None = None,
            on_pause: Callable[[Request, list[int]], object] | None = None,
            progress: Callable[[int, int], None] | None = None,
            on_finish: Callable[[Request], None] | None = None) -> list[Request]:
        """Decode every request to eos or its own budget (`Request.max_new_tokens`), drawing with `sampling`;
        returns them in order with new_ids filled in.

        `on_pause(request, tokens)` returns the ids to append, or a concurrent.futures.Future of them: the slot
        waits (its cache kept) while the others decode, and resumes once the future is done."""
        self.set_sampling(sampling)
        self._reset_stats()
        scheduler = Scheduler(requests, self.slots, self.max_len, eos, on_token, on_pause, on_finish, self.feed_max)
        self._prefill_due(scheduler, force=True)
        queued = None  # overlap_steps: the step queued after the last one, its inputs made on the GPU
        while scheduler.running:
            for src, dst, length in scheduler.compact():
                self._move(src, dst, length)
            decoding = scheduler.schedule_decode()
            if decoding is None:  # every live sequence waits: for a prefill (run it now) or for its appended text
                self._drop(queued)
                queued = None
                scheduler.wait_for_tools()
                self._prefill_due(scheduler, force=True)
                continue
            width, tokens, positions, indices = scheduler.width, scheduler.tokens, scheduler.positions, scheduler.indices
            if queued is not None and queued.matches(width, tokens, positions, indices, decoding,
                                                     self._host_cache_writes):
                step = queued
                self.stats["overlap_used_steps"] += 1
            else:
                self._drop(queued)
                step = self._launch(width, tokens, positions, indices)
            queued = self._launch_following(step, scheduler.known_next(decoding)) if self.overlap_steps else None
            sampled = self._collect(step)
            if queued is not None:
                queued.follow(step, sampled, self.max_len)
            scheduler.postprocess_decode(decoding, sampled)
            self._prefill_due(scheduler, force=len(decoding) < len(scheduler.running) // 2 or not scheduler.queue)
            if progress:
                progress(scheduler.done, scheduler.generated)
        self._drop(queued)
        self.stats["pauses"] = scheduler.pauses
        return requests
