"""Evaluation (generation) throughput on the R1-1.5B architecture with random weights.

Compares the plain 4-bit path (generate on the NF4 training model, batch 64) with the path the
project's evaluation uses (weights in bf16, base or merged, larger batches), in one process:

    python bench/eval_throughput.py                       # all configurations
    python bench/eval_throughput.py --new-tokens 512 --configs nf4-b64,bf16-b256

Every sequence is forced to the full budget (min_new_tokens), so tokens/s is new tokens of real
work per second; prompts are 256 random tokens.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_name, random_r1_model  # noqa: E402

CONFIGS = {
    "nf4-b64": dict(quantized=True, batch=64),
    "bf16-b64": dict(quantized=False, batch=64),
    "bf16-b128": dict(quantized=False, batch=128),
    "bf16-b256": dict(quantized=False, batch=256),
    "bf16-b256-static-compiled": dict(quantized=False, batch=256, static=True),
}


def run(name, spec, model_dir, new_tokens, prompt_len, rounds):
    import torch

    from llmhelpers.config.profiles import make_config
    from llmhelpers.model.loading import load_base_model

    cfg = make_config("full", model_id=str(model_dir))
    model = load_base_model(cfg, quantized=spec["quantized"]).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 150000, (spec["batch"], prompt_len), generator=g).cuda()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  use_cache=True)
    if spec.get("static"):
        kwargs["cache_implementation"] = "static"
    try:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{**kwargs, "max_new_tokens": 16,
                                                                                   "min_new_tokens": 16})
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(rounds):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        made = (out.shape[1] - prompt_len) * out.shape[0] * rounds
        result = {"config": name, "batch": spec["batch"], "new_tokens": new_tokens, "seconds": round(elapsed, 2),
                  "tok_s": round(made / elapsed), "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    except Exception as err:  # report and go on: one failing configuration should not hide the others
        result = {"config": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The static-cache + torch.compile configuration is left out by default: its compilation ran past
    # four minutes on an H100 and was stopped; name it explicitly to try it.
    parser.add_argument("--configs", default="nf4-b64,bf16-b64,bf16-b128,bf16-b256")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model_dir = random_r1_model()
    results = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    for name in args.configs.split(","):
        r = run(name, CONFIGS[name], model_dir, args.new_tokens, args.prompt_len, args.rounds)
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in results["runs"] if r["config"] == "nf4-b64" and "tok_s" in r), None)
    print(f"\n{results['gpu']}, {results['date']}, {args.new_tokens} new tokens after {args.prompt_len}-token prompts")
    for r in results["runs"]:
        if "tok_s" in r:
            ratio = r["tok_s"] / base["tok_s"] if base else float("nan")
            print(f"{r['config']:<28}{r['tok_s']:>10,} tok/s{ratio:>8.2f}x{r['peak_alloc_gib']:>8.2f} GiB")
        else:
            print(f"{r['config']:<28} failed: {r['error']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
