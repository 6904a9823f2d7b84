"""Evaluation with tool execution, timed: the small profile's fine-tuned SmolLM2 (its saved adapters merged into the
NF4 base as trained) on the held-out problems, R1 protocol (4 samples), each python block run in a sandbox.

    python bench/tool_eval_speed.py --adapters DIR --work /tmp/te --out result.json

Run it from two checkouts in one session to compare what changed in the tool path (the sandbox's start and kill):
the script uses only APIs both have. Records accuracy (the answers must not change in kind), tool calls, and the
evaluation's wall time, each run twice (the first pays the engine's compilation and the Triton autotuning).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HELD_OUT = "data/small/heldout.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", required=True, help="the small profile's saved adapters (a final/ folder)")
    parser.add_argument("--work", default="/tmp/tool-eval")
    parser.add_argument("--problems", default=HELD_OUT,
                        help="a problem file (data/small/heldout_templates.jsonl: templates training never saw)")
    parser.add_argument("--limit", type=int, default=0, help="problems (0 = all of the file)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="the engine's KV cache (issue #32: fp8's effect on held-out accuracy)")
    args = parser.parse_args()

    import torch

    from llmhelpers.config.profiles import make_config
    from llmhelpers.data.sources import load_problem_file
    from llmhelpers.evaluation.protocol import evaluate
    from llmhelpers.model.loading import add_adapters, load_base_model, load_tokenizer, use_trained_base_weights

    work = Path(args.work)
    cfg = make_config("small", output_dir=str(work / "outputs"), eval_kv_cache_dtype=args.kv_cache_dtype)
    tokenizer = load_tokenizer(cfg)
    examples, _ = load_problem_file(args.problems)
    examples = examples[:args.limit] if args.limit else examples
    plain = load_base_model(cfg, quantized=False)
    use_trained_base_weights(plain, cfg)
    model = add_adapters(plain, Path(args.adapters), cfg).merge_and_unload().eval()
    runs = []
    for i in range(args.repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = evaluate(model, tokenizer, examples, cfg, f"tools-{i}", work / "eval", progress=False,
                          tool_execution=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows = result.rows
        runs.append({"seconds": round(seconds, 1), "accuracy": result.accuracy, "answers": len(rows),
                     "tool_calls": sum(r.tool_calls for r in rows),
                     "new_tokens": sum(r.new_tokens for r in rows),
                     "answers_per_second": round(len(rows) / seconds, 1)})
        print(json.dumps(runs[-1]), flush=True)
    out = {"gpu": torch.cuda.get_device_name(0), "problem_file": args.problems, "problems": len(examples), "samples": cfg.eval_samples,
           "kv_cache_dtype": args.kv_cache_dtype,
           "runs": runs, "command": " ".join(sys.argv)}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
