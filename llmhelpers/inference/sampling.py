"""How tokens are drawn: the generation settings (`SamplingParams`) and the top-p samplers behind them.

Each draw of the engine is keyed: its random numbers are a function of one 64-bit seed per row (the engine makes it
from the run's seed, the request and the position: `draw_seed`), not of a generator's state. So a request's answer
does not depend on which slot it ran in, on how many slots there were, or on when a tool's output came back.

`SamplingParams` is the one object every generation path takes (nano-vllm's and vLLM's name): `generate`, the
engine, `model.generate` in batches, the tool rounds. The engine reads temperature and top-p from device tensors
inside its CUDA graphs, so changing them re-captures nothing; only greedy against sampled is a different graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 1024  # each answer's budget (the engine's requests carry it one by one)
    temperature: float = 0.6  # 0 is greedy decoding; 0.6 with top_p 0.95 is the R1 authors' protocol
    top_p: float = 0.95  # sample from the smallest most-probable set of tokens holding this much probability
    seed: int | None = None  # the same seed, prompts and model give the same answers

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def for_evaluation(cls, cfg) -> "SamplingParams":
        """The evaluation protocol's settings in `cfg` (eval_max_new_tokens, eval_do_sample, eval_temperature,
        eval_top_p, seed)."""
        return cls(max_new_tokens=cfg.eval_max_new_tokens, temperature=cfg.eval_temperature if cfg.eval_do_sample
                   else 0.0, top_p=cfg.eval_top_p, seed=cfg.seed)

    def generate_kwargs(self) -> dict:
        """The same settings as `model.generate` arguments."""
        if self.greedy:
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)


# A draw's seed: the run's 20 bits, the request's 22 (4M requests), the position's 20 (1M tokens): 62 bits.
RUN_BITS, REQUEST_BITS, POSITION_BITS = 20, 22, 20


def draw_seed(run: int, request: int, position: int):
    """The seed of the token drawn after `position` of request number `request` in a run seeded `run` (ints or int64
    tensors): distinct for every (run mod 2^20, request, position)."""
    return ((run % (1 << RUN_BITS)) << (REQUEST_BITS + POSITION_BITS)) + (request << POSITION_BITS) + position


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix64(z):
    """splitmix64's finalizer on int64 tensors (products wrap mod 2^64; each right shift is made logical by masking
    off the sign bits an arithmetic shift brings in)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def keyed_uniform(seeds, n: int):
    """[rows, n] uniform numbers in (0, 1): splitmix64 of (the row's seed, the column), from integer ops alone, so the
    same seeds give the same numbers on any device, in any batch, and inside a CUDA graph."""
    rows = _mix64(seeds.long() * _GOLDEN)  # the seed hashed first: seeds s and s + 1 share no numbers
    z = _mix64(rows[:, None] + torch.arange(1, n + 1, device=seeds.device) * _GOLDEN)
    return (((z >> 40) & ((1 << 24) - 1)).float() + 0.5) / (1 << 24)  # the top 24 bits: exact in float32


def sample_top_p_sorted(logits, temperature, top_p, seeds=None):
    """One token per row from the nucleus of softmax(logits / temperature) (the smallest most-probable prefix of the
    sorted vocabulary whose mass reaches top_p; the first token always stays), by Gumbel-max. `temperature` and
    `top_p` are numbers or tensors that broadcast against [rows, 1]. `seeds` ([rows] int64) key each row's random
    numbers (keyed_uniform); without them they come from torch's generator."""
    logits = logits.float() / temperature
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_logits = logits.gather(-1, order).masked_fill(drop, float("-inf"))
    if seeds is None:
        uniform = torch.rand_like(sorted_logits).clamp_(1e-20, 1.0)
    else:  # each token's number follows the token, not its rank: the draw is the same whatever the sort did
        uniform = keyed_uniform(seeds, logits.shape[-1]).gather(-1, order)
    gumbel = -torch.log(-torch.log(uniform))
    return order.gather(-1, (sorted_logits + gumbel).argmax(-1, keepdim=True)).squeeze(-1)


_top_p_kernel = None


