"""Is the evaluation engine still exact (issue #32)? On 20 prompts, its greedy tokens against `model.generate`'s, both
in bf16 on this GPU, with the engine's defaults (fused projections on a GPU, CUDA graphs, the split-KV kernel):

- the same tokens, or
- a first divergence that is a bf16 tie: in an fp32 forward of the same weights over the prompt and the shared
  prefix, the two tokens' logits differ by no more than the bf16 forward's own error on those two logits, twice
  (each side's bf16 arithmetic may move its logits that much, so either side may pick either token).

    python -m bench check engine-greedy                    # the R1-1.5B architecture, random bf16 weights
    python -m bench check engine-greedy --model smollm2    # the small profile's real SmolLM2-135M-Instruct (Llama)
    python -m bench check engine-greedy --elementwise triton --reference engine   # the fused kernels against the
                                                           # engine's module path (same matmuls, same attention)

Random weights give flat logits (many near-ties); the real model shows what a user's evaluation meets. Exits 1 when
a divergence is not a tie. The summary also counts, over the divergences, how often the fp32 forward picks the
engine's token and how often the reference's: a path as exact as the reference is picked about as often.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a length counts once one ends), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def tie_at(model, model_fp32, ids: list[int], token_a: int, token_b: int) -> dict:
    """The logits of both tokens after `ids` in the model's dtype and in fp32: the fp32 gap between them, and the
    largest error of the low-precision forward on those two logits. A tie when the gap is within twice that error."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids], device=next(model.parameters()).device)
        low = model(input_ids=x).logits[0, -1].float()
        ref = model_fp32(input_ids=x.to(next(model_fp32.parameters()).device)).logits[0, -1].float().to(low.device)
    pair = torch.tensor([token_a, token_b], device=low.device)
    gap = float((ref[token_a] - ref[token_b]).abs())
    error = float((low[pair] - ref[pair]).abs().max())
    # the spacing of bf16 numbers at these logits: a gap of about one is below what bf16 logits can order
    top = float(ref[pair].abs().max())
    ulp = float(torch.finfo(torch.bfloat16).eps) * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0
    return {"fp32_gap": gap, "low_precision_error": error, "tie": gap <= 2 * error,
            "fp32_argmax": int(ref.argmax()), "tokens": [token_a, token_b], "logit": top, "bf16_ulp": ulp}


def engine_greedy(engine, prompts: list[list[int]], new_tokens: int, eos: int) -> list[list[int]]:
    from llmhelpers.inference.sampling import SamplingParams
    from llmhelpers.inference.scheduler import Request

    requests = [Request(p, new_tokens) for p in prompts]
    engine.run(requests, SamplingParams(temperature=0.0), eos=eos)
    return [list(r.new_ids) for r in requests]


