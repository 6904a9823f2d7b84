"""Evaluation generation throughput on a realistic workload: today's `generate()` path against the
continuous-batching engine, in one process, on the R1-1.5B architecture with random bf16 weights.

    python bench/eval_engine.py --out bench/results/<date>-<gpu>-eval.json

Workload (issue #10): prompts of 100-600 tokens (uniform), answer lengths lognormal with median 2,000 and
sigma 0.7, capped at 8,192; each answer ends with eos at its drawn length (a logits processor forces it, and
bans eos before it, for model.generate; the engine's per-request budget is set to the drawn length, which
stops it at the same token). Timing is end to end with the model already loaded: every warm-up, graph
capture and prefill counts. Each engine run records `hbm_fraction_full_width`: the bytes a full-width decode step
reads (every weight once, each slot's live keys and values) over its time, against the datasheet bandwidth, and
`decode_by_width`: the decode steps and their GPU seconds by width (full, then powers of two: where the tail goes).
`prefill_gpu_s`, `prefill_tokens`, `prefill_tok_s_gpu`: the prefills on the GPU's clock (their wall time, `prefill_s`,
also waits for the decode step queued before each refill).
Configurations:

- baseline: the path before the engine: model.generate on bf16 weights, prompts sorted by length, batches of
  the old auto size (KV cache of longest prompt + 8,192 tokens in 70% of free memory, capped at 256);
- default: `llmhelpers.inference.generation.generate`, i.e. the engine with slots sized to free memory, sampling at
  temperature 0.6 / top-p 0.95 (the protocol);
- tools-off / tools-on (issue #11): the default engine, and the same with one tool call forced into every
  answer halfway through it (a sympy block run for real in the answer's sandbox, its output appended);
- fits-24gb (issue #32): the default engine with the slots a 24 GB card gives (22 GiB in all with the weights);
- fused (issue #32): Engine(fuse=True), fewer and larger kernels per step (q/k/v and gate/up as one matmul each,
  the split-KV combine as one Triton kernel; the engine's default on a GPU since 2026-12-03, so `default` is this
  too); unfused: Engine(fuse=False), the default before; fused-split: fused, and narrow steps split each slot's
  cache into more, shorter parts (Engine(split_narrow_steps=True)); liger, liger-split: the default (and with
  split_narrow_steps) with Liger's RMSNorm and RoPE kernels (Engine(elementwise="liger")); triton: with the
  project's fused decode kernels (Engine(elementwise="triton"): about 10 kernels per layer; the default on a GPU
  since 2026-12-03's fifth session, so `default` is this too); modules: the fused engine with the model's own
  norm/RoPE/MLP modules (elementwise="model", the default before); split: the default with split_narrow_steps;
  after-training: the default engine on the model after the project's `apply_liger` (what the notebook's
  evaluation after training on a GPU runs: Liger's norms, SwiGLU and RoPE patched in; last or alone, the patch
  stays in the process);
- fits-24gb-fp8: a 24 GB card's memory with the fp8 cache (where memory, not the slot cap, bounds the slots);
- fp8-kv: the KV cache in float8 (issue #32's lever 3; measured slower before the fused kernels, stays an option);
  fp8-kv-1024: and up to 1,024 slots (the room it leaves: fewer steps, so fewer reads of the weights);
  live-split, fp8-kv-live-split: the attention kernel's splits cut each slot's live length (Engine(live_split=True));
  split-live: both split_narrow_steps and live_split (a narrow step's many splits all over live tokens);
- overlap (issue #32): Engine(overlap_steps=True), each next decode step queued (its inputs made on the GPU) before
  the host reads this step's tokens, so the scheduler's Python runs while the GPU computes; overlap-tools: the same
  with tools-on's forced tool call per answer. The engine's default on a GPU since 2026-12-03's seventh session, so
  `default` and `tools-on` are these too; no-overlap, no-overlap-tools: each step waits for the host (the default
  before); unsplit-wide: Engine(unsplit_wide_steps=True), a step with 4 or more (slot, kv head) pairs per SM reads
  each slot's cache in one program and writes the attention output itself (no combine kernel, no empty splits);
- sort-sampler: the engine with top-p by sorting the vocabulary (the reference) instead of the Triton sampler;
- the engine with fewer slots (what a 16-32 GB card gets), and with graphs off, to show what each lever gives.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_name, peak_memory_bandwidth, random_r1_model  # noqa: E402

EOS = 151643  # R1's eos id (config.json)


def workload(n: int, seed: int = 0, median: int = 2000, sigma: float = 0.7, cap: int = 8192):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 150000) for _ in range(rng.randint(100, 600))] for _ in range(n)]
    lengths = [min(cap, max(1, int(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(n)]
    return prompts, lengths


class ForceEosAt:
    """Logits processor: eos exactly at each row's drawn length, never before."""

    def __init__(self, lengths, prompt_width):
        import torch

        self.lengths = torch.tensor(lengths).cuda()
        self.width = prompt_width

    def __call__(self, input_ids, scores):
        made = input_ids.shape[1] - self.width
        at = (self.lengths - 1 == made)
        scores[:, EOS] = float("-inf")
        scores[at] = float("-inf")
        scores[at, EOS] = 0.0
        return scores