def _build_top_p_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def top_p_sample(logits_ptr, out_ptr, seed_ptr, temperature_ptr, top_p_ptr, stride, V, BLOCK: tl.constexpr,
                     MAX_ROUNDS: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        seed = tl.load(seed_ptr + row)  # this row's draw: its own 64-bit key
        inv_temp = 1.0 / tl.load(temperature_ptr)  # read here, not baked in: a captured graph follows new values
        top_p = tl.load(top_p_ptr)
        idx = tl.arange(0, BLOCK)
        # every pass keeps per-lane running values and reduces across the block once, after its loop: a reduction
        # inside the loop waits on the block's barriers every iteration, which made the sampler latency-bound
        # (0.66 ms of a 10 ms step at 487 rows on an H200). The Gumbel noise is Philox's: one call makes four
        # numbers, so four consecutive tokens share a counter (token t takes number t % 4 of counter t // 4) and
        # the draws run over quarter-blocks, a quarter of the Philox work of one call per token
        quarter = tl.arange(0, BLOCK // 4)
        counters = tl.cdiv(V, 4)  # per round of draws: a redraw's counters follow the previous round's
        # pass 1: softmax statistics (online max and sum) and a Gumbel-max draw from the whole distribution
        m_lane = tl.full([BLOCK // 4], float("-inf"), tl.float32)
        z_lane = tl.zeros([BLOCK // 4], tl.float32)
        best_lane = tl.full([BLOCK // 4], float("-inf"), tl.float32)
        arg_lane = tl.zeros([BLOCK // 4], tl.int32)
        for start in range(0, V, BLOCK):
            counter = start // 4 + quarter
            noise = tl.rand4x(seed, counter)
            for k in tl.static_range(4):
                offs = counter * 4 + k
                live = offs < V
                l = tl.load(base + offs, mask=live, other=float("-inf")).to(tl.float32) * inv_temp
                m_new = tl.maximum(m_lane, l)
                # a lane that has seen only -inf keeps a zero sum (exp(-inf - -inf) is NaN)
                z_lane = tl.where(m_new == float("-inf"), 0.0, z_lane * tl.exp(m_lane - m_new) + tl.exp(l - m_new))
                m_lane = m_new
                g = tl.where(live, l - tl.log(-tl.log(tl.maximum(noise[k], 1e-30))), float("-inf"))
                better = g > best_lane
                arg_lane = tl.where(better, offs, arg_lane)
                best_lane = tl.where(better, g, best_lane)
        m = tl.max(m_lane, 0)
        z = tl.sum(tl.where(m_lane == float("-inf"), 0.0, z_lane * tl.exp(m_lane - m)), 0)
        # the smallest index holding the largest value: the token a sequential scan of the vocabulary keeps
        best = tl.min(tl.where(best_lane == tl.max(best_lane, 0), arg_lane, V), 0)
        # accept the draw if it lies in the nucleus (less than top_p of the mass is more probable than it); else
        # every token at most as probable is outside it too: draw again among the more probable ones
        rounds = 1
        accepted = False
        while (rounds < MAX_ROUNDS) & (not accepted):
            pivot = tl.load(base + best).to(tl.float32) * inv_temp
            above_lane = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + idx
                l = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
                above_lane += tl.where(l > pivot, tl.exp(l - m), 0.0)
            accepted = tl.sum(above_lane, 0) < top_p * z
            if not accepted:
                best_lane = tl.full([BLOCK // 4], float("-inf"), tl.float32)
                for start in range(0, V, BLOCK):
                    counter = start // 4 + quarter
                    noise = tl.rand4x(seed, rounds * counters + counter)
                    for k in tl.static_range(4):
                        offs = counter * 4 + k
                        l = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
                        g = tl.where(l > pivot, l - tl.log(-tl.log(tl.maximum(noise[k], 1e-30))), float("-inf"))
                        better = g > best_lane
                        arg_lane = tl.where(better, offs, arg_lane)
                        best_lane = tl.where(better, g, best_lane)
                best = tl.min(tl.where(best_lane == tl.max(best_lane, 0), arg_lane, V), 0)
                rounds += 1
        tl.store(out_ptr + row, best)

    return top_p_sample


def sample_top_p_triton(logits, temperature, top_p, seeds, max_rounds: int = 64, block: int = 2048,
                        num_warps: int = 16):
    """The same distribution as sample_top_p_sorted without sorting (exact rejection sampling, as FlashInfer's
    sorting-free samplers): draw from the whole distribution; accept if less than top_p of the mass is more
    probable than the drawn token; otherwise draw again among the tokens more probable than it. The nucleus holds
    at least top_p of the mass, so a draw is accepted with probability >= top_p and rows rarely need a second
    pass. One program per row. `seeds` ([rows] int64, e.g. draw_seed's) key each row's random numbers; they,
    `temperature` and `top_p` (one-element float32) are device tensors read inside the kernel, so a CUDA graph
    replays with new random numbers when the caller writes new seeds and with new settings when it writes them.
    Tokens tied at the boundary are all kept; after max_rounds rejections (probability <= (1 - top_p) ** max_rounds)
    the last draw is kept. `block` and `num_warps` are launch choices (`bench/profile_engine.py` sweeps them; on an
    H200, 16 warps took 0.59 ms at 487 rows and 0.24 ms at 8 rows against 0.63 and 0.27 with 8)."""
    global _top_p_kernel
    if _top_p_kernel is None:
        _top_p_kernel = _build_top_p_kernel()
    rows, V = logits.shape
    device = logits.device
    temperature, top_p = (torch.as_tensor(x, dtype=torch.float32, device=device).reshape(1)
                          for x in (temperature, top_p))
    out = torch.empty(rows, dtype=torch.int32, device=device)
    _top_p_kernel[(rows,)](logits, out, seeds.long().contiguous(), temperature, top_p, logits.stride(0), V, BLOCK=block,
                           MAX_ROUNDS=max_rounds, num_warps=num_warps)
    return out.long()