def compare(model, model_fp32, engine, prompts: list[list[int]], new_tokens: int, eos: int,
            reference_engine=None) -> list[dict]:
    """Per prompt: the engine's greedy tokens against model.generate's (or, given one, another engine's), and at a
    divergence whether it is a tie."""
    import torch

    outputs = engine_greedy(engine, prompts, new_tokens, eos)
    references = engine_greedy(reference_engine, prompts, new_tokens, eos) if reference_engine is not None else None
    rows = []
    for k, (prompt, mine) in enumerate(zip(prompts, outputs)):
        if references is not None:
            reference = references[k]
        else:
            with torch.inference_mode():
                out = model.generate(input_ids=torch.tensor([prompt], device=engine.device),
                                     max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            reference = out[0, len(prompt):].tolist()
        at = first_divergence(mine, reference)
        row = {"prompt_tokens": len(prompt), "engine_tokens": len(mine), "reference_tokens": len(reference),
               "first_divergence": at}
        if at is not None and at < min(len(mine), len(reference)):
            row.update(tie_at(model, model_fp32, prompt + reference[:at], mine[at], reference[at]))
        elif at is not None:  # one stopped (eos) where the other went on: the eos choice is the divergence
            longer = mine if len(mine) > len(reference) else reference
            row.update(tie_at(model, model_fp32, prompt + longer[:at], longer[at], eos))
        if at is not None:
            row["engine_token"] = mine[at] if at < len(mine) else eos
            row["reference_token"] = reference[at] if at < len(reference) else eos
        rows.append(row)
    return rows


def fp32_sides(rows: list[dict]) -> dict:
    """At the divergences: how often the fp32 forward's own choice is the engine's token, and how often the
    reference's. A path as exact as the reference gets about half; a less exact one (an fp8 cache) fewer."""
    split = [r for r in rows if r["first_divergence"] is not None]
    return {"fp32_picks_engine_token": sum(r["fp32_argmax"] == r["engine_token"] for r in split),
            "fp32_picks_reference_token": sum(r["fp32_argmax"] == r["reference_token"] for r in split)}


def verdict(rows: list[dict]) -> bool:
    return all(r["first_divergence"] is None or r["tie"] for r in rows)


def prompts_for(name: str, tokenizer, count: int) -> list[list[int]]:
    """The small profile's held-out questions through the model's chat template, or (random weights, whose
    tokenizer is not the model's own) fixed random token ids of 20 to 400 tokens."""
    import random

    if name == "smollm2":
        root = Path(__file__).resolve().parent.parent
        rows = [json.loads(line) for line in (root / "data/small/heldout.jsonl").read_text().splitlines()[:count]]
        questions = [next(part["content"] for m in r["messages"] if m["role"] == "user" for part in m["content"]
                          if part["type"] == "text") for r in rows]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True) for q in questions]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rng = random.Random(0)
    return [[rng.randrange(1000, 150000) for _ in range(rng.randrange(20, 400))] for _ in range(count)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("r1-random", "smollm2"), default="r1-random")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--elementwise", default="default", choices=("default", "model", "liger", "triton"),
                        help="the engine's norm/RoPE/MLP path (default: the engine's own choice)")
    parser.add_argument("--reference", default="generate", choices=("generate", "engine", "same-engine"),
                        help="engine: against the engine with the model's modules (elementwise='model'), the same "
                             "fused matmuls and attention: isolates --elementwise's kernels; same-engine: against "
                             "the same engine's settings with overlapped steps the other way (expect identical "
                             "tokens)")
    parser.add_argument("--overlap-steps", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine under test queues each next decode step ahead or not (Engine(overlap_steps="
                             "...); default: the engine's, on a GPU)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                        help="the engine's KV cache (fp8: how often its rounding changes a greedy token)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="float32 on a CPU, with TRITON_INTERPRET=1 for --elementwise triton: the kernels' logic "
                             "on real weights, without bf16's roundings")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from common import finish_check, random_r1_model
    from llmhelpers.config.profiles import make_config
    from llmhelpers.inference.engine import Engine
    from llmhelpers.model.loading import load_base_model, load_tokenizer

    cfg = make_config("small") if args.model == "smollm2" else make_config("full", model_id=str(random_r1_model()))
    model = load_base_model(cfg, quantized=False).to(getattr(torch, args.dtype)).eval()
    model_fp32 = model if args.dtype == "float32" else load_base_model(cfg, quantized=False).float().eval()
    tokenizer = load_tokenizer(cfg)
    prompts = prompts_for(args.model, tokenizer, args.prompts)
    eos = tokenizer.eos_token_id if args.model == "smollm2" else model.config.eos_token_id
    engine = Engine(model, slots=len(prompts), max_len=max(map(len, prompts)) + args.new_tokens + 1,
                    elementwise=None if args.elementwise == "default" else args.elementwise,
                    fuse=True if args.elementwise == "triton" else None,  # the kernels read the fused outputs
                    kv_cache_dtype=args.kv_cache_dtype, overlap_steps=args.overlap_steps)
    reference_engine = None
    if args.reference in ("engine", "same-engine"):
        # the same matmuls (fused or not) and cache: only the elementwise path (engine) or the overlap differs
        reference_engine = Engine(model, slots=len(prompts), max_len=engine.max_len,
                                  elementwise="model" if args.reference == "engine" else engine.elementwise,
                                  fuse=engine.fused is not None, kv_cache_dtype=args.kv_cache_dtype,
                                  overlap_steps=not engine.overlap_steps if args.reference == "same-engine" else False)
    rows = compare(model, model_fp32, engine, prompts, args.new_tokens, eos, reference_engine)
    identical = sum(r["first_divergence"] is None for r in rows)
    summary = {"model": args.model, "dtype": str(model.dtype), "engine_fused": engine.fused is not None,
               "elementwise": engine.elementwise, "reference": args.reference, "kv_cache_dtype": args.kv_cache_dtype,
               "overlap_steps": engine.overlap_steps, "overlap_used_steps": engine.stats["overlap_used_steps"],
               "prompts": len(rows), "new_tokens": args.new_tokens, "identical": identical,
               "diverged_at_ties": sum(r["first_divergence"] is not None and r["tie"] for r in rows),
               "diverged_not_ties": sum(r["first_divergence"] is not None and not r["tie"] for r in rows),
               **fp32_sides(rows)}
    print(json.dumps(summary))
    finish_check({"summary": summary, "prompts": rows}, args.out, verdict(rows),
                 f"every prompt's greedy tokens from the engine equal the reference's ({args.reference}) in the same "
                 "dtype, or the "
                 "first divergence is a tie: the two tokens' fp32 logits differ by at most twice the low-precision "
                 "forward's error on them")


if __name__ == "__main__":
    main()
