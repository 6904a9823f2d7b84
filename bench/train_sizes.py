"""The bigger R1 distills under the project's default recipe (only the architecture changes): peak memory and
training speed per micro-batch, for the size table in BENCHMARKS.md and the guide's "which GPU" section (issue #13).

    python bench/train_sizes.py --models 1.5b,7b,14b,32b --out bench/results/<date>-<gpu>-sizes.json
    python bench/train_sizes.py --dry-run      # the same code path on the CPU with a tiny architecture

Random weights, quantized to NF4 through transformers' own loading path from an in-memory state dict
(`common.random_nf4_loader`), LoRA r=16 on every linear layer, TRL's SFTTrainer, 16 sequences per optimizer step
(micro-batch x accumulation). For each model and micro-batch, two measurements:

- speed: the realistic synthetic rows (lognormal lengths, median 700, cap 2,048), `--steps` timed steps after warm-up;
- memory: every row at the 2,048-token cap (the worst batch a run can meet), peak allocated and reserved over
  two steps. A card of X GB fits a micro-batch if that worst-case peak reserved, plus ~1 GiB of CUDA context,
  stays under X GB.

The epoch time is the default mix's token count (an estimate: 15,112 examples at the synthetic mean of ~840 tokens;
real lengths were never measured here) divided by the measured speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ARCHITECTURES, gpu_name, random_nf4_loader, random_r1_model, synthetic_rows  # noqa: E402
from train_throughput import run_config  # noqa: E402

CARDS_GB = (16, 24, 32, 80)
CONTEXT_GIB = 1.0  # CUDA context and allocator slack outside PyTorch's own counters
EPOCH_EXAMPLES = 15_000 + 112  # default math_samples + SciBench rows with a worked solution

# The same code on the CPU: a tiny Qwen2 (vocabulary above the tiny tokenizer's 1,026 ids) in the smoke settings.
TINY = dict(ARCHITECTURES["1.5b"], vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def measure(name, arch, model_dir, micro, rows, worst_rows, warmup, steps, extra):
    spec = dict(extra, per_device_train_batch_size=micro, gradient_accumulation_steps=max(1, 16 // micro))
    load = random_nf4_loader(arch)
    speed = run_config(f"{name}-mb{micro}", spec, model_dir, rows, warmup, steps, load_model=load, arch=arch)
    worst = run_config(f"{name}-mb{micro}-worst", spec, model_dir, worst_rows, 1, 2, load_model=load, arch=arch)
    fits = [gb for gb in CARDS_GB if worst["peak_reserved_gib"] + CONTEXT_GIB <= gb * 1e9 / 2**30]
    mean_len = sum(map(len, rows["input_ids"])) / len(rows["input_ids"])
    return {"model": name, "micro_batch": micro, "accumulation": spec["gradient_accumulation_steps"],
            "useful_tok_s": speed["useful_tok_s"], "tokens_per_step": speed["tokens_per_step"], "mfu": speed["mfu"],
            "peak_alloc_gib": speed["peak_alloc_gib"], "worst_case_peak_alloc_gib": worst["peak_alloc_gib"],
            "worst_case_peak_reserved_gib": worst["peak_reserved_gib"], "fits_gb": fits,
            "epoch_hours_estimate": round(EPOCH_EXAMPLES * mean_len / max(speed["useful_tok_s"], 1) / 3600, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.5b,7b,14b,32b")
    parser.add_argument("--micro-batches", default="1,4,16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dry-run", action="store_true", help="tiny architecture on the CPU, smoke settings")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.dry_run:
        from llmhelpers.model.tiny import build_tiny_r1

        model_dir = build_tiny_r1(Path("/tmp/bench-sizes/tiny-r1"))
        archs, extra = {"tiny": TINY}, dict(profile="smoke", max_example_tokens=2048)
        vocab = TINY["vocab_size"]
    else:
        model_dir = random_r1_model()  # its tokenizer; the weights come from random_nf4_loader
        archs, extra, vocab = {m: ARCHITECTURES[m] for m in args.models.split(",")}, {}, 151000
    per_run = 16 * (args.warmup + args.steps + 2) * 2
    rows = synthetic_rows(per_run, vocab=vocab)
    worst_rows = synthetic_rows(16 * 4 * 2, median=2048, sigma=0.0, vocab=vocab)
    results = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"), "cards_gb": CARDS_GB, "runs": []}
    for name, arch in archs.items():
        for micro in map(int, args.micro_batches.split(",")):
            try:
                run = measure(name, arch, model_dir, micro, rows, worst_rows, args.warmup, args.steps, extra)
            except Exception as err:  # an out-of-memory micro-batch is a result too
                run = {"model": name, "micro_batch": micro, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                import gc

                import torch

                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            if args.out:  # after every run: a call cut short keeps what it measured
                Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