def old_auto_batch(model, max_tokens, cap=256, share=0.7):
    import torch

    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2 * max_tokens
    free, _ = torch.cuda.mem_get_info()
    return int(max(1, min(cap, share * free // (kv + 2 * c.vocab_size * 4))))


class Deadline:
    """Stopping criterion: stop the whole batch once `seconds` have passed (to bound the benchmark's cost)."""

    def __init__(self, seconds):
        self.deadline, self.hit = time.perf_counter() + seconds, False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.hit = self.hit or time.perf_counter() > self.deadline
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)


def baseline(model, prompts, lengths, cap, seconds=None):
    """Returns useful tokens made. With `seconds`, generation stops there: a static batch's useful rate only
    falls as its rows finish, so a cut-short measurement is an upper bound on the baseline's throughput."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    batch = old_auto_batch(model, max(map(len, prompts)) + cap)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    made = 0
    deadline = Deadline(seconds) if seconds else None
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding, as the project's generate() did
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=cap,
                                 do_sample=True, temperature=0.6, top_p=0.95, pad_token_id=EOS, eos_token_id=EOS,
                                 logits_processor=LogitsProcessorList([ForceEosAt([lengths[i] for i in idx],
                                                                                  width)]),
                                 stopping_criteria=StoppingCriteriaList([deadline] if deadline else []))
        new = out[:, width:].tolist()
        for row in new:
            made += row.index(EOS) + 1 if EOS in row else len(row)
        if deadline and deadline.hit:
            return made, {"batch": batch, "cut_short_after_s": seconds, "upper_bound": True}
    return made, {"batch": batch}


# A block of the kind MathCodeInstruct's solutions run (sympy), executed for real in each answer's sandbox.
TOOL_BLOCK = ("I will check this with Python.\n\n```python\nfrom sympy import symbols, solve, Rational\n"
              "x = symbols('x')\nroots = solve(x**2 - 5*x + 6, x)\nprint(roots, sum(roots) * Rational(1, 2))\n"
              "```\n\n```output\n")


def forced_tools(tokenizer, lengths_by_request):
    """A ToolRunner that pauses each answer once, halfway through its drawn length (a random-weight model writes no
    code), and runs TOOL_BLOCK in that answer's sandbox: the real pause, execution, append and resume path."""
    from llmhelpers.inference.scheduler import PAUSE
    from llmhelpers.inference.tool_use import ToolRunner

    class Forced(ToolRunner):
        def on_token(self, request, tokens):
            made = len(tokens) - request.appended
            return PAUSE if request.appended == 0 and made == max(1, lengths_by_request[id(request)] // 2) else None

        def on_pause(self, request, tokens):
            return self.submit(id(request), TOOL_BLOCK)

    return Forced(tokenizer)


def steps_by_width_buckets(steps_by_width: dict[int, list], slots: int) -> list[dict]:
    """The engine's decode steps and GPU seconds per width, in buckets: full width, then powers of two downwards
    (where the tail of narrow steps spends its time)."""
    buckets = {}
    for width, (steps, seconds) in steps_by_width.items():
        low = slots if width == slots else 2 ** int(math.log2(width))
        label = "full" if width == slots else f"{low}-{min(2 * low - 1, slots - 1)}"
        bucket = buckets.setdefault(low, {"widths": label, "steps": 0, "seconds": 0.0})
        bucket["steps"] += steps
        bucket["seconds"] += seconds
    out = [buckets[low] for low in sorted(buckets, reverse=True)]
    for bucket in out:
        bucket["ms_per_step"] = round(bucket["seconds"] / bucket["steps"] * 1e3, 3)
        bucket["seconds"] = round(bucket["seconds"], 2)
    return out


def engine(model, prompts, lengths, cap, slots=0, graphs=True, sampler=None, tools=False, tokenizer=None,
           kv_cache_dtype="auto", memory_gib=0.0, fuse=None, split_narrow_steps=False, elementwise=None,
           live_split=False, slot_cap=512, overlap_steps=None, attention_launch=None,
           unsplit_wide_steps=False):
    import torch

    from llmhelpers.inference.engine import Engine, Request, auto_slots
    from llmhelpers.inference.sampling import SamplingParams

    max_len = max(map(len, prompts)) + cap + 1 + (64 if tools else 0)  # room for the appended output
    # memory_gib: a card of that size; its free memory is what the weights (already loaded) leave
    free = int(memory_gib * 2**30) - torch.cuda.memory_reserved() if memory_gib else None
    slots = slots or auto_slots(model, max_len, kv_cache_dtype=kv_cache_dtype, free_bytes=free, cap=slot_cap)
    eng = Engine(model, slots=min(slots, len(prompts)), max_len=max_len, use_cuda_graph=graphs,
                 kv_cache_dtype=kv_cache_dtype, fuse=fuse,
                 split_narrow_steps=split_narrow_steps, elementwise=elementwise, live_split=live_split,
                 overlap_steps=overlap_steps, attention_launch=attention_launch,
                 unsplit_wide_steps=unsplit_wide_steps)
    eng.sampler = sampler or eng.sampler
    reqs = [Request(p, n) for p, n in zip(prompts, lengths)]
    # eos=-1: a random model samples R1's eos id now and then (about 1 in 150k tokens); like the logits
    # processor of the baseline, which bans it before the drawn length, the answer ends at its drawn length.
    extra = {}
    if tools:
        runner = forced_tools(tokenizer, {id(r): n for r, n in zip(reqs, lengths)}).__enter__()
        extra = dict(on_token=runner.on_token, on_pause=runner.on_pause, on_finish=runner.on_finish)
    try:
        eng.run(reqs, SamplingParams(temperature=0.6, top_p=0.95, seed=0), eos=-1, **extra)
    finally:
        if tools:
            runner.__exit__(None, None, None)
    made = sum(len(r.new_ids) - r.appended for r in reqs)  # generated tokens; appended output is the tool's
    assert made == sum(lengths), (made, sum(lengths))
    stats = dict(eng.stats)
    full_bytes, full_s = stats.pop("full_width_bytes"), stats.pop("full_width_s")
    info = {"slots": eng.slots, "decode_steps_and_prefills": eng.stats["decode_steps"] + eng.stats["prefill_passes"],
            "sampler": eng.sampler, "fused": eng.fused is not None, "elementwise": eng.elementwise,
            **{k: round(v, 1) for k, v in stats.items()},
            # issue #32: weights + live KV read per full-width step over its time, against the datasheet bandwidth
            "full_width_steps": eng.stats["decode_steps"] - eng.stats["steps_below_full_width"],
            "full_width_gb_s": round(full_bytes / full_s / 1e9, 1) if full_s else None,
            "hbm_fraction_full_width": round(full_bytes / full_s / peak_memory_bandwidth(), 3) if full_s else None,
            "decode_by_width": steps_by_width_buckets(eng.steps_by_width, eng.slots),
            # the prefills' own rate on the GPU's clock (a refill's wall time also waits for the queued decode step)
            "prefill_tok_s_gpu": round(stats["prefill_tokens"] / stats["prefill_gpu_s"]) if stats["prefill_gpu_s"]
            else None}
    if tools:
        records = [runner.record(id(r)) for r in reqs]
        info.update(tool_calls=sum(r.calls for r in records), tool_errors=sum(r.errors for r in records),
                    tool_timeouts=sum(r.timeouts for r in records), tool_workers=runner.workers,
                    appended_tokens=sum(r.appended for r in reqs),
                    sample_output=records[0].runs[0].output if records[0].runs else None)
    del eng
    return made, info


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000,
                        help="engine workload size (2,000 = MATH-500 x the protocol's 4 samples)")
    parser.add_argument("--baseline-requests", type=int, default=256, help="one batch of the old path")
    parser.add_argument("--cap", type=int, default=8192)
    parser.add_argument("--configs", default="default,baseline,slots64,no-graphs")
    parser.add_argument("--attention-launch", default=None,
                        help='JSON of the attention kernel\'s launch choices for every configuration, e.g. '
                             '\'{"block_n": 128, "num_warps": 8, "num_stages": 3}\' '
                             "(what bench/profile_engine.py's attention_tuning found best)")
    parser.add_argument("--baseline-seconds", type=float, default=None,
                        help="stop the baseline after this long (its throughput is then an upper bound)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from llmhelpers.config.profiles import make_config
    from llmhelpers.model.loading import load_base_model

    model_dir = random_r1_model()
    model = load_base_model(make_config("full", model_id=str(model_dir)), quantized=False).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, lengths = workload(args.requests, cap=args.cap)
    results = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "workload": {"prompt_tokens": "uniform 100-600", "answer_tokens": "lognormal median 2000 sigma 0.7",
                            "cap": args.cap, "requests": args.requests,
                            "mean_answer_tokens": round(sum(lengths) / len(lengths)),
                            "max_answer_tokens": max(lengths)},
               "runs": []}
    # every configuration's engine with the attention kernel's launch choices, when given
    run_engine = functools.partial(engine, attention_launch=json.loads(args.attention_launch)
                                   if args.attention_launch else None)
    results["attention_launch"] = json.loads(args.attention_launch) if args.attention_launch else None
    for name in args.configs.split(","):
        n = args.baseline_requests if name == "baseline" else args.requests
        if name in ("no-graphs", "slots64"):
            n = min(n, 256)
        p, l = prompts[:n], lengths[:n]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            if name == "baseline":
                made, info = baseline(model, p, l, args.cap, args.baseline_seconds)
            elif name == "default":
                made, info = run_engine(model, p, l, args.cap)
            elif name in ("tools-off", "tools-on"):
                made, info = run_engine(model, p, l, args.cap, tools=name == "tools-on", tokenizer=tokenizer)
            elif name == "fused":  # issue #32 lever 2: q/k/v and gate/up as one matmul each, one combine kernel
                made, info = run_engine(model, p, l, args.cap, fuse=True)
            elif name == "liger":  # the default with Liger's RMSNorm and RoPE kernels (fewer launches per layer)
                made, info = run_engine(model, p, l, args.cap, elementwise="liger")
            elif name == "triton":  # the project's fused decode kernels (add + norm, RoPE + cache write, SiLU * up)
                made, info = run_engine(model, p, l, args.cap, elementwise="triton")
            elif name == "modules":  # the model's own norm, RoPE and MLP modules (the default until the kernels)
                made, info = run_engine(model, p, l, args.cap, elementwise="model")
            elif name == "split":  # the default (the fused decode kernels) with narrow steps split further
                made, info = run_engine(model, p, l, args.cap, split_narrow_steps=True)
            elif name == "liger-split":  # and narrow steps split further
                made, info = run_engine(model, p, l, args.cap, elementwise="liger", split_narrow_steps=True)
            elif name == "after-training":  # the notebook's path: training on a GPU applied Liger's kernels in the
                # process (the project's apply_liger: module classes and RoPE patched), then the engine runs the model
                # with those modules. The patch stays in this process: run this configuration last or alone
                from llmhelpers.model.loading import apply_liger

                if not apply_liger(model, make_config("full", model_id=str(model_dir))):
                    raise RuntimeError("Liger's kernels could not be applied (CUDA and liger-kernel needed)")
                made, info = run_engine(model, p, l, args.cap)
            elif name == "unfused":  # separate q/k/v and gate/up matmuls: the default until 2026-12-03
                made, info = run_engine(model, p, l, args.cap, fuse=False)
            elif name == "fused-split":  # and lever 1: narrow steps split each slot's cache further
                made, info = run_engine(model, p, l, args.cap, fuse=True, split_narrow_steps=True)
            elif name == "fits-24gb":  # issue #32: a 24 GB card, the slots that 22 GiB in all leave room for
                made, info = run_engine(model, p, l, args.cap, memory_gib=22)
            elif name == "fits-24gb-fp8":  # a 24 GB card with the fp8 cache: about twice its slots
                made, info = run_engine(model, p, l, args.cap, memory_gib=22, kv_cache_dtype="fp8")
            elif name == "fp8-kv":  # issue #32: the KV cache in float8, about twice the slots
                made, info = run_engine(model, p, l, args.cap, kv_cache_dtype="fp8")
            elif name == "fp8-kv-1024":  # and the slots it leaves room for (the 512 cap raised): fewer weight reads
                made, info = run_engine(model, p, l, args.cap, kv_cache_dtype="fp8", slot_cap=1024)
            elif name == "overlap":  # each next decode step queued before the host reads this one's tokens
                made, info = run_engine(model, p, l, args.cap, overlap_steps=True)
            elif name == "overlap-tools":  # and with a tool call per answer (fed text, resumes: dropped queued steps)
                made, info = run_engine(model, p, l, args.cap, tools=True, tokenizer=tokenizer, overlap_steps=True)
            elif name == "unsplit-wide":  # wide steps read each slot's cache in one program: no combine kernel
                made, info = run_engine(model, p, l, args.cap, unsplit_wide_steps=True)
            elif name == "no-overlap":  # each step waits for the host (the default before 2026-12-03's seventh session)
                made, info = run_engine(model, p, l, args.cap, overlap_steps=False)
            elif name == "no-overlap-tools":
                made, info = run_engine(model, p, l, args.cap, tools=True, tokenizer=tokenizer, overlap_steps=False)
            elif name == "split-live":  # narrow steps split further, each slot's live length cut into the splits
                made, info = run_engine(model, p, l, args.cap, split_narrow_steps=True, live_split=True)
            elif name == "live-split":  # the attention kernel's splits over each slot's live length
                made, info = run_engine(model, p, l, args.cap, live_split=True)
            elif name == "fp8-kv-live-split":
                made, info = run_engine(model, p, l, args.cap, kv_cache_dtype="fp8", live_split=True)
            elif name == "sort-sampler":
                made, info = run_engine(model, p, l, args.cap, sampler="sort")
            elif name == "slots64":
                made, info = run_engine(model, p, l, args.cap, slots=64)
            elif name == "no-graphs":
                made, info = run_engine(model, p, l, args.cap, graphs=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            run = {"config": name, "requests": n, "generated_tokens": made, "seconds": round(seconds, 1),
                   "gen_tok_s": round(made / seconds), "peak_alloc_gib":
                   round(torch.cuda.max_memory_allocated() / 2**30, 1), **info}
            # the host's own time between steps (scheduling, inputs), the GPU idle meanwhile (decode_s is the used
            # steps' GPU time, CUDA events; with overlap_steps this also holds the dropped queued steps' GPU time)
            if "decode_s" in info:
                run["host_s"] = round(seconds - info["decode_s"] - info["prefill_s"], 1)
        except Exception as err:  # one failing configuration should not hide the others
            run = {"config": name, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        if args.out:  # written after every configuration, so a run cut short keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
        gc.collect()
        torch.cuda.empty_cache()
    runs = {r["config"]: r for r in results["runs"] if "gen_tok_s" in r}
    if "default" in runs and "baseline" in runs:
        results["default_over_baseline"] = round(runs["default"]["gen_tok_s"] / runs["baseline"]["gen_tok_s"], 2)
    if "tools-on" in runs and "tools-off" in runs:
        results["tools_on_over_off"] = round(runs["tools-on"]["gen_tok_s"] / runs["tools-off"]["gen_tok_s"], 3)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
