"""Where a decode step of the evaluation engine spends its time, on the R1-1.5B architecture (random bf16 weights).

    python bench/profile_engine.py --out bench/results/<date>-<gpu>-engine-profile.json

Every slot holds `--live` tokens (the workload's mean live length is about 1,650: prompt ~350 plus half an
answer of mean ~2,600). Timed with CUDA events over graph replays: the whole step (sampling, greedy), the
sampler alone on a step's logits, and the decode attention alone; then a torch.profiler kernel table of one
un-graphed step.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_name, peak_memory_bandwidth, random_r1_model  # noqa: E402


def bench_ms(fn, reps=20):
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    import torch

    from llmhelpers.config.profiles import make_config
    from llmhelpers.inference.engine import Engine, auto_slots, decode_attention_triton, split_length
    from llmhelpers.inference.sampling import SamplingParams, sample_top_p_triton
    from llmhelpers.model.loading import load_base_model

    p = argparse.ArgumentParser()
    p.add_argument("--live", type=int, default=1650)
    p.add_argument("--max-len", type=int, default=8192 + 600 + 1)
    p.add_argument("--samplers", default="sort,triton")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="Engine(fuse=...): q/k/v and gate/up fused, one combine kernel (default: the engine's)")
    p.add_argument("--elementwise", default=None, choices=("model", "liger", "triton"),
                   help="the engine's norms and RoPE: the model's modules, Liger's kernels, the project's fused ones "
                        "(default: the engine's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="fp8: the same slots as the model's dtype gets (the step time per width compares), the "
                        "attention alone over fp8 caches")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = load_base_model(make_config("full", model_id=str(random_r1_model())), quantized=False).eval()
    slots = auto_slots(model, args.max_len)
    eng = Engine(model, slots=slots, max_len=args.max_len, fuse=args.fuse, elementwise=args.elementwise,
                 kv_cache_dtype=args.kv_cache_dtype)
    eng.tokens.random_(1000, 150000)
    eng.positions.fill_(args.live - 1)
    res = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "slots": slots, "live_tokens": args.live,
           "fuse": eng.fused is not None, "elementwise": eng.elementwise, "kv_cache_dtype": args.kv_cache_dtype,
           "ms": {}}
    ms = res["ms"]
    with torch.inference_mode():
        for name in args.samplers.split(","):
            eng.sampler = name
            eng.set_sampling(SamplingParams(temperature=0.6, top_p=0.95))
            eng.graphs = {}
            ms[f"step_sampled_{name}"] = bench_ms(lambda: eng._step(slots))
            logits = torch.randn(slots, model.config.vocab_size, device="cuda", dtype=torch.bfloat16) * 2
            seeds = torch.arange(slots, device="cuda")
            ms[f"sampler_{name}"] = bench_ms(lambda: eng._sample(logits, seeds))
        # the Triton sampler's launch choices on a full step's rows and on a narrow step's (the tail samples too)
        for rows in (slots, 8):
            for block in (1024, 2048, 4096):
                for warps in (4, 8, 16):
                    ms[f"sampler_triton_rows{rows}_b{block}_w{warps}"] = bench_ms(
                        lambda: sample_top_p_triton(logits[:rows], eng.temperature, eng.top_p, seeds[:rows],
                                                    block=block, num_warps=warps))
        eng.sampler, eng.graphs = "triton", {}
        for width in (64, 8):
            ms[f"step_sampled_width{width}"] = bench_ms(lambda: eng._step(width))
        # prefill (issue #32: 17.5 s of the 2,000 answers' 186 s on 2026-12-03): a full engine's worth of the
        # workload's prompts (100-600 tokens), whole prompts through causal attention (the default) and through
        # the cache with a mask (the path before)
        rng = torch.Generator().manual_seed(0)
        items = [(slot, torch.randint(1000, 150000, (int(torch.randint(100, 601, (), generator=rng)),),
                                      generator=rng).tolist(), 0) for slot in range(slots)]
        for causal in (True, False):
            eng.causal_prefill = causal
            eng.prefill(items, list(range(slots)))  # warm-up (kernels chosen, memory pooled)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(2):
                eng.prefill(items, list(range(slots)))
            ms[f"prefill_{slots}_prompts_{'causal' if causal else 'masked'}"] = (time.perf_counter() - t0) / 2 * 1e3
        eng.causal_prefill = True
        res["prefill_prompt_tokens"] = sum(len(ids) for _, ids, _ in items)
        eng.set_sampling(SamplingParams(temperature=0.0))
        eng.graphs = {}
        ms["step_greedy"] = bench_ms(lambda: eng._step(slots))
        # issue #32: the bytes a full-width step must read (weights, every slot's live cache) over its time
        step_bytes = eng.weight_bytes + slots * args.live * eng.kv_bytes_token
        res["hbm_fraction_full_width_greedy"] = round(step_bytes / (ms["step_greedy"] / 1e3) / peak_memory_bandwidth(), 3)
        for width in (256, 128, 64, 8):
            ms[f"step_greedy_width{width}"] = bench_ms(lambda: eng._step(width))
        # issue #32 lever 1: narrow steps with more, shorter splits per (slot, kv head)
        eng.split_narrow_steps, eng.graphs = True, {}
        for width in (64, 16, 8, 1):
            ms[f"step_greedy_width{width}_split_narrow"] = bench_ms(lambda: eng._step(width))
        # and each slot's live length cut into those splits (at 1,650 live tokens in a cache of 8,793, capacity
        # splits leave most of a narrow step's splits without work)
        capacity_attention, eng.graphs = eng.decode_attention, {}
        eng.decode_attention = functools.partial(capacity_attention, live_split=True)
        for width in (64, 16, 8, 1):
            ms[f"step_greedy_width{width}_split_narrow_live"] = bench_ms(lambda: eng._step(width))
        eng.decode_attention = capacity_attention
        eng.split_narrow_steps, eng.graphs = False, {}
        ms["step_greedy_width1"] = bench_ms(lambda: eng._step(1))
        # wide steps with each slot's cache read by one program (no combine kernel, no empty splits)
        eng.unsplit_wide_steps, eng.graphs = True, {}
        for width in (slots, 256):
            ms[f"step_greedy_width{width}_unsplit"] = bench_ms(lambda: eng._step(width))
        eng.unsplit_wide_steps, eng.graphs = False, {}
        q = torch.randn(slots, eng.hq, eng.head_dim, device="cuda", dtype=torch.bfloat16)
        lengths = torch.full((slots,), args.live, device="cuda", dtype=torch.int32)
        scales = dict(k_scale=eng.k_scale[0], v_scale=eng.v_scale[0]) if eng.fp8 else {}
        for nsplit in (1, 2, 4, 8, 16):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    ms[f"attention_1layer_nsplit{nsplit}_n{block_n}_w{warps}"] = bench_ms(
                        lambda: decode_attention_triton(q, eng.k_cache[0], eng.v_cache[0], lengths, eng.scale,
                                                        **scales, nsplit=nsplit, block_n=block_n, num_warps=warps))
        for nsplit in (2, 4, 8):  # each slot's live length split (every split works) instead of the capacity
            ms[f"attention_1layer_nsplit{nsplit}_n64_w4_live"] = bench_ms(
                lambda: decode_attention_triton(q, eng.k_cache[0], eng.v_cache[0], lengths, eng.scale, **scales,
                                                nsplit=nsplit, live_split=True))
        layer_bytes = eng.kv_bytes_token // len(model.model.layers)  # one layer's keys and values of one token
        kv_bytes = slots * args.live * layer_bytes
        # slots of mixed live lengths (100 to 8,000, as a run's slots are): capacity splits against live splits
        mixed = torch.randint(100, min(8000, args.max_len), (slots,), device="cuda", dtype=torch.int32,
                              generator=torch.Generator("cuda").manual_seed(0))
        res["mixed_lengths_attention"] = {}
        for nsplit in (1, 4, 8):
            for live in (False, True):
                t = bench_ms(lambda: decode_attention_triton(q, eng.k_cache[0], eng.v_cache[0], mixed, eng.scale,
                                                             **scales, nsplit=nsplit,
                                                             live_split=live))
                res["mixed_lengths_attention"][f"nsplit{nsplit}{'_live' if live else ''}"] = {
                    "ms": round(t, 4), "kv_gb_s": round(int(mixed.sum()) * layer_bytes / (t / 1e3) / 1e9)}
        # a slot whose live tokens lie in its first split gets its output from that split's program (no combine):
        # the same loop over the same blocks as one split per slot, so the same bits; the other slots are combined
        one = decode_attention_triton(q, eng.k_cache[0], eng.v_cache[0], mixed, eng.scale, **scales, nsplit=1)
        four = decode_attention_triton(q, eng.k_cache[0], eng.v_cache[0], mixed, eng.scale, **scales, nsplit=4)
        whole = mixed <= split_length(eng.k_cache[0].shape[2], 4)
        res["whole_slots_check"] = {
            "whole_slots": int(whole.sum()), "bit_identical_to_one_split": bool(torch.equal(one[whole], four[whole])),
            "others_largest_gap": round(((one[~whole].float() - four[~whole].float()).abs().max()).item(), 6)}
        # the kernel's launch choices at mixed lengths (the fp8 cache's kernel read half the bytes in bf16's time;
        # bench/attention_codegen.py: it is bound by instructions): block size, warps, Triton's pipeline stages
        res["attention_tuning"] = {}
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (None, 2, 4):
                    name = f"n{block_n}_w{warps}_s{stages or 'default'}"
                    try:
                        t = bench_ms(lambda: decode_attention_triton(
                            q, eng.k_cache[0], eng.v_cache[0], mixed, eng.scale, **scales,
                            block_n=block_n, num_warps=warps, num_stages=stages), reps=50)
                    except Exception as err:  # e.g. out of shared memory at 128 x 4 stages
                        res["attention_tuning"][name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
                        continue
                    res["attention_tuning"][name] = {
                        "ms": round(t, 4), "kv_gb_s": round(int(mixed.sum()) * layer_bytes / (t / 1e3) / 1e9)}
        tuned = {k: v for k, v in res["attention_tuning"].items() if "ms" in v}
        res["attention_tuning_best"] = min(tuned.items(), key=lambda kv: kv[1]["ms"]) if tuned else None
        best = min((v, k) for k, v in ms.items() if k.startswith("attention"))
        res["attention_best"] = {"config": best[1], "ms": best[0], "kv_gb_s": round(kv_bytes / (best[0] / 1e3) / 1e9)}
        x = torch.randn(slots, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        layer = model.model.layers[0]
        ms["mlp_1layer"] = bench_ms(lambda: layer.mlp(x))
        ms["lm_head"] = bench_ms(lambda: model.lm_head(x[:, 0]))
        res["tok_s_at_full_width_sampled"] = {k: round(slots / (v / 1e3)) for k, v in ms.items()
                                              if k.startswith("step_sampled")}
        # kernel tables (eager, no graph: each kernel's GPU time) of a full-width sampled step with the default
        # sampler and of a greedy step of 8 slots: does the narrow step's ~4 ms floor come from a few kernels or from
        # many small ones (their count and summed GPU time against the captured step's time)
        from torch.profiler import ProfilerActivity, profile
        eng.sampler = "triton"
        tables = []
        for width, sampling in ((slots, SamplingParams(temperature=0.6, top_p=0.95)),
                                (8, SamplingParams(temperature=0.0))):
            eng.set_sampling(sampling)
            eng._decode_step(width)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                eng._decode_step(width)
                torch.cuda.synchronize()
            rows = prof.key_averages()  # CUDA activity only: each row is a kernel (or a copy) and its calls
            kernels = {"launches": sum(r.count for r in rows),
                       "gpu_ms": round(sum(r.self_device_time_total for r in rows) / 1e3, 3)}
            res[f"kernels_width{width}"] = kernels
            tables.append(f"== width {width}: {kernels['launches']} kernels, {kernels['gpu_ms']} ms of GPU time\n"
                          + rows.table(sort_by="cuda_time_total", row_limit=25))
        # a refill's prefill (issue #32: ~110 passes of ~15 prompts made most of a 2,000-answer run's 12-15 s of
        # prefill, while 487 prompts at once took 1.6 s): its wall time against its kernels' GPU time (the rest is
        # the host: Python, launches, the syncs of sampling its first tokens)
        try:  # added after the rest ran on a GPU: a failure here keeps the rest of the profile
            refill = items[:16]
            eng.set_sampling(SamplingParams(temperature=0.6, top_p=0.95))
            eng.prefill(refill, list(range(len(refill))))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.prefill(refill, list(range(len(refill))))
            ms["prefill_16_prompts"] = (time.perf_counter() - t0) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                eng.prefill(refill, list(range(len(refill))))
                torch.cuda.synchronize()
            rows = prof.key_averages()
            kernels = {"prompt_tokens": sum(len(ids) for _, ids, _ in refill), "launches": sum(r.count for r in rows),
                       "gpu_ms": round(sum(r.self_device_time_total for r in rows) / 1e3, 3)}
            res["kernels_prefill_16_prompts"] = kernels
            tables.append(f"== prefill of 16 prompts ({kernels['prompt_tokens']} tokens): {kernels['launches']} "
                          f"kernels, {kernels['gpu_ms']} ms of GPU time\n"
                          + rows.table(sort_by="cuda_time_total", row_limit=25))
        except Exception as err:
            res["kernels_prefill_16_prompts"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        table = "\n\n".join(tables)
    print(table)
    res["ms"] = {k: round(v, 3) for k, v in ms.items()}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        Path(args.out).with_suffix(".txt").write_text(table)
    if not res["whole_slots_check"]["bit_identical_to_one_split"]:
        sys.exit(f"whole slots differ from the one-split kernel: {res['whole_slots_check']}")


if __name__ == "__main__":
    main()
